"""Shared denoising math used by several methods (and later the trainer).

Every function here works with the pipeline's own scheduler: the scheduler owns the update rule, these helpers
only read its noise schedule.
"""

from __future__ import annotations

import torch


def is_sigma_space(scheduler) -> bool:
    """Whether the scheduler's latents live in k-diffusion's sigma space (`x = x0 + sigma * eps`, as in the Euler
    family), rather than the variance-preserving space `x = sqrt(a) x0 + sqrt(1 - a) eps` (DDPM, DDIM, PNDM, LCM,
    DPM-Solver)."""
    return hasattr(scheduler, "sigmas") and float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0 + 1e-6


def current_sigma(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    """The sigma of a sigma-space scheduler at `timestep` (its current step when the step index is known)."""
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = scheduler.index_for_timestep(timestep)
    return scheduler.sigmas[index]


def predict_x0(scheduler, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The denoiser's estimate of the clean latents (Tweedie's formula), `[N, C, h, w]`.

    `model_output` is the (guided) prediction of the denoiser in the scheduler's `prediction_type` (`epsilon`,
    `v_prediction` or `sample`), and `sample` the current latents as the scheduler holds them (not scaled by
    `scale_model_input`).
    """
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type == "sample":
        return model_output
    if is_sigma_space(scheduler):
        sigma = current_sigma(scheduler, timestep).to(sample.device, sample.dtype)
        if prediction_type == "epsilon":
            return sample - sigma * model_output  # x0 = x - sigma * eps
        if prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    else:
        alpha_prod = scheduler.alphas_cumprod[int(timestep)].to(sample.device, sample.dtype)
        if prediction_type == "epsilon":
            return (sample - (1 - alpha_prod) ** 0.5 * model_output) / alpha_prod**0.5
        if prediction_type == "v_prediction":
            return alpha_prod**0.5 * sample - (1 - alpha_prod) ** 0.5 * model_output
    raise ValueError(f"Unsupported prediction_type {prediction_type!r} of {type(scheduler).__name__}.")
