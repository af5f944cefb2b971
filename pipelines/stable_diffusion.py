"""`AlignedStableDiffusionPipeline`: diffusers' `StableDiffusionPipeline` with alignment methods.

With no methods it returns exactly what its parent returns for the same components and seed; each method acts
at the numbered stages of the call through :mod:`ttalign.hooks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion as _sd
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import deprecate

from ttalign.hooks import AlignmentRunner, GenerationState, Stage

from .base import AlignedPipelineMixin, ParentCall, uses_sampling_defaults
from .family import Conditioning, ModelFamily, TextStream, register_family


@dataclass
class AlignedPipelineOutput(StableDiffusionPipelineOutput):
    """Output of an aligned pipeline.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images, as in `StableDiffusionPipelineOutput`.
        nsfw_content_detected (`list[bool]`, *optional*):
            The safety checker's verdicts, as in `StableDiffusionPipelineOutput`.
        rewards (`torch.Tensor`, *optional*):
            `[N]` reward of each returned image, when a method scored them.
        traces (`dict`):
            What the methods recorded (per-step latents, reward curves, ...) and `traces["compute"]`: denoiser
            calls, denoiser evaluations (`nfe`), VAE decodes, reward calls and wall time of the call.
    """

    rewards: torch.Tensor | None = None
    traces: dict[str, Any] | None = None


class AlignedStableDiffusionPipeline(AlignedPipelineMixin, StableDiffusionPipeline):
    r"""
    [`~diffusers.StableDiffusionPipeline`] with inference-time alignment.

    Every argument of the parent's `__call__` works as there; `alignment` adds a list of
    [`~ttalign.hooks.AlignmentMethod`] objects that act at the stages of the call. Load it like the parent
    (`from_pretrained`, or construction from components), or wrap an existing pipeline with `from_pipe`, which
    shares its modules. Unlike the parent, unknown keyword arguments raise `TypeError`.

    Attributes:
        alignment (`list[AlignmentMethod]`):
            Methods used when a call passes no `alignment` (set by [`ttalign.align`]); empty by default.
        sampling_defaults (`dict`):
            Call arguments a call leaves out take these values (read from the model folder's
            `ttalign_sampling.json`); empty by default.

    Examples:

    ```py
    >>> import torch
    >>> from ttalign import AlignedStableDiffusionPipeline
    >>> from ttalign.methods import BestOfN
    >>> from ttalign.rewards import JpegIncompressibility

    >>> pipe = AlignedStableDiffusionPipeline.from_pretrained(
    ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16
    ... ).to("cuda")
    >>> # or share the modules of a pipeline you already have: AlignedStableDiffusionPipeline.from_pipe(pipe)
    >>> out = pipe("a red cube on a blue sphere", alignment=[BestOfN(reward=JpegIncompressibility(), n=4)])
    >>> out.images[0], out.rewards, out.traces["compute"]
    ```
    """

    # A copy of diffusers 0.42.1's `StableDiffusionPipeline.__call__`, with the stages added;
    # `parent_call` records the parent's fingerprint (tests/test_parent_calls.py fails when it differs).
    parent_call = ParentCall("0.42.1", "35adac16365e855fe0e14894929ded8660da4339907144fc09f07b5b9d91bf11")

    @uses_sampling_defaults
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the parent's signature)
        *,
        alignment: list | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int | None = None,
    ) -> AlignedPipelineOutput | tuple:
        r"""
        The call function of the pipeline: the parent's arguments, plus `alignment`.

        Args:
            prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale, negative_prompt,
            num_images_per_prompt, eta, generator, latents, prompt_embeds, negative_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, output_type, return_dict, cross_attention_kwargs, guidance_rescale, clip_skip,
            callback_on_step_end, callback_on_step_end_tensor_inputs, callback, callback_steps:
                As in [`~diffusers.StableDiffusionPipeline.__call__`].
            alignment (`AlignmentMethod` or `list[AlignmentMethod]`, *optional*):
                The methods to apply, in order. Defaults to `self.alignment` (empty: plain diffusers behaviour).

        Returns:
            [`AlignedPipelineOutput`] or `tuple`: with `return_dict=False`, the parent's `(images, nsfw)` tuple.
        """
        runner = AlignmentRunner(self.alignment if alignment is None else alignment)

        if callback is not None:
            deprecate(
                "callback",
                "1.0.0",
                "Passing `callback` as an input argument to `__call__` is deprecated, "
                "consider using `callback_on_step_end`",
            )
        if callback_steps is not None:
            deprecate(
                "callback_steps",
                "1.0.0",
                "Passing `callback_steps` as an input argument to `__call__` is "
                "deprecated, consider using `callback_on_step_end`",
            )
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to unet
        if not height or not width:
            sample_size = self.unet.config.sample_size
            height = sample_size if self._is_unet_config_sample_size_int else sample_size[0]
            width = sample_size if self._is_unet_config_sample_size_int else sample_size[1]
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            height,
            width,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
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
            eta=eta,
            num_inference_steps=num_inference_steps,
            generator=generator,
            device=device,
            output_type=output_type,
            user_latents=latents,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            clip_skip=clip_skip,
            schedule_options={"timesteps": timesteps, "sigmas": sigmas},
        )
        with runner.session(state):
            # 2. Prompt stage and call parameters (methods that enlarge the batch set them in `setup`)
            if runner.has(Stage.PROMPT):
                runner.run(Stage.PROMPT, state)
                prompt, negative_prompt = state.prompt, state.negative_prompt
            num_images_per_prompt, generator = state.num_images_per_prompt, state.generator
            if prompt is not None and isinstance(prompt, str):
                batch_size = 1
            elif prompt is not None and isinstance(prompt, list):
                batch_size = len(prompt)
            else:
                batch_size = prompt_embeds.shape[0]

            # 3. Encode input prompt, then the conditioning stage
            lora_scale = (
                self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
            )
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=self.clip_skip,
            )
            state.conditioning = Conditioning(
                prompt_embeds, negative_prompt_embeds, cross_attention_kwargs=self.cross_attention_kwargs
            )
            if runner.has(Stage.CONDITIONING):
                runner.run(Stage.CONDITIONING, state)
                prompt_embeds, negative_prompt_embeds = state.prompt_embeds, state.negative_prompt_embeds
            # classifier-free guidance runs the unconditional and conditional batches in one forward pass
            if self.do_classifier_free_guidance:
                prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

            if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
                image_embeds = self.prepare_ip_adapter_image_embeds(
                    ip_adapter_image,
                    ip_adapter_image_embeds,
                    device,
                    batch_size * num_images_per_prompt,
                    self.do_classifier_free_guidance,
                )
                state.family.add_image_embeds(state.conditioning, image_embeds, self.do_classifier_free_guidance)
            state.family.add_guidance_embedding(state.conditioning, guidance_scale)

            # 4. Prepare timesteps
            timestep_device = "cpu" if _sd.XLA_AVAILABLE else device
            timesteps, num_inference_steps = retrieve_timesteps(
                self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
            )
            state.timesteps = timesteps

            # 5. Prepare latent variables, then the init_latents stage
            num_channels_latents = self.unet.config.in_channels
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
            # The attention stage: methods install their attention processors for this call; before init_latents, so
            # that searches over the initial noise render their candidates with them
            if runner.has(Stage.ATTENTION):
                state.latents = latents
                runner.run(Stage.ATTENTION, state)
            if runner.has(Stage.INIT_LATENTS):
                state.latents = latents
                runner.run(Stage.INIT_LATENTS, state)
                latents = state.latents

            # 6. Prepare extra step kwargs
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

            # 6.1 Add image embeds for IP-Adapter
            added_cond_kwargs = (
                {"image_embeds": image_embeds}
                if (ip_adapter_image is not None or ip_adapter_image_embeds is not None)
                else None
            )

            # 6.2 Optionally get Guidance Scale Embedding
            timestep_cond = None
            if self.unet.config.time_cond_proj_dim is not None:
                guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(
                    batch_size * num_images_per_prompt
                )
                timestep_cond = self.get_guidance_scale_embedding(
                    guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
                ).to(device=device, dtype=latents.dtype)

            # 7. Denoising loop
            num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
            self._num_timesteps = len(timesteps)
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
                    if hasattr(self.scheduler, "scale_model_input"):
                        latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                    # predict the noise residual
                    noise_pred = self.unet(
                        latent_model_input,
                        t,
                        encoder_hidden_states=prompt_embeds,
                        timestep_cond=timestep_cond,
                        cross_attention_kwargs=self.cross_attention_kwargs,
                        added_cond_kwargs=added_cond_kwargs,
                        return_dict=False,
                    )[0]
                    state.denoiser_calls += 1
                    state.denoiser_evals += latents.shape[0]

                    # perform guidance
                    if self.do_classifier_free_guidance:
                        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                    if self.do_classifier_free_guidance and self.guidance_rescale > 0.0:
                        # Based on 3.4. in https://huggingface.co/papers/2305.08891
                        noise_pred = rescale_noise_cfg(
                            noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale
                        )
                    if runner.has(Stage.NOISE_PRED):
                        state.latents, state.noise_pred = latents, noise_pred
                        runner.run(Stage.NOISE_PRED, state)
                        noise_pred = state.noise_pred

                    # compute the previous noisy sample x_t -> x_t-1
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    if runner.has(Stage.STEP_END):
                        state.latents = latents
                        runner.run(Stage.STEP_END, state)
                        latents = state.latents

                    if callback_on_step_end is not None:
                        step_tensors = {
                            "latents": latents,
                            "prompt_embeds": prompt_embeds,
                            "negative_prompt_embeds": negative_prompt_embeds,
                        }
                        callback_kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                        progress_bar.update()
                        if callback is not None and i % callback_steps == 0:
                            step_idx = i // getattr(self.scheduler, "order", 1)
                            callback(step_idx, t, latents)

                    if _sd.XLA_AVAILABLE:
                        _sd.xm.mark_step()

            # 8. Decode, then the output stage (scoring, selection)
            image = None
            if not output_type == "latent" or runner.has(Stage.OUTPUT):
                image = self.vae.decode(
                    latents / self.vae.config.scaling_factor, return_dict=False, generator=generator
                )[0]
                state.vae_decodes += latents.shape[0]
            if runner.has(Stage.OUTPUT):
                state.latents, state.decoded = latents, image
                runner.run(Stage.OUTPUT, state)
                latents, image = state.latents, state.decoded

            if not output_type == "latent":
                image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
            else:
                image = latents
                has_nsfw_concept = None

            if has_nsfw_concept is None:
                do_denormalize = [True] * image.shape[0]
            else:
                do_denormalize = [not has_nsfw for has_nsfw in has_nsfw_concept]
            if _sd.XLA_AVAILABLE:
                _sd.xm.mark_step()
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept)
        state.traces["compute"] = state.compute()
        return AlignedPipelineOutput(
            images=image, nsfw_content_detected=has_nsfw_concept, rewards=state.rewards, traces=state.traces
        )


class ControlProcessor:
    """Attention processor for one attention layer of a UNet, installed by the call's attention control: the layer's
    original processor (SDPA, LoRA, IP-Adapter...) unless a hook of the :class:`~ttalign.attention.AttentionControl`
    wants this call, which then takes diffusers' classic explicit computation with the hooks on logits and
    probabilities."""

    def __init__(self, original, name: str, control):
        self.original, self.name, self.control = original, name, control
        first = name.split(".")[0]
        self.part = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(first)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        control = self.control
        is_cross = encoder_hidden_states is not None
        if hidden_states.ndim == 4:
            query_len = hidden_states.shape[-1] * hidden_states.shape[-2]
        else:
            query_len = hidden_states.shape[1]
        ctx = control.context(self.name, is_cross, query_len, self.part)
        recorders = [f for f in control.recorders if control.recording and f.wants(ctx)]
        logit_hooks = [f for f in control.logit_hooks if f.wants(ctx)]
        prob_hooks = [f for f in control.prob_hooks if f.wants(ctx)]
        if not (recorders or logit_hooks or prob_hooks):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        out = self.explicit(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, ctx, recorders, logit_hooks, prob_hooks
        )
        control.check_stop(self.name)
        return out

    @staticmethod
    def explicit(
        attn, hidden_states, encoder_hidden_states, attention_mask, temb, ctx, recorders, logit_hooks, prob_hooks
    ):
        """diffusers' classic `AttnProcessor` computation, with the hooks on the logits and probabilities."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))  # [B * heads, n, d]

        if logit_hooks:
            scores = attn.scale * query @ key.transpose(-1, -2)  # [B * heads, q, k]
            if attention_mask is not None:
                scores = scores + attention_mask
            if attn.upcast_softmax:
                scores = scores.float()
            for hook in logit_hooks:
                changed = hook(ctx, scores)
                scores = scores if changed is None else changed
            probs = scores.softmax(dim=-1).to(query.dtype)
        else:
            probs = attn.get_attention_scores(query, key, attention_mask)
        for hook in prob_hooks:
            changed = hook(ctx, probs)
            probs = probs if changed is None else changed
        for recorder in recorders:
            recorder(ctx, probs)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@register_family("sd", AlignedStableDiffusionPipeline)
