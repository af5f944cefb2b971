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
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import deprecate

from ttalign.hooks import AlignmentRunner, GenerationState, Stage


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


class AlignedStableDiffusionPipeline(StableDiffusionPipeline):
    r"""
    [`~diffusers.StableDiffusionPipeline`] with inference-time alignment.

    Every argument of the parent's `__call__` works as there; `alignment` adds a list of
    [`~ttalign.hooks.AlignmentMethod`] objects that act at the stages of the call. Load it like the parent
    (`from_pretrained`, or construction from components), or wrap an existing pipeline with `from_pipe`, which
    shares its modules. Unlike the parent, unknown keyword arguments raise `TypeError`.

    Attributes:
        alignment (`list[AlignmentMethod]`):
            Methods used when a call passes no `alignment` (set by [`ttalign.align`]); empty by default.

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

    alignment: list = []

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
            deprecate("callback", "1.0.0", "Passing `callback` as an input argument to `__call__` is deprecated, "
                      "consider using `callback_on_step_end`")  # fmt: skip
        if callback_steps is not None:
            deprecate("callback_steps", "1.0.0", "Passing `callback_steps` as an input argument to `__call__` is "
                      "deprecated, consider using `callback_on_step_end`")  # fmt: skip
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
        )
        with runner.session(state):
            # 2. Prompt stage and call parameters
            if runner.has(Stage.PROMPT):
                runner.run(Stage.PROMPT, state)
                prompt, negative_prompt = state.prompt, state.negative_prompt
            num_images_per_prompt = state.num_images_per_prompt
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
            state.prompt_embeds, state.negative_prompt_embeds = prompt_embeds, negative_prompt_embeds
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

            # 4. Prepare timesteps
            timesteps, num_inference_steps = retrieve_timesteps(
                self.scheduler, num_inference_steps, device, timesteps, sigmas
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

            # 6.3 Attention stage: methods install their attention processors for this call
            if runner.has(Stage.ATTENTION):
                state.latents = latents
                runner.run(Stage.ATTENTION, state)

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
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept)
        state.traces["compute"] = state.compute()
        return AlignedPipelineOutput(
            images=image, nsfw_content_detected=has_nsfw_concept, rewards=state.rewards, traces=state.traces
        )
