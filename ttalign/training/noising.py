"""The forward process the training losses share: noise and timesteps drawn per image, the noised latents and the
family's training target (noise or `v` on the DDPM families; on flow matching, `x_t = (1 - sigma) x0 + sigma eps`
with the velocity target `eps - x0`)."""

from __future__ import annotations

import torch


def draw_noise_and_timesteps(
    like: torch.Tensor,
    generator: torch.Generator,
    num_train_timesteps: int,
    flow: bool,
    sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal noise shaped like `like` `[N, ...]` and a timestep per image `[N]`: uniform integers over the
    training timesteps (DDPM families), or on flow matching `num_train_timesteps * sigma` with sigma logit-normal
    (`sigmoid(N(logit_mean, logit_std^2))`, SD3's training distribution) or uniform (`sampling="uniform"`)."""
    noise = torch.randn(like.shape, generator=generator).to(like)
    n = len(like)
    if not flow:
        return noise, torch.randint(0, num_train_timesteps, (n,), generator=generator).to(like.device)
    if sampling == "logit_normal":
        sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    else:
        sigma = torch.rand(n, generator=generator)
    return noise, (sigma * num_train_timesteps).to(like.device)


def noised_and_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, flow: bool):
    """`(x_t, target)` for clean latents `x0` `[N, ...]`: the scheduler's `add_noise` and its prediction type's target
    (noise or `v`), or flow matching's interpolation and velocity (`sigma = timesteps / num_train_timesteps`)."""
    if flow:
        sigma = (timesteps / scheduler.config.num_train_timesteps).view(-1, *[1] * (x0.ndim - 1))
        x_t = ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)  # [N, ...]
        return x_t, noise - x0
    x_t = scheduler.add_noise(x0, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        return x_t, scheduler.get_velocity(x0, noise, timesteps)
    return x_t, noise
