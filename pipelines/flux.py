"""`AlignedFluxPipeline`: diffusers' `FluxPipeline` (FLUX.1 dev and schnell) with alignment methods, and the FLUX
model family.

With no methods it returns exactly what its parent returns for the same components and seed; each method acts at
the numbered stages of the call through :mod:`ttalign.hooks`. FLUX is a flow-matching model on packed latents (2x2
latent patches as tokens); its transformer attends jointly over [text, image] tokens, takes the embedded guidance
scale as an input (dev) and runs true classifier-free guidance as a second, separate pass (`true_cfg_scale` with a
negative prompt). Run it in bf16: fp16 does not give valid FLUX images.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.flux import pipeline_flux as _flux
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import get_module_execution_device

from ttalign.hooks import AlignmentRunner, GenerationState, Stage

from .base import AlignedPipelineMixin, ParentCall, uses_sampling_defaults
from .family import Conditioning, ModelFamily, TextStream, register_family
from .joint_attention import JointControlProcessor, install_joint_control
from .stable_diffusion import AlignedPipelineOutput


class AlignedFluxPipeline(AlignedPipelineMixin, FluxPipeline):
    r"""
    [`~diffusers.FluxPipeline`] with inference-time alignment.

    Every argument of the parent's `__call__` works as there (embedded `guidance_scale`, `true_cfg_scale` with negative
    prompts, `max_sequence_length`, IP-Adapter inputs, `callback_on_step_end`...); `alignment` adds a list of
    [`~ttalign.hooks.AlignmentMethod`] objects that act at the stages of the call. Load it like the parent
    (`from_pretrained`, or construction from components), or wrap an existing pipeline with `from_pipe`. Unlike the
    parent, unknown keyword arguments raise `TypeError`. `alignment` and `sampling_defaults` (call arguments read from
    the model folder's `ttalign_sampling.json`) are as on [`AlignedStableDiffusionPipeline`].

    Examples:

    ```py
    >>> import torch
    >>> from ttalign import AlignedFluxPipeline
    >>> from ttalign.methods import NoiseOptimization
    >>> from ttalign.rewards import WeightedReward

    >>> pipe = AlignedFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", dtype=torch.bfloat16).to("cuda")
    >>> out = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, height=512, width=512,
    ...            alignment=[NoiseOptimization(reward=WeightedReward.reno())])  # ReNO on FLUX-schnell
    ```
    """

    # A copy of diffusers 0.42.1's `FluxPipeline.__call__`, with the stages added;
    # `parent_call` records the parent's fingerprint (tests/test_parent_calls.py fails when it differs).
    parent_call = ParentCall("0.42.1", "26d9b658a88b6b3be4097668709c17c3f9050431d3a32ca8977fa0c07cb5cbf2")

    @uses_sampling_defaults
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: PipelineImageInput | None = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the parent's signature)
        max_sequence_length: int = 512,
        *,
        alignment: list | None = None,
    ) -> AlignedPipelineOutput | tuple:
        r"""
        The call function of the pipeline: the parent's arguments, plus `alignment`.

        Args:
            prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, height, width, num_inference_steps,
            sigmas, guidance_scale, num_images_per_prompt, generator, latents, prompt_embeds, pooled_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image, negative_ip_adapter_image_embeds,
            negative_prompt_embeds, negative_pooled_prompt_embeds, output_type, return_dict, joint_attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length:
                As in [`~diffusers.FluxPipeline.__call__`].
            alignment (`AlignmentMethod` or `list[AlignmentMethod]`, *optional*):
                The methods to apply, in order. Defaults to `self.alignment` (empty: plain diffusers behaviour).

        Returns:
            [`~ttalign.pipelines.AlignedPipelineOutput`] or `tuple`: with `return_dict=False`, the parent's
            `(images,)` tuple. `nsfw_content_detected` is `None`. Latents are packed (`output_type="latent"`).
        """
        runner = AlignmentRunner(self.alignment if alignment is None else alignment)

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        if self.transformer.dtype == torch.float16:
            warnings.warn(
                "FLUX does not give valid images in float16 (its activations overflow); load it with "
                "`dtype=torch.bfloat16`.",
                stacklevel=2,
            )

        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
        state = GenerationState(
            pipe=self,
            family=self.family,
            prompt=[prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None),
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            height=height,
            width=width,
            guidance_scale=true_cfg_scale,  # the scale the branches are combined with; the embedded one is an input
            eta=0.0,
            num_inference_steps=num_inference_steps,
            generator=generator,
            device=device,
            output_type=output_type,
            user_latents=latents,
            do_classifier_free_guidance=do_true_cfg,
            extra_prompts={"prompt_2": prompt_2, "negative_prompt_2": negative_prompt_2},
            encode_options={"max_sequence_length": max_sequence_length, "guidance": guidance_scale},
            schedule_options={"sigmas": sigmas},
        )
        with runner.session(state):
            # 2. Define call parameters (the prompt stage first; methods that enlarge the batch set them in `setup`)
            if runner.has(Stage.PROMPT):
                runner.run(Stage.PROMPT, state)
                prompt, negative_prompt = state.prompt, state.negative_prompt
                prompt_2, negative_prompt_2 = state.extra_prompts["prompt_2"], state.extra_prompts["negative_prompt_2"]
            num_images_per_prompt, generator = state.num_images_per_prompt, state.generator
            if prompt is not None and isinstance(prompt, str):
                batch_size = 1
            elif prompt is not None and isinstance(prompt, list):
                batch_size = len(prompt)
            else:
                batch_size = prompt_embeds.shape[0]

            lora_scale = (
                self.joint_attention_kwargs.get("scale", None) if self.joint_attention_kwargs is not None else None
            )
            if do_true_cfg and prompt_embeds is not None and negative_prompt_embeds is not None:
                if prompt_embeds.shape != negative_prompt_embeds.shape:
                    raise ValueError(
                        "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, "
                        f"but got: `prompt_embeds` {prompt_embeds.shape} != `negative_prompt_embeds` "
                        f"{negative_prompt_embeds.shape}."
                    )
            (
                prompt_embeds,
                pooled_prompt_embeds,
                text_ids,
            ) = self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
            if do_true_cfg:
                (
                    negative_prompt_embeds,
                    negative_pooled_prompt_embeds,
                    negative_text_ids,
                ) = self.encode_prompt(
                    prompt=negative_prompt,
                    prompt_2=negative_prompt_2,
                    prompt_embeds=negative_prompt_embeds,
                    pooled_prompt_embeds=negative_pooled_prompt_embeds,
                    device=device,
                    num_images_per_prompt=num_images_per_prompt,
                    max_sequence_length=max_sequence_length,
                    lora_scale=lora_scale,
                )

            # 3. The conditioning stage
            state.conditioning = Conditioning(
                prompt_embeds,
                negative_prompt_embeds if do_true_cfg else None,
                {"pooled_projections": pooled_prompt_embeds},
                {"pooled_projections": negative_pooled_prompt_embeds} if do_true_cfg else {},
                cross_attention_kwargs=self.joint_attention_kwargs,
                shared={"txt_ids": text_ids, "image_size": (height, width)},
            )
            if runner.has(Stage.CONDITIONING):
                runner.run(Stage.CONDITIONING, state)
                prompt_embeds = state.conditioning.prompt_embeds
                if do_true_cfg:
                    negative_prompt_embeds = state.conditioning.negative_prompt_embeds

            # 4. Prepare latent variables
            num_channels_latents = self.transformer.config.in_channels // 4
            latents, latent_image_ids = self.prepare_latents(
                batch_size * num_images_per_prompt,
                num_channels_latents,
                height,
                width,
                prompt_embeds.dtype,
                device,
                generator,
                latents,
            )

            # 5. Prepare timesteps
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
            if hasattr(self.scheduler.config, "use_flow_sigmas") and self.scheduler.config.use_flow_sigmas:
                sigmas = None
            image_seq_len = latents.shape[1]
            mu = calculate_shift(
                image_seq_len,
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.15),
            )
            timestep_device = device
            timesteps, num_inference_steps = retrieve_timesteps(
                self.scheduler,
                num_inference_steps,
                timestep_device,
                sigmas=sigmas,
                mu=mu,
            )
            num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
            self._num_timesteps = len(timesteps)
            state.timesteps = timesteps

            # handle guidance
            if self.transformer.config.guidance_embeds:
                guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
                guidance = guidance.expand(latents.shape[0])
            else:
                guidance = None
            conditioning = state.conditioning
            conditioning.shared["img_ids"] = latent_image_ids
            if guidance is not None:
                conditioning.added["guidance"] = guidance
                if do_true_cfg:
                    conditioning.negative_added["guidance"] = guidance

            # 5.1 The init_latents stage (after the timesteps, which FLUX derives from the latents' size)
            # The attention stage: methods install their attention processors for this call; before init_latents, so
            # that searches over the initial noise render their candidates with them
            if runner.has(Stage.ATTENTION):
                state.latents = latents
                runner.run(Stage.ATTENTION, state)
            if runner.has(Stage.INIT_LATENTS):
                state.latents = latents
                runner.run(Stage.INIT_LATENTS, state)
                latents = state.latents

            if (ip_adapter_image is not None or ip_adapter_image_embeds is not None) and (
                negative_ip_adapter_image is None and negative_ip_adapter_image_embeds is None
            ):
                negative_ip_adapter_image = np.zeros((width, height, 3), dtype=np.uint8)
                negative_ip_adapter_image = [
                    negative_ip_adapter_image
                ] * self.transformer.encoder_hid_proj.num_ip_adapters

            elif (ip_adapter_image is None and ip_adapter_image_embeds is None) and (
                negative_ip_adapter_image is not None or negative_ip_adapter_image_embeds is not None
            ):
                ip_adapter_image = np.zeros((width, height, 3), dtype=np.uint8)
                ip_adapter_image = [ip_adapter_image] * self.transformer.encoder_hid_proj.num_ip_adapters

            if self.joint_attention_kwargs is None:
                self._joint_attention_kwargs = {}

            image_embeds = None
            negative_image_embeds = None
            if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
                image_embeds = self.prepare_ip_adapter_image_embeds(
                    ip_adapter_image,
                    ip_adapter_image_embeds,
                    device,
                    batch_size * num_images_per_prompt,
                )
            if negative_ip_adapter_image is not None or negative_ip_adapter_image_embeds is not None:
                negative_image_embeds = self.prepare_ip_adapter_image_embeds(
                    negative_ip_adapter_image,
                    negative_ip_adapter_image_embeds,
                    device,
                    batch_size * num_images_per_prompt,
                )

            # 6. Denoising loop
            # We set the index here to remove DtoH sync, helpful especially during compilation.
            # Check out more details here: https://github.com/huggingface/diffusers/pull/11696
            self.scheduler.set_begin_index(0)
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    state.step_index, state.timestep = i, t
                    if runner.has(Stage.STEP_START):
                        state.latents = latents
                        runner.run(Stage.STEP_START, state)
                        latents = state.latents

                    self._current_timestep = t
                    if image_embeds is not None:
                        self._joint_attention_kwargs["ip_adapter_image_embeds"] = image_embeds
                    # broadcast to batch dimension in a way that's compatible with ONNX/Core ML
                    timestep = t.expand(latents.shape[0]).to(latents.dtype)

                    with self.transformer.cache_context("cond"):
                        noise_pred = self.transformer(
                            hidden_states=latents,
                            timestep=timestep / 1000,
                            guidance=guidance,
                            pooled_projections=pooled_prompt_embeds,
                            encoder_hidden_states=prompt_embeds,
                            txt_ids=text_ids,
                            img_ids=latent_image_ids,
                            joint_attention_kwargs=self.joint_attention_kwargs,
                            return_dict=False,
                        )[0]
                    state.denoiser_calls += 1
                    state.denoiser_evals += latents.shape[0]

                    if do_true_cfg:
                        if negative_image_embeds is not None:
                            self._joint_attention_kwargs["ip_adapter_image_embeds"] = negative_image_embeds

                        # attention methods act on the conditional branch only (as with CFG in one batch)
                        with self.transformer.cache_context("uncond"), state.family.unconditional_pass():
                            neg_noise_pred = self.transformer(
                                hidden_states=latents,
                                timestep=timestep / 1000,
                                guidance=guidance,
                                pooled_projections=negative_pooled_prompt_embeds,
                                encoder_hidden_states=negative_prompt_embeds,
                                txt_ids=negative_text_ids,
                                img_ids=latent_image_ids,
                                joint_attention_kwargs=self.joint_attention_kwargs,
                                return_dict=False,
                            )[0]
                        state.denoiser_calls += 1
                        noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
                    if runner.has(Stage.NOISE_PRED):
                        state.latents, state.noise_pred = latents, noise_pred
                        runner.run(Stage.NOISE_PRED, state)
                        noise_pred = state.noise_pred

                    # compute the previous noisy sample x_t -> x_t-1
                    latents_dtype = latents.dtype
                    latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                    if latents.dtype != latents_dtype:
                        if torch.backends.mps.is_available():
                            # some platforms (eg. apple mps) misbehave due to a pytorch bug
                            latents = latents.to(latents_dtype)
                    if runner.has(Stage.STEP_END):
                        state.latents = latents
                        runner.run(Stage.STEP_END, state)
                        latents = state.latents

                    if callback_on_step_end is not None:
                        step_tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                        callback_kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)

                    # call the callback, if provided
                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                        progress_bar.update()

                    if _flux.XLA_AVAILABLE:
                        _flux.xm.mark_step()

            self._current_timestep = None

            # 7. Decode, then the output stage (scoring, selection)
            image = None
            if not output_type == "latent" or runner.has(Stage.OUTPUT):
                unpacked = self._unpack_latents(latents, height, width, self.vae_scale_factor)
                unpacked = (unpacked / self.vae.config.scaling_factor) + self.vae.config.shift_factor
                unpacked = unpacked.to(get_module_execution_device(self.vae))
                image = self.vae.decode(unpacked, return_dict=False)[0]
                state.vae_decodes += latents.shape[0]
            if runner.has(Stage.OUTPUT):
                state.latents, state.decoded = latents, image
                runner.run(Stage.OUTPUT, state)
                latents, image = state.latents, state.decoded
            if output_type == "latent":
                image = latents
            else:
                image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        state.traces["compute"] = state.compute()
        return AlignedPipelineOutput(
            images=image, nsfw_content_detected=None, rewards=state.rewards, traces=state.traces
        )


@register_family("flux", AlignedFluxPipeline)
class FluxFamily(ModelFamily):
    """FLUX.1: a `FluxTransformer2DModel` with joint attention over [text, image] tokens (T5's tokens only; the CLIP-L
    pooled vector is an added input), rotary position ids, packed latents (2x2 patches), the embedded guidance scale
    as an input (dev), true classifier-free guidance as a second pass, velocity prediction on a dynamically shifted
    flow-matching schedule; LoRA in diffusers' FLUX format."""

    name = "FLUX"
    pipeline_class = FluxPipeline
    denoiser_attribute = "transformer"
    # cross_attention: the text view of joint attention
    features = frozenset({"cross_attention", "joint_attention", "flow_matching", "stochastic_steps", "packed_latents"})
    attention_defaults = {"normalize_eot": True, "from_where": ("double",), "parts": ("double", "single")}

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2) if m is not None]

    @property
    def tokenizer(self):
        """T5's tokenizer: the text tokens the transformer attends to are T5's."""
        return self.pipe.tokenizer_2

    @property
    def text_streams(self) -> list[TextStream]:
        return [TextStream(self.pipe.tokenizer_2, "prompt_2", slice(None))]

    # --- conditioning ----------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompts,
        device,
        negative_prompt=None,
        do_cfg=False,
        num_images_per_prompt=1,
        height=None,
        width=None,
        guidance_scale=None,
        clip_skip=None,
        max_sequence_length: int = 512,
        guidance: float | None = None,
        **options,
    ):
        pipe = self.pipe
        height, width = height or self.default_image_size, width or self.default_image_size
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
        )
        cond = Conditioning(embeds, None, {"pooled_projections": pooled}, shared={"txt_ids": text_ids})
        if do_cfg:
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * len(prompts) if isinstance(negative, str) else negative
            neg_embeds, neg_pooled, _ = pipe.encode_prompt(
                prompt=negative,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
            )
            cond.negative_prompt_embeds, cond.negative_added = neg_embeds, {"pooled_projections": neg_pooled}
        grid = self.latent_grid(height, width)
        cond.shared["img_ids"] = pipe._prepare_latent_image_ids(None, grid[0] // 2, grid[1] // 2, device, embeds.dtype)
        cond.shared["image_size"] = (height, width)
        if self.base_denoiser.config.guidance_embeds:
            value = 3.5 if guidance is None else guidance
            rows = torch.full([embeds.shape[0]], value, device=device, dtype=torch.float32)
            cond.added["guidance"] = rows
            if do_cfg:
                cond.negative_added["guidance"] = rows
        return cond

    # --- the denoiser ----------------------------------------------------------------------------------------------

    def denoise(self, latents, timestep, cond, guidance_scale=1.0, cfg=None):
        """The conditional pass, and with true classifier-free guidance a second, separate unconditional pass, as the
        pipeline runs them: `uncond + guidance_scale * (cond - uncond)` (`guidance_scale` is `true_cfg_scale`)."""
        if cfg is None:
            cfg = cond.has_negative and guidance_scale > 1
        out = self.forward(latents, timestep, cond, cfg=False)
        if not cfg:
            return out
        negative = Conditioning(
            cond.negative_prompt_embeds,
            None,
            cond.negative_added,
            cross_attention_kwargs=cond.cross_attention_kwargs,
            shared=cond.shared,
        )
        with self.unconditional_pass():
            uncond = self.forward(latents, timestep, negative, cfg=False)
        return uncond + guidance_scale * (out - uncond)

    def forward(self, latents, timestep, cond, cfg):
        if cfg:
            raise ValueError("FLUX runs its two guidance branches as separate passes: use `denoise`.")
        embeds, added = cond.batch(False)
        timestep = torch.as_tensor(timestep, device=latents.device)
        timestep = (timestep.expand(latents.shape[0]) if timestep.ndim == 0 else timestep).to(latents.dtype)
        return self.denoiser(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=added.get("guidance"),
            pooled_projections=added["pooled_projections"],
            encoder_hidden_states=embeds,
            txt_ids=cond.shared["txt_ids"],
            img_ids=cond.shared["img_ids"],
            joint_attention_kwargs=cond.cross_attention_kwargs,
            return_dict=False,
        )[0]

    @contextlib.contextmanager
    def unconditional_pass(self):
        """Inside the block, the attention controls on the transformer act on nothing (the unconditional pass)."""
        controls = {
            id(p.control): p.control
            for p in self.base_denoiser.attn_processors.values()
            if isinstance(p, JointControlProcessor)
        }
        with contextlib.ExitStack() as stack:
            for control in controls.values():
                stack.enter_context(control.paused())
            yield

    # --- latents ---------------------------------------------------------------------------------------------------

    def set_timesteps(
        self, num_inference_steps, device, height=None, width=None, timesteps=None, sigmas=None, mu=None
    ):
        config = self.scheduler.config
        if sigmas is None and timesteps is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if config.get("use_flow_sigmas", False):
            sigmas = None
        if mu is None:
            size = self.default_image_size
            image_seq_len = self.latents_shape(1, height or size, width or size)[1]
            mu = calculate_shift(
                image_seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        return retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas, mu=mu)[0]

    def latent_grid(self, height, width):
        factor = self.pipe.vae_scale_factor
        return 2 * (int(height) // (factor * 2)), 2 * (int(width) // (factor * 2))

    def latents_shape(self, batch, height, width):
        h, w = self.latent_grid(height, width)
        return (batch, (h // 2) * (w // 2), self.base_denoiser.config.in_channels)

    @property
    def default_image_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2  # 2x2 latent patches are the tokens

    def unpack_latents(self, latents, height, width):
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)

    def decode(self, latents, height=None, width=None):
        if height is None or width is None:
            raise ValueError("FLUX's latents are packed: decoding them needs the image's height and width.")
        vae = self.vae
        unpacked = self.unpack_latents(latents, height, width).to(vae.dtype)
        return vae.decode(unpacked / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]

    def training_conditioning(
        self, prompts, device, image_sizes=None, crops=None, size=None, **options
    ) -> Conditioning:
        size = size or self.default_image_size  # the packed latents' positions (img_ids) follow the image size
        return self.encode_prompt(prompts, device, height=size, width=size, **options)

    def encode_images(self, images):
        vae = self.vae
        latents = (
            vae.encode(images.to(vae.dtype)).latent_dist.mean - vae.config.shift_factor
        ) * vae.config.scaling_factor
        batch, channels, h, w = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, h, w)

    # --- attention -------------------------------------------------------------------------------------------------

    def install_attention_control(self, control) -> None:
        install_joint_control(
            self.base_denoiser,
            control,
            text_first=True,
            part_of=lambda name: "single" if name.startswith("single") else "double",
        )

    def cross_attention_resolutions(self, latent_height, latent_width):
        return [(latent_height // 2, latent_width // 2)]  # 2x2 latent patches are the tokens

    def attention_token_positions(self, prompt, exclude_padding):
        tokenizer = self.tokenizer  # T5: no start token; the end token and padding left out with exclude_padding
        return list(range(len(tokenizer(prompt).input_ids) - 1 if exclude_padding else tokenizer.model_max_length))

    # --- LoRA ------------------------------------------------------------------------------------------------------

    def aligned_pipeline(self):
        return AlignedFluxPipeline.from_pipe(self.pipe)

    def save_lora(self, directory, denoiser_layers) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = convert_state_dict_to_diffusers(denoiser_layers)
        self.pipeline_class.save_lora_weights(directory, transformer_lora_layers=layers, safe_serialization=True)
