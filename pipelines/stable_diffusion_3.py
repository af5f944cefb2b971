"""`AlignedStableDiffusion3Pipeline`: diffusers' `StableDiffusion3Pipeline` (SD3, SD3.5) with alignment methods, and
the SD3 model family.

With no methods it returns exactly what its parent returns for the same components and seed; each method acts at
the numbered stages of the call through :mod:`ttalign.hooks`. SD3 is a flow-matching model: its transformer predicts
the velocity, and sampling runs the flow-matching Euler step (`ttalign.sampling.flow_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as _sd3
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from ttalign.hooks import AlignmentRunner, GenerationState, Stage

from .base import AlignedPipelineMixin, ParentCall, uses_sampling_defaults
from .family import Conditioning, ModelFamily, TextStream, register_family
from .joint_attention import install_joint_control
from .stable_diffusion import AlignedPipelineOutput


class AlignedStableDiffusion3Pipeline(AlignedPipelineMixin, StableDiffusion3Pipeline):
    r"""
    [`~diffusers.StableDiffusion3Pipeline`] with inference-time alignment.

    Every argument of the parent's `__call__` works as there (three prompts, skip-layer guidance,
    `max_sequence_length`, dynamic shift `mu`, IP-Adapter inputs, `callback_on_step_end`...); `alignment` adds a list
    of [`~ttalign.hooks.AlignmentMethod`] objects that act at the stages of the call. Load it like the parent
    (`from_pretrained`, or construction from components), or wrap an existing pipeline with `from_pipe`. Unlike the
    parent, unknown keyword arguments raise `TypeError`. `alignment` and `sampling_defaults` (call arguments read from
    the model folder's `ttalign_sampling.json`) are as on [`AlignedStableDiffusionPipeline`].

    Examples:

    ```py
    >>> import torch
    >>> from ttalign import AlignedStableDiffusion3Pipeline
    >>> from ttalign.methods import AttendAndExcite

    >>> pipe = AlignedStableDiffusion3Pipeline.from_pretrained(
    ...     "stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16
    ... ).to("cuda")
    >>> out = pipe("a cat and a frog", alignment=[AttendAndExcite(tokens=["cat", "frog"])])
    ```
    """

    # A copy of diffusers 0.42.1's `StableDiffusion3Pipeline.__call__`, with the stages added;
    # `parent_call` records the parent's fingerprint (tests/test_parent_calls.py fails when it differs).
    parent_call = ParentCall("0.42.1", "890bad35b5680895f3b44cda094742e3609379bdb22d08eeab9c250705199b29")

    @uses_sampling_defaults
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the parent's signature)
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        *,
        alignment: list | None = None,
    ) -> AlignedPipelineOutput | tuple:
        r"""
        The call function of the pipeline: the parent's arguments, plus `alignment`.

        Args:
            prompt, prompt_2, prompt_3, height, width, num_inference_steps, sigmas, guidance_scale, negative_prompt,
            negative_prompt_2, negative_prompt_3, num_images_per_prompt, generator, latents, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, output_type, return_dict, joint_attention_kwargs, clip_skip, callback_on_step_end,
            callback_on_step_end_tensor_inputs, max_sequence_length, skip_guidance_layers, skip_layer_guidance_scale,
            skip_layer_guidance_stop, skip_layer_guidance_start, mu:
                As in [`~diffusers.StableDiffusion3Pipeline.__call__`].
            alignment (`AlignmentMethod` or `list[AlignmentMethod]`, *optional*):
                The methods to apply, in order. Defaults to `self.alignment` (empty: plain diffusers behaviour).

        Returns:
            [`~ttalign.pipelines.AlignedPipelineOutput`] or `tuple`: with `return_dict=False`, the parent's
            `(images,)` tuple. `nsfw_content_detected` is `None`.
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
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )

        self._guidance_scale = guidance_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        device = self._execution_device

        state = GenerationState(
            pipe=self,
            family=self.family,
            prompt=[prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None),
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            eta=0.0,
            num_inference_steps=num_inference_steps,
            generator=generator,
            device=device,
            output_type=output_type,
            user_latents=latents,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            clip_skip=clip_skip,
            extra_prompts={
                "prompt_2": prompt_2,
                "prompt_3": prompt_3,
                "negative_prompt_2": negative_prompt_2,
                "negative_prompt_3": negative_prompt_3,
            },
            encode_options={"max_sequence_length": max_sequence_length},
            schedule_options={"sigmas": sigmas, "mu": mu},
        )
        with runner.session(state):
            # 2. Define call parameters (the prompt stage first; methods that enlarge the batch set them in `setup`)
            if runner.has(Stage.PROMPT):
                runner.run(Stage.PROMPT, state)
                prompt, negative_prompt = state.prompt, state.negative_prompt
                extra = state.extra_prompts
                prompt_2, prompt_3 = extra["prompt_2"], extra["prompt_3"]
                negative_prompt_2, negative_prompt_3 = extra["negative_prompt_2"], extra["negative_prompt_3"]
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
            (
                prompt_embeds,
                negative_prompt_embeds,
                pooled_prompt_embeds,
                negative_pooled_prompt_embeds,
            ) = self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                prompt_3=prompt_3,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                negative_prompt_3=negative_prompt_3,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                device=device,
                clip_skip=self.clip_skip,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )

            # 3. The conditioning stage, then the transformer's batch (classifier-free guidance: unconditional first)
            cfg = self.do_classifier_free_guidance
            state.conditioning = Conditioning(
                prompt_embeds,
                negative_prompt_embeds if cfg else None,
                {"pooled_projections": pooled_prompt_embeds},
                {"pooled_projections": negative_pooled_prompt_embeds} if cfg else {},
                cross_attention_kwargs=self.joint_attention_kwargs,
            )
            if runner.has(Stage.CONDITIONING):
                runner.run(Stage.CONDITIONING, state)
            prompt_embeds = state.conditioning.prompt_embeds
            pooled_prompt_embeds = state.conditioning.added["pooled_projections"]
            if self.do_classifier_free_guidance:
                if skip_guidance_layers is not None:
                    original_prompt_embeds = prompt_embeds
                    original_pooled_prompt_embeds = pooled_prompt_embeds
                prompt_embeds, added = state.conditioning.batch(True)
                pooled_prompt_embeds = added["pooled_projections"]

            # 4. Prepare latent variables
            num_channels_latents = self.transformer.config.in_channels
            latents = self.prepare_latents(
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
            scheduler_kwargs = {}
            if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
                _, _, latent_height, latent_width = latents.shape
                image_seq_len = (latent_height // self.transformer.config.patch_size) * (
                    latent_width // self.transformer.config.patch_size
                )
                mu = calculate_shift(
                    image_seq_len,
                    self.scheduler.config.get("base_image_seq_len", 256),
                    self.scheduler.config.get("max_image_seq_len", 4096),
                    self.scheduler.config.get("base_shift", 0.5),
                    self.scheduler.config.get("max_shift", 1.16),
                )
                scheduler_kwargs["mu"] = mu
            elif mu is not None:
                scheduler_kwargs["mu"] = mu
            timestep_device = "cpu" if _sd3.XLA_AVAILABLE else device
            timesteps, num_inference_steps = retrieve_timesteps(
                self.scheduler,
                num_inference_steps,
                timestep_device,
                sigmas=sigmas,
                **scheduler_kwargs,
            )
            num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
            self._num_timesteps = len(timesteps)
            state.timesteps = timesteps

            # 5.1 The init_latents stage (after the timesteps, which SD3 derives from the latents' size)
            # The attention stage: methods install their attention processors for this call; before init_latents, so
            # that searches over the initial noise render their candidates with them
            if runner.has(Stage.ATTENTION):
                state.latents = latents
                runner.run(Stage.ATTENTION, state)
            if runner.has(Stage.INIT_LATENTS):
                state.latents = latents
                runner.run(Stage.INIT_LATENTS, state)
                latents = state.latents

            # 6. Prepare image embeddings
            if (ip_adapter_image is not None and self.is_ip_adapter_active) or ip_adapter_image_embeds is not None:
                ip_adapter_image_embeds = self.prepare_ip_adapter_image_embeds(
                    ip_adapter_image,
                    ip_adapter_image_embeds,
                    device,
                    batch_size * num_images_per_prompt,
                    self.do_classifier_free_guidance,
                )

                if self.joint_attention_kwargs is None:
                    self._joint_attention_kwargs = {"ip_adapter_image_embeds": ip_adapter_image_embeds}
                else:
                    self._joint_attention_kwargs.update(ip_adapter_image_embeds=ip_adapter_image_embeds)

            # 7. Denoising loop
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    state.step_index, state.timestep = i, t
                    if runner.has(Stage.STEP_START):
                        state.latents = latents
                        runner.run(Stage.STEP_START, state)
                        latents = state.latents

                    # expand the latents if we are doing classifier free guidance
                    latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                    # broadcast to batch dimension in a way that's compatible with ONNX/Core ML
                    timestep = t.expand(latent_model_input.shape[0])
                    if timestep.device.type == "tpu":
                        timestep = timestep.clone()

                    noise_pred = self.transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds,
                        pooled_projections=pooled_prompt_embeds,
                        joint_attention_kwargs=self.joint_attention_kwargs,
                        return_dict=False,
                    )[0]
                    state.denoiser_calls += 1
                    state.denoiser_evals += latents.shape[0]

                    # perform guidance
                    if self.do_classifier_free_guidance:
                        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                        should_skip_layers = (
                            True
                            if i > num_inference_steps * skip_layer_guidance_start
                            and i < num_inference_steps * skip_layer_guidance_stop
                            else False
                        )
                        if skip_guidance_layers is not None and should_skip_layers:
                            timestep = t.expand(latents.shape[0])
                            if timestep.device.type == "tpu":
                                timestep = timestep.clone()
                            latent_model_input = latents
                            noise_pred_skip_layers = self.transformer(
                                hidden_states=latent_model_input,
                                timestep=timestep,
                                encoder_hidden_states=original_prompt_embeds,
                                pooled_projections=original_pooled_prompt_embeds,
                                joint_attention_kwargs=self.joint_attention_kwargs,
                                return_dict=False,
                                skip_layers=skip_guidance_layers,
                            )[0]
                            state.denoiser_calls += 1
                            state.denoiser_evals += latents.shape[0]
                            noise_pred = (
                                noise_pred
                                + (noise_pred_text - noise_pred_skip_layers) * self._skip_layer_guidance_scale
                            )
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
                        step_tensors = {
                            "latents": latents,
                            "prompt_embeds": prompt_embeds,
                            "pooled_prompt_embeds": pooled_prompt_embeds,
                        }
                        callback_kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        pooled_prompt_embeds = callback_outputs.pop("pooled_prompt_embeds", pooled_prompt_embeds)

                    # call the callback, if provided
                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                        progress_bar.update()

                    if _sd3.XLA_AVAILABLE:
                        _sd3.xm.mark_step()

            # 8. Decode, then the output stage (scoring, selection)
            image = None
            if not output_type == "latent" or runner.has(Stage.OUTPUT):
                scaled = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
                image = self.vae.decode(scaled, return_dict=False)[0]
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