class StableDiffusionFamily(ModelFamily):
    """Stable Diffusion 1.x / 2.x: a `UNet2DConditionModel` with cross-attention to one CLIP text encoder's tokens,
    epsilon or v prediction, a `AutoencoderKL`, LoRA in diffusers' SD format."""

    name = "Stable Diffusion"
    pipeline_class = StableDiffusionPipeline
    features = frozenset({"cross_attention", "stochastic_steps"})

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipe.text_encoder]

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_streams(self) -> list[TextStream]:
        return [TextStream(self.pipe.tokenizer, "prompt", slice(None))]

    # --- conditioning -----------------------------------------------------------------------------------------------

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
        **options,
    ):
        cond, uncond = self.pipe.encode_prompt(
            prompts, device, num_images_per_prompt, do_cfg, negative_prompt, clip_skip=clip_skip
        )
        conditioning = Conditioning(cond, uncond if do_cfg else None)
        if guidance_scale is not None:
            self.add_guidance_embedding(conditioning, guidance_scale)
        return conditioning

    @staticmethod
    def add_image_embeds(cond: Conditioning, image_embeds: list[torch.Tensor], cfg: bool) -> None:
        """Adds the IP-Adapter image embeddings of a call (`[2N, ...]` each, unconditional first, with `cfg`)."""
        if cfg:
            cond.negative_added["image_embeds"] = [e.chunk(2)[0] for e in image_embeds]
            cond.added["image_embeds"] = [e.chunk(2)[1] for e in image_embeds]
        else:
            cond.added["image_embeds"] = list(image_embeds)

    def add_guidance_embedding(self, cond: Conditioning, guidance_scale: float) -> None:
        """Adds the guidance-scale embedding of a UNet distilled with one (`time_cond_proj_dim`, LCM)."""
        dim = self.denoiser.config.time_cond_proj_dim
        if dim is None:
            return
        w = torch.tensor(guidance_scale - 1).repeat(cond.batch_size)
        embedding = self.pipe.get_guidance_scale_embedding(w, embedding_dim=dim)
        embedding = embedding.to(device=cond.prompt_embeds.device, dtype=cond.prompt_embeds.dtype)
        cond.added["timestep_cond"] = embedding
        if cond.has_negative:
            cond.negative_added["timestep_cond"] = embedding

    # --- the denoiser -----------------------------------------------------------------------------------------------

    def forward(self, latents, timestep, cond, cfg):
        embeds, added = cond.batch(cfg)
        timestep_cond = added.pop("timestep_cond", None)
        return self.denoiser(
            latents,
            timestep,
            encoder_hidden_states=embeds,
            timestep_cond=timestep_cond,
            cross_attention_kwargs=cond.cross_attention_kwargs,
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]

    # --- latents ----------------------------------------------------------------------------------------------------

    def latents_shape(self, batch, height, width):
        factor = self.pipe.vae_scale_factor
        return (batch, self.base_denoiser.config.in_channels, height // factor, width // factor)

    @property
    def default_image_size(self) -> int:
        sample_size = self.base_denoiser.config.sample_size
        return (sample_size if isinstance(sample_size, int) else sample_size[0]) * self.pipe.vae_scale_factor

    def decode(self, latents, height=None, width=None):
        vae = self.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    def encode_images(self, images):
        vae = self.vae
        return vae.encode(images.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor

    # --- attention --------------------------------------------------------------------------------------------------

    def install_attention_control(self, control) -> None:
        denoiser = self.base_denoiser
        originals = denoiser.attn_processors
        denoiser.set_attn_processor({name: ControlProcessor(proc, name, control) for name, proc in originals.items()})

    def cross_attention_resolutions(self, latent_height, latent_width):
        config = self.base_denoiser.config
        down = list(config.down_block_types)
        levels = len(down)
        sizes = set()
        for i, kind in enumerate(down):
            if "CrossAttn" in kind:
                sizes.add(i)
        for j, kind in enumerate(config.up_block_types):
            if "CrossAttn" in kind:
                sizes.add(levels - 1 - j)
        if config.mid_block_type is not None and "CrossAttn" in config.mid_block_type:
            sizes.add(levels - 1)
        return sorted(((-(-latent_height // 2**i)), (-(-latent_width // 2**i))) for i in sizes)[::-1]

    # --- LoRA -------------------------------------------------------------------------------------------------------

    def aligned_pipeline(self):
        return AlignedStableDiffusionPipeline.from_pipe(self.pipe)

    def save_lora(self, directory, denoiser_layers) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = convert_state_dict_to_diffusers(denoiser_layers)
        self.pipeline_class.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
