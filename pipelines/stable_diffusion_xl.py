"""`AlignedStableDiffusionXLPipeline`: diffusers' `StableDiffusionXLPipeline` with alignment methods, and the SDXL
model family.

With no methods it returns exactly what its parent returns for the same components and seed; each method acts at
the numbered stages of the call through :mod:`ttalign.hooks`, as on Stable Diffusion 1.x/2.x. SDXL-Turbo and
SDXL-Lightning are SDXL pipelines with one- to four-step schedules: the same class runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl as _sdxl
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import deprecate
from diffusers.utils.torch_utils import get_module_execution_device

from ttalign.hooks import AlignmentRunner, GenerationState, Stage

from .base import AlignedPipelineMixin, ParentCall, uses_sampling_defaults
from .family import Conditioning, TextStream, register_family
from .stable_diffusion import AlignedPipelineOutput, StableDiffusionFamily


class AlignedStableDiffusionXLPipeline(AlignedPipelineMixin, StableDiffusionXLPipeline):
    r"""
    [`~diffusers.StableDiffusionXLPipeline`] with inference-time alignment.

    Every argument of the parent's `__call__` works as there (`prompt_2`, size and crop conditioning and their
    negatives, `denoising_end`, `guidance_rescale`, `clip_skip`, IP-Adapter inputs, `callback_on_step_end`...);
    `alignment` adds a list of [`~ttalign.hooks.AlignmentMethod`] objects that act at the stages of the call. Load it
    like the parent (`from_pretrained`, or construction from components), or wrap an existing pipeline with
    `from_pipe`, which shares its modules. Unlike the parent, unknown keyword arguments raise `TypeError`.

    Attributes:
        alignment (`list[AlignmentMethod]`):
            Methods used when a call passes no `alignment` (set by [`ttalign.align`]); empty by default.
        sampling_defaults (`dict`):
            Call arguments a call leaves out take these values (read from the model folder's
            `ttalign_sampling.json`); empty by default.

    Examples:

    ```py
    >>> import torch
    >>> from ttalign import AlignedStableDiffusionXLPipeline
    >>> from ttalign.methods import AttendAndExcite

    >>> pipe = AlignedStableDiffusionXLPipeline.from_pretrained(
    ...     "stabilityai/stable-diffusion-xl-base-1.0", dtype=torch.float16
    ... ).to("cuda")
    >>> out = pipe("a cat and a frog", alignment=[AttendAndExcite(tokens=["cat", "frog"])])
    >>> out.images[0], out.traces["compute"]
    ```
    """

    # A copy of diffusers 0.42.1's `StableDiffusionXLPipeline.__call__`, with the stages added;
    # `parent_call` records the parent's fingerprint (tests/test_parent_calls.py fails when it differs).
    parent_call = ParentCall("0.42.1", "4d58fbfc599e50c2dead3d62e07d7d09d34f9cfa9a1997ebf61086f1303fe358")

    @uses_sampling_defaults
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
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
            prompt, prompt_2, height, width, num_inference_steps, timesteps, sigmas, denoising_end, guidance_scale,
            negative_prompt, negative_prompt_2, num_images_per_prompt, eta, generator, latents, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, output_type, return_dict, cross_attention_kwargs, guidance_rescale,
            original_size, crops_coords_top_left, target_size, negative_original_size, negative_crops_coords_top_left,
            negative_target_size, clip_skip, callback_on_step_end, callback_on_step_end_tensor_inputs, callback,
            callback_steps:
                As in [`~diffusers.StableDiffusionXLPipeline.__call__`].
            alignment (`AlignmentMethod` or `list[AlignmentMethod]`, *optional*):
                The methods to apply, in order. Defaults to `self.alignment` (empty: plain diffusers behaviour).

        Returns:
            [`~ttalign.pipelines.AlignedPipelineOutput`] or `tuple`: with `return_dict=False`, the parent's
            `(images,)` tuple. `nsfw_content_detected` is `None` (SDXL has no safety checker).
        """
        runner = AlignmentRunner(self.alignment if alignment is None else alignment)

        if callback is not None:
            deprecate(
                "callback",
                "1.0.0",
                "Passing `callback` as an input argument to `__call__` is deprecated, "
                "consider use `callback_on_step_end`",
            )
        if callback_steps is not None:
            deprecate(
                "callback_steps",
                "1.0.0",
                "Passing `callback_steps` as an input argument to `__call__` is "
                "deprecated, consider use `callback_on_step_end`",
            )
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to unet
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        original_size = original_size or (height, width)
        target_size = target_size or (height, width)

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            callback_steps,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
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
            extra_prompts={"prompt_2": prompt_2, "negative_prompt_2": negative_prompt_2},
            schedule_options={"timesteps": timesteps, "sigmas": sigmas},
        )
        with runner.session(state):
            # 2. Prompt stage and call parameters (methods that enlarge the batch set them in `setup`)
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

            # 3. Encode input prompt
            lora_scale = (
                self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
            )

            (
                prompt_embeds,
                negative_prompt_embeds,
                pooled_prompt_embeds,
                negative_pooled_prompt_embeds,
            ) = self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=self.clip_skip,
            )

            # 3.1 Prepare added time ids & embeddings (the parent's step 7, here so that methods see the whole
            # conditioning from the conditioning stage on; it draws no random numbers)
            if self.text_encoder_2 is None:
                text_encoder_projection_dim = int(pooled_prompt_embeds.shape[-1])
            else:
                text_encoder_projection_dim = self.text_encoder_2.config.projection_dim

            add_time_ids = self._get_add_time_ids(
                original_size,
                crops_coords_top_left,
                target_size,
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=text_encoder_projection_dim,
            )
            if negative_original_size is not None and negative_target_size is not None:
                negative_add_time_ids = self._get_add_time_ids(
                    negative_original_size,
                    negative_crops_coords_top_left,
                    negative_target_size,
                    dtype=prompt_embeds.dtype,
                    text_encoder_projection_dim=text_encoder_projection_dim,
                )
            else:
                negative_add_time_ids = add_time_ids
            state.conditioning = StableDiffusionXLFamily.call_conditioning(
                prompt_embeds,
                negative_prompt_embeds,
                pooled_prompt_embeds,
                negative_pooled_prompt_embeds,
                add_time_ids,
                negative_add_time_ids,
                self.do_classifier_free_guidance,
                device,
                self.cross_attention_kwargs,
            )

            # 3.2 The conditioning stage, then the denoiser's batch (classifier-free guidance: unconditional first)
            if runner.has(Stage.CONDITIONING):
                runner.run(Stage.CONDITIONING, state)
            prompt_embeds, added = state.conditioning.batch(self.do_classifier_free_guidance)
            add_text_embeds, add_time_ids = added["text_embeds"], added["time_ids"]
            prompt_embeds = prompt_embeds.to(device)
            add_text_embeds = add_text_embeds.to(device)

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
            is_neuron_device = device.type == "neuron"
            if _sdxl.XLA_AVAILABLE or is_neuron_device:
                timestep_device = "cpu"
            else:
                timestep_device = device
            timesteps, num_inference_steps = retrieve_timesteps(
                self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
            )

            # 4.1 Apply denoising_end (the parent's step 8.1, here so that methods see the steps that will run)
            if (
                self.denoising_end is not None
                and isinstance(self.denoising_end, float)
                and self.denoising_end > 0
                and self.denoising_end < 1
            ):
                discrete_timestep_cutoff = int(
                    round(
                        self.scheduler.config.num_train_timesteps
                        - (self.denoising_end * self.scheduler.config.num_train_timesteps)
                    )
                )
                num_inference_steps = len(list(filter(lambda ts: ts >= discrete_timestep_cutoff, timesteps)))
                timesteps = timesteps[:num_inference_steps]
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

            # 6. Prepare extra step kwargs.
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

            # 8. Denoising loop
            num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)

            # 9. Optionally get Guidance Scale Embedding
            timestep_cond = None
            if self.unet.config.time_cond_proj_dim is not None:
                guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(
                    batch_size * num_images_per_prompt
                )
                timestep_cond = self.get_guidance_scale_embedding(
                    guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
                ).to(device=device, dtype=latents.dtype)

            self._num_timesteps = len(timesteps)
            if hasattr(self.scheduler, "set_begin_index"):
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

                    # expand the latents if we are doing classifier free guidance
                    latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                    # predict the noise residual
                    added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
                    if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
                        added_cond_kwargs["image_embeds"] = image_embeds
                    # [Neuron] pre-cast timestep to float32 on device (the compiled UNet needs a float32 timestep)
                    t_unet = t.to(torch.float32).to(device) if is_neuron_device else t
                    noise_pred = self.unet(
                        latent_model_input,
                        t_unet,
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
                    latents_dtype = latents.dtype
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
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
                            "add_text_embeds": add_text_embeds,
                            "add_time_ids": add_time_ids,
                        }
                        callback_kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)

                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        add_text_embeds = callback_outputs.pop("add_text_embeds", add_text_embeds)
                        add_time_ids = callback_outputs.pop("add_time_ids", add_time_ids)

                    # call the callback, if provided
                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                        progress_bar.update()
                        if callback is not None and i % callback_steps == 0:
                            step_idx = i // getattr(self.scheduler, "order", 1)
                            callback(step_idx, t, latents)

                    if _sdxl.XLA_AVAILABLE:
                        _sdxl.xm.mark_step()

            # 10. Decode, then the output stage (scoring, selection)
            image = None
            if not output_type == "latent" or runner.has(Stage.OUTPUT):
                # make sure the VAE is in float32 mode, as it overflows in float16
                needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast

                if needs_upcasting:
                    self.vae.to(dtype=torch.float32)
                    latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
                elif latents.dtype != self.vae.dtype:
                    if torch.backends.mps.is_available():
                        # some platforms (eg. apple mps) misbehave due to a pytorch bug
                        self.vae = self.vae.to(latents.dtype)

                # unscale/denormalize the latents
                # denormalize with the mean and std if available and not None
                has_latents_mean = (
                    hasattr(self.vae.config, "latents_mean") and self.vae.config.latents_mean is not None
                )
                has_latents_std = hasattr(self.vae.config, "latents_std") and self.vae.config.latents_std is not None
                if has_latents_mean and has_latents_std:
                    latents_mean = (
                        torch.tensor(self.vae.config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                    )
                    latents_std = (
                        torch.tensor(self.vae.config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                    )
                    scaled = latents * latents_std / self.vae.config.scaling_factor + latents_mean
                else:
                    scaled = latents / self.vae.config.scaling_factor

                scaled = scaled.to(get_module_execution_device(self.vae))
                image = self.vae.decode(scaled, return_dict=False)[0]
                state.vae_decodes += latents.shape[0]

                # cast back to fp16 if needed
                if needs_upcasting:
                    self.vae.to(dtype=torch.float16)
            if runner.has(Stage.OUTPUT):
                state.latents, state.decoded = latents, image
                runner.run(Stage.OUTPUT, state)
                latents, image = state.latents, state.decoded

            if not output_type == "latent":
                # apply watermark if available
                if self.watermark is not None:
                    image = self.watermark.apply_watermark(image)

                image = self.image_processor.postprocess(image, output_type=output_type)
            else:
                image = latents

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        state.traces["compute"] = state.compute()
        return AlignedPipelineOutput(
            images=image, nsfw_content_detected=None, rewards=state.rewards, traces=state.traces
        )


@register_family("sdxl", AlignedStableDiffusionXLPipeline)
class StableDiffusionXLFamily(StableDiffusionFamily):
    """Stable Diffusion XL (and SDXL-Turbo / Lightning): a `UNet2DConditionModel` attending to the tokens of two CLIP
    text encoders (their penultimate states side by side, 768 + 1280 features), with the second encoder's pooled
    output and the size and crop conditioning (`time_ids`) as added inputs; LoRA in diffusers' SDXL format."""

    name = "Stable Diffusion XL"
    pipeline_class = StableDiffusionXLPipeline
    # end and padding tokens left out of A&E's maps, as for SD 2.x
    attention_defaults = {**StableDiffusionFamily.attention_defaults, "normalize_eot": True}

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2) if m is not None]

    @property
    def tokenizer(self):
        return self.pipe.tokenizer if self.pipe.tokenizer is not None else self.pipe.tokenizer_2

    @property
    def text_streams(self) -> list[TextStream]:
        pipe = self.pipe
        if pipe.text_encoder is None:  # the refiner: the second encoder alone
            return [TextStream(pipe.tokenizer_2, "prompt_2", slice(None))]
        first = pipe.text_encoder.config.hidden_size
        return [
            TextStream(pipe.tokenizer, "prompt", slice(0, first)),
            TextStream(pipe.tokenizer_2, "prompt_2", slice(first, None)),
        ]

    # --- conditioning -----------------------------------------------------------------------------------------------

    @staticmethod
    def call_conditioning(
        prompt_embeds,
        negative_prompt_embeds,
        pooled,
        negative_pooled,
        add_time_ids,
        negative_add_time_ids,
        cfg,
        device,
        cross_attention_kwargs=None,
    ):
        """The conditioning of a call, per image, from the tensors the pipeline computes (`add_time_ids` `[1, 6]`).

        diffusers repeats the `[negative, positive]` pair of time ids over the whole `[2N]` CFG batch, so with `N > 1`
        rows alternate between the two whatever branch they belong to; that is reproduced here, so that the images
        stay diffusers' (it matters only with `negative_original_size` / `negative_target_size`)."""
        n = prompt_embeds.shape[0]
        if cfg:
            ids = torch.cat([negative_add_time_ids, add_time_ids], dim=0).to(device).repeat(n, 1)  # [2N, 6]
            return Conditioning(
                prompt_embeds,
                negative_prompt_embeds,
                {"text_embeds": pooled, "time_ids": ids[n:]},
                {"text_embeds": negative_pooled, "time_ids": ids[:n]},
                cross_attention_kwargs,
            )
        ids = add_time_ids.to(device).repeat(n, 1)  # [N, 6]
        return Conditioning(
            prompt_embeds,
            None,
            {"text_embeds": pooled, "time_ids": ids},
            cross_attention_kwargs=cross_attention_kwargs,
        )

    def _time_ids(self, original_size, crop, target_size, dtype) -> torch.Tensor:
        pipe = self.pipe
        projection = (
            pipe.text_encoder_2.config.projection_dim
            if pipe.text_encoder_2 is not None
            else self.base_denoiser.add_embedding.linear_1.in_features
            - 6 * self.base_denoiser.config.addition_time_embed_dim
        )
        return pipe._get_add_time_ids(
            tuple(original_size), tuple(crop), tuple(target_size), dtype=dtype, text_encoder_projection_dim=projection
        )

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
        height = height or self.default_image_size
        width = width or self.default_image_size
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
            clip_skip=clip_skip,
        )
        ids = self._time_ids((height, width), (0, 0), (height, width), embeds.dtype)
        conditioning = self.call_conditioning(embeds, negative, pooled, negative_pooled, ids, ids, do_cfg, device)
        if guidance_scale is not None:
            self.add_guidance_embedding(conditioning, guidance_scale)
        return conditioning

    def training_conditioning(
        self, prompts, device, image_sizes=None, crops=None, size=None, **options
    ) -> Conditioning:
        size = size or self.default_image_size
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False, **options
        )
        image_sizes = image_sizes or [(size, size)] * len(prompts)
        crops = crops or [(0, 0)] * len(prompts)
        ids = torch.cat([self._time_ids(s, c, (size, size), embeds.dtype) for s, c in zip(image_sizes, crops)])
        return Conditioning(embeds, None, {"text_embeds": pooled, "time_ids": ids.to(device)})

    # --- latents ----------------------------------------------------------------------------------------------------

    @property
    def default_image_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def _latent_stats(self, latents):
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        view = (1, len(mean), 1, 1)
        return (
            torch.tensor(mean).view(view).to(latents.device, latents.dtype),
            torch.tensor(std).view(view).to(latents.device, latents.dtype),
        )

    def decode(self, latents, height=None, width=None):
        vae = self.vae
        needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcasting:  # SDXL's VAE overflows in float16: decode in float32, as the pipeline does
            vae.to(dtype=torch.float32)
        try:
            latents = latents.to(vae.dtype)
            stats = self._latent_stats(latents)
            if stats is not None:
                latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
            else:
                latents = latents / vae.config.scaling_factor
            return vae.decode(latents, return_dict=False)[0]
        finally:
            if needs_upcasting:
                vae.to(dtype=torch.float16)

    def encode_images(self, images):
        vae = self.vae
        latents = vae.encode(images.to(vae.dtype)).latent_dist.mean
        stats = self._latent_stats(latents)
        if stats is not None:
            return (latents - stats[0]) * vae.config.scaling_factor / stats[1]
        return latents * vae.config.scaling_factor

    # --- LoRA -------------------------------------------------------------------------------------------------------

    def aligned_pipeline(self):
        return AlignedStableDiffusionXLPipeline.from_pipe(self.pipe)