@register_family("sd3", AlignedStableDiffusion3Pipeline)
class StableDiffusion3Family(ModelFamily):
    """Stable Diffusion 3 / 3.5: an `SD3Transformer2DModel` (MMDiT) with joint attention over [image, text] tokens,
    the text being CLIP-L and CLIP-G's penultimate states side by side (77 tokens, zero-padded to T5's width) followed
    by T5's tokens; the pooled CLIP embeddings as an added input; velocity prediction on a flow-matching schedule; LoRA
    in diffusers' SD3 format."""

    name = "Stable Diffusion 3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser_attribute = "transformer"
    # cross_attention: the text view of joint attention
    features = frozenset({"cross_attention", "joint_attention", "flow_matching", "stochastic_steps"})
    attention_defaults = {"normalize_eot": True, "from_where": ("joint",), "parts": ("joint",)}

    @property
    def clip_length(self) -> int:
        """The CLIP tokens at the start of the text sequence (77 for SD3's tokenizers): the pipeline's
        `tokenizer_max_length`, the length its CLIP prompts are padded to."""
        return self.pipe.tokenizer_max_length

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        pipe = self.pipe
        return [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_streams(self) -> list[TextStream]:
        pipe = self.pipe
        first = pipe.text_encoder.config.hidden_size
        second = first + pipe.text_encoder_2.config.hidden_size
        clip = slice(0, self.clip_length)
        streams = [
            TextStream(pipe.tokenizer, "prompt", slice(0, first), clip),
            TextStream(pipe.tokenizer_2, "prompt_2", slice(first, second), clip),
        ]
        if pipe.text_encoder_3 is not None:
            streams.append(TextStream(pipe.tokenizer_3, "prompt_3", slice(None), slice(self.clip_length, None)))
        return streams

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
        max_sequence_length: int = 256,
        **options,
    ):
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_cfg,
            device=device,
            clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
        )
        return Conditioning(
            embeds,
            negative if do_cfg else None,
            {"pooled_projections": pooled},
            {"pooled_projections": negative_pooled} if do_cfg else {},
        )

    # --- the denoiser ----------------------------------------------------------------------------------------------

    def forward(self, latents, timestep, cond, cfg):
        embeds, added = cond.batch(cfg)
        timestep = torch.as_tensor(timestep, device=latents.device)
        timestep = timestep.expand(latents.shape[0]) if timestep.ndim == 0 else timestep
        return self.denoiser(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=embeds,
            pooled_projections=added["pooled_projections"],
            joint_attention_kwargs=cond.cross_attention_kwargs,
            return_dict=False,
        )[0]

    # --- latents ---------------------------------------------------------------------------------------------------

    def set_timesteps(
        self, num_inference_steps, device, height=None, width=None, timesteps=None, sigmas=None, mu=None
    ):
        config = self.scheduler.config
        if config.get("use_dynamic_shifting", None) and mu is None:
            size = self.default_image_size
            latent_h, latent_w = self.latent_grid(height or size, width or size)
            patch = self.base_denoiser.config.patch_size
            mu = calculate_shift(
                (latent_h // patch) * (latent_w // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        kwargs = {} if mu is None else {"mu": mu}
        return retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas, **kwargs)[0]

    def latents_shape(self, batch, height, width):
        factor = self.pipe.vae_scale_factor
        return (batch, self.base_denoiser.config.in_channels, height // factor, width // factor)

    @property
    def default_image_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.base_denoiser.config.patch_size

    def decode(self, latents, height=None, width=None):
        vae = self.vae
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(scaled, return_dict=False)[0]

    def encode_images(self, images):
        vae = self.vae
        latents = vae.encode(images.to(vae.dtype)).latent_dist.mean
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    # --- attention -------------------------------------------------------------------------------------------------

    def install_attention_control(self, control) -> None:
        install_joint_control(self.base_denoiser, control, text_first=False, part_of=lambda name: "joint")

    def cross_attention_resolutions(self, latent_height, latent_width):
        patch = self.base_denoiser.config.patch_size
        return [(latent_height // patch, latent_width // patch)]

    def _t5_spans(self, prompt, words):
        if self.pipe.text_encoder_3 is None:
            return [[] for _ in words]
        spans = super().token_spans(prompt, words, self.pipe.tokenizer_3)
        return [[self.clip_length + i for i in span] for span in spans]

    def token_spans(self, prompt, words, tokenizer=None):
        """Each word's positions among the text keys: its CLIP tokens (after the start token) and its T5 pieces."""
        if tokenizer is not None:
            return super().token_spans(prompt, words, tokenizer)
        clip = super().token_spans(prompt, words, self.pipe.tokenizer)
        return [c + t for c, t in zip(clip, self._t5_spans(prompt, words))]

    def attention_token_positions(self, prompt, exclude_padding):
        pipe = self.pipe
        clip = super().attention_token_positions(prompt, exclude_padding)
        if pipe.text_encoder_3 is None:
            return clip
        length = len(pipe.tokenizer_3(prompt).input_ids) - 1 if exclude_padding else None  # T5 has no start token
        t5 = (
            range(self.clip_length, self.clip_length + length)
            if length is not None
            else range(self.clip_length, self.clip_length + pipe.tokenizer_3.model_max_length)
        )
        return clip + list(t5)

    # --- LoRA ------------------------------------------------------------------------------------------------------

    def aligned_pipeline(self):
        return AlignedStableDiffusion3Pipeline.from_pipe(self.pipe)

    def save_lora(self, directory, denoiser_layers) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = convert_state_dict_to_diffusers(denoiser_layers)
        self.pipeline_class.save_lora_weights(directory, transformer_lora_layers=layers, safe_serialization=True)
