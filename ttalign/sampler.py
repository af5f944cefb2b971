"""The differentiable sampler: a pipeline's denoising loop through its model family, differentiable end to end, with
per-step gradient checkpointing. Noise optimization, seed search, particle steering and reward backpropagation sample
through it; the step math it runs is :mod:`ttalign.sampling`'s.
"""

from __future__ import annotations

import contextlib

import torch

from ttalign.hooks import block_checkpointing
from ttalign.pipelines.family import Conditioning, family_for
from ttalign.sampling import scale_model_input, scheduler_kind, scheduler_step, step_noise_std


def check_gradient_checkpointing(mode) -> None:
    """Refuse a `gradient_checkpointing` mode other than `True`, `False` or `"blocks"`, naming it."""
    if not (isinstance(mode, bool) or mode == "blocks"):
        raise ValueError(f"gradient_checkpointing must be True, False or 'blocks', got {mode!r}.")


class DifferentiableSampler:
    """The denoising loop over a pipeline's own denoiser, VAE and scheduler, differentiable end to end.

    It runs the same update as the pipeline's loop (classifier-free guidance, `scale_model_input`, the scheduler's
    rule through :func:`scheduler_step`), so the same initial noise (and injected noises) give the same images; with
    gradients enabled, each step (and the VAE decode) is wrapped in `torch.utils.checkpoint`, so memory stays that of
    one step instead of growing with the number of steps. Noise optimization, seed search, particle steering and
    the trainer's reward backpropagation all sample through it. It knows the model only through its family
    (:class:`~ttalign.pipelines.family.ModelFamily`).

    Args:
        model: a pipeline (or its model family) whose scheduler has had `set_timesteps` called.
        conditioning (`Conditioning`, or `Tensor [N, L, D]`): what the denoiser is conditioned on; a tensor gives the
            conditional token embeddings of a family that needs nothing else (Stable Diffusion), with
            `negative_prompt_embeds` the unconditional ones (classifier-free guidance runs when they are given and
            `guidance_scale > 1`).
        guidance_scale (`float`).
        eta (`float`): DDIM's noise scale.
        gradient_checkpointing (`bool` or `"blocks"`, defaults to `True`): with gradients enabled, `True`
            checkpoints each step and the VAE decode: a backward holds one step's activations through the whole
            denoiser. `"blocks"` also checkpoints the denoiser's blocks inside each step (diffusers' own switches):
            the backward then holds one block's, at one more denoiser forward per step. Worth it where one step's
            graph sets the peak (SDXL, SD3).
        timestep_cond, cross_attention_kwargs: with tensor conditioning, the UNet's guidance embedding and the
            attention processors' arguments.

    The counters `denoiser_calls`, `denoiser_evals` and `vae_decodes` count forward passes (replays under
    checkpointing excluded).

    `step_hooks` (*optional*, set as an attribute) lets a search render its candidates as the pipeline's loop renders
    them: an object whose `__call__(index, latents) -> latents` runs before step `index` (the other methods'
    `step_start` handlers), whose `sync(index)` runs inside the step, also when a checkpoint replays it (the step
    the attention controls act at), and whose `checkpointed(denoiser)` is the context in which the denoiser's blocks
    are checkpointed under `"blocks"` (an attention control's replay-aware one).
    """

    def __init__(
        self,
        model,
        conditioning,
        negative_prompt_embeds=None,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        gradient_checkpointing: bool | str = True,
        timestep_cond=None,
        cross_attention_kwargs=None,
    ):
        self.family = family_for(model)
        self.scheduler = self.family.scheduler
        self.kind = scheduler_kind(self.scheduler)
        if not isinstance(conditioning, Conditioning):
            conditioning = Conditioning(
                conditioning, negative_prompt_embeds, cross_attention_kwargs=cross_attention_kwargs
            )
            if timestep_cond is not None:
                conditioning.added["timestep_cond"] = timestep_cond
                if negative_prompt_embeds is not None:
                    conditioning.negative_added["timestep_cond"] = timestep_cond
        self.conditioning = conditioning
        self.cfg = conditioning.has_negative and guidance_scale > 1
        self.guidance_scale, self.eta = guidance_scale, eta
        check_gradient_checkpointing(gradient_checkpointing)
        self.gradient_checkpointing = gradient_checkpointing
        self.denoiser_calls = self.denoiser_evals = self.vae_decodes = 0
        self.step_hooks = None

    @classmethod
    def from_state(cls, state, eta: float | None = None, gradient_checkpointing: bool | str = True):
        """The sampler of a pipeline call in progress (from the `init_latents` stage on)."""
        return cls(
            state.family,
            state.conditioning,
            guidance_scale=state.guidance_scale,
            eta=state.eta if eta is None else eta,
            gradient_checkpointing=gradient_checkpointing,
        )

    @property
    def num_steps(self) -> int:
        return len(self.scheduler.timesteps)

    def noise_stds(self) -> list[float]:
        """The injected noise's standard deviation at each step (all 0 for a deterministic schedule)."""
        return [step_noise_std(self.scheduler, i, self.eta) for i in range(self.num_steps)]

    @property
    def stochastic(self) -> bool:
        return any(s > 0 for s in self.noise_stds())

    def draw_noises(self, shape, generator=None, device=None, dtype=torch.float32) -> list[torch.Tensor | None]:
        """Standard normal noise for every stochastic step (`None` for deterministic steps); with a list of
        generators, one per row of `shape`, each row's noise comes from its own."""

        def draw():
            if isinstance(generator, list):
                return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generator])
            return torch.randn(shape, generator=generator, dtype=dtype)

        return [draw().to(device) if std > 0 else None for std in self.noise_stds()]

    def model_output(self, index: int, latents: torch.Tensor) -> torch.Tensor:
        """The guided denoiser output at step `index`, `[N, C, h, w]`."""
        t = self.scheduler.timesteps[index]
        x = scale_model_input(self.scheduler, latents, index)
        return self.family.denoise(x, t, self.conditioning, self.guidance_scale, cfg=self.cfg)

    def _blocks(self):
        """The context of a step's denoiser forward: its blocks checkpointed under `"blocks"` with gradients on."""
        if self.gradient_checkpointing != "blocks" or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        if self.step_hooks is not None:
            return self.step_hooks.checkpointed(self.family.denoiser)
        return block_checkpointing(self.family.denoiser)

    def _step(self, index, latents, noise):
        if self.step_hooks is not None:
            self.step_hooks.sync(index)
        with self._blocks():
            output = self.model_output(index, latents)
        return scheduler_step(self.scheduler, index, output, latents, self.eta, noise)

    def step(self, index: int, latents: torch.Tensor, noise: torch.Tensor | None = None):
        """One guided step: `(prev_latents, x0)`; checkpointed when gradients are on."""
        self.denoiser_calls += 1
        self.denoiser_evals += latents.shape[0]
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._step, index, latents, noise, use_reentrant=False)
        return self._step(index, latents, noise)

    def sample(self, latents: torch.Tensor, noises=None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Runs steps `start..stop-1` from `latents` (`[N, C, h, w]`, as the pipeline holds them after
        `prepare_latents`); `noises` holds one tensor (or `None`) per step, as from :meth:`draw_noises`."""
        stop = self.num_steps if stop is None else stop
        for i in range(start, stop):
            if self.step_hooks is not None:
                latents = self.step_hooks(i, latents)
            latents, _ = self.step(i, latents, None if noises is None else noises[i])
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to images `[N, 3, H, W]` in `[0, 1]`; checkpointed when gradients are on: block by block with
        the VAE's own switches (its backward then holds one block's activations, not the whole decoder's), or as one
        piece for a VAE without them."""
        self.vae_decodes += latents.shape[0]
        size = self.conditioning.shared.get("image_size", (None, None))  # packed latents (FLUX) need it
        if self.gradient_checkpointing and torch.is_grad_enabled():
            with block_checkpointing(self.family.vae) as switched:
                if switched:
                    image = self.family.decode(latents, *size)
                else:
                    image = torch.utils.checkpoint.checkpoint(self.family.decode, latents, *size, use_reentrant=False)
        else:
            image = self.family.decode(latents, *size)
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def account(self, state) -> None:
        """Adds this sampler's counters to a call's compute accounting, and resets them."""
        state.denoiser_calls += self.denoiser_calls
        state.denoiser_evals += self.denoiser_evals
        state.vae_decodes += self.vae_decodes
        self.denoiser_calls = self.denoiser_evals = self.vae_decodes = 0
