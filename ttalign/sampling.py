"""Shared denoising math used by several methods (and later the trainer).

Every function here works with the pipeline's own scheduler: the scheduler owns the update rule, these helpers
only read its noise schedule.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.cache
def _sigma_space_schedulers() -> tuple[type, ...]:
    """Schedulers whose latents live in k-diffusion's sigma space (`scale_model_input` divides by
    sqrt(sigma^2 + 1))."""
    from diffusers import (
        DPMSolverSDEScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        KDPM2AncestralDiscreteScheduler,
        KDPM2DiscreteScheduler,
        LMSDiscreteScheduler,
    )

    return (
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        KDPM2DiscreteScheduler,
        KDPM2AncestralDiscreteScheduler,
        LMSDiscreteScheduler,
        DPMSolverSDEScheduler,
    )


def is_sigma_space(scheduler) -> bool:
    """Whether the scheduler's latents live in k-diffusion's sigma space (`x = x0 + sigma * eps`, as in the Euler
    family), rather than the variance-preserving space `x = sqrt(a) x0 + sqrt(1 - a) eps` (DDPM, DDIM, PNDM, LCM,
    DPM-Solver). Decided by the scheduler's class (or a parent's), not by its `init_noise_sigma`, which is below 1 for
    a one-step "leading" schedule that starts near the data."""
    return isinstance(scheduler, _sigma_space_schedulers())


def is_flow(scheduler) -> bool:
    """Whether the scheduler is flow matching's Euler (`x_t = (1 - sigma) x0 + sigma eps`, velocity output)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def init_noise_sigma(scheduler) -> float:
    """The scale of the initial noise, `scheduler.init_noise_sigma` (flow matching has none: its latents start as
    plain Gaussian noise, scale 1)."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0))


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
    if is_flow(scheduler):  # flow matching: the model predicts the velocity v = eps - x0
        sigma = current_sigma(scheduler, timestep).to(sample.device, torch.float32)
        return (sample.float() - sigma * model_output.float()).to(model_output.dtype)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type == "sample":
        return model_output
    if is_sigma_space(scheduler):
        sigma = current_sigma(scheduler, timestep).to(sample.device, coefficient_dtype(sample))
        if prediction_type == "epsilon":
            return sample - sigma * model_output  # x0 = x - sigma * eps
        if prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    else:
        alpha_prod = scheduler.alphas_cumprod[int(timestep)].to(sample.device, coefficient_dtype(sample))
        if prediction_type == "epsilon":
            return (sample - (1 - alpha_prod) ** 0.5 * model_output) / alpha_prod**0.5
        if prediction_type == "v_prediction":
            return alpha_prod**0.5 * sample - (1 - alpha_prod) ** 0.5 * model_output
    raise ValueError(f"Unsupported prediction_type {prediction_type!r} of {type(scheduler).__name__}.")


# ---------------------------------------------------------------------------------------------------------------------
# Functional scheduler steps. diffusers' `scheduler.step` keeps state (a step index, multistep histories) and draws its
# own noise; a sampler that is replayed under gradient checkpointing, or whose injected noises are optimized or drawn
# per particle, needs the same update as a pure function of (step index, sample, model output, noise). These are
# diffusers' update rules written out, tested step for step against `scheduler.step`.
# ---------------------------------------------------------------------------------------------------------------------

SUPPORTED_SCHEDULERS = (
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LCMScheduler",
    "FlowMatchEulerDiscreteScheduler",
)


def scheduler_kind(scheduler) -> str:
    """`"ddim"`, `"euler"`, `"euler_ancestral"`, `"lcm"` or `"flow"`; `ValueError` naming the scheduler otherwise."""
    from diffusers import (
        DDIMScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        LCMScheduler,
    )

    kinds = (
        (DDIMScheduler, "ddim"),
        (EulerAncestralDiscreteScheduler, "euler_ancestral"),
        (EulerDiscreteScheduler, "euler"),
        (LCMScheduler, "lcm"),
        (FlowMatchEulerDiscreteScheduler, "flow"),
    )
    for cls, kind in kinds:
        if type(scheduler) is cls:
            if getattr(scheduler.config, "thresholding", False):
                raise ValueError(f"{cls.__name__} with `thresholding=True` is not supported by the sampler.")
            if kind == "flow":
                for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
                    if getattr(scheduler.config, option, False):
                        raise ValueError(f"{cls.__name__} with `{option}=True` is not supported by the sampler.")
            return kind
    raise ValueError(
        f"The differentiable sampler supports {', '.join(SUPPORTED_SCHEDULERS)}; the pipeline has "
        f"{type(scheduler).__name__}; swap it: `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`."
    )


def _x0_and_eps_vp(scheduler, model_output, sample, alpha_prod):
    """x0 and eps from a variance-preserving model output in the scheduler's prediction type."""
    prediction_type = scheduler.config.prediction_type
    beta_prod = 1 - alpha_prod
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - beta_prod**0.5 * eps) / alpha_prod**0.5
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_prod**0.5 * x0) / beta_prod**0.5
    elif prediction_type == "v_prediction":
        x0 = alpha_prod**0.5 * sample - beta_prod**0.5 * model_output
        eps = alpha_prod**0.5 * model_output + beta_prod**0.5 * sample
    else:
        raise ValueError(f"Unsupported prediction_type {prediction_type!r}.")
    if scheduler.config.get("clip_sample", False):
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    return x0, eps


def _ddim_prev_timestep(scheduler, timestep):
    return timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def coefficient_dtype(sample: torch.Tensor) -> torch.dtype:
    """The dtype of a step's scalar coefficients: at least float32, as diffusers' schedulers keep them (in fp16 or
    bf16, `1 - alpha` near the end of sampling rounds to 0 or below, and `sqrt(1 - alpha_prev - std^2)` to NaN). A
    0-dim float32 coefficient times a half-precision tensor stays in half precision."""
    return torch.promote_types(sample.dtype, torch.float32)


def _ddim_alphas(scheduler, timestep, device, dtype):
    prev = _ddim_prev_timestep(scheduler, int(timestep))
    alpha_prod = scheduler.alphas_cumprod[int(timestep)]
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return alpha_prod.to(device, dtype), alpha_prev.to(device, dtype)


def scale_model_input(scheduler, sample: torch.Tensor, index: int) -> torch.Tensor:
    """`scheduler.scale_model_input` without its step-index side effect: `x / sqrt(sigma^2 + 1)` in sigma space."""
    if is_sigma_space(scheduler):
        sigma = scheduler.sigmas[index].to(sample.device, coefficient_dtype(sample))
        return sample / (sigma**2 + 1) ** 0.5
    return sample


def step_noise_std(scheduler, index: int, eta: float = 0.0) -> float:
    """The standard deviation of the noise a step injects (0 for a deterministic step)."""
    kind = scheduler_kind(scheduler)
    if kind == "ddim":
        t = scheduler.timesteps[index]
        alpha_prod, alpha_prev = _ddim_alphas(scheduler, t, "cpu", torch.float64)
        variance = (1 - alpha_prev) / (1 - alpha_prod) * (1 - alpha_prod / alpha_prev)
        return float(eta * variance**0.5)
    if kind == "euler_ancestral":
        s_from, s_to = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
        return (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
    if kind == "lcm":
        if index == scheduler.num_inference_steps - 1:
            return 0.0
        prev_t = scheduler.timesteps[index + 1]
        return float((1 - scheduler.alphas_cumprod[int(prev_t)]) ** 0.5)
    if kind == "flow":
        sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
        if eta > 0:
            return flow_sde_std(scheduler, index, eta) * (sigma - sigma_next) ** 0.5 if sigma_next > 0 else 0.0
        return sigma_next if scheduler.config.get("stochastic_sampling", False) else 0.0
    return 0.0


def scheduler_step(
    scheduler,
    index: int,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising step `x_t -> x_{t-1}` of the scheduler at step `index`, as a pure function.

    Args:
        scheduler: a DDIM, Euler, Euler ancestral, LCM or flow-matching Euler scheduler after `set_timesteps` (only
            read).
        index (`int`): the step, `0 <= index < len(scheduler.timesteps)`.
        model_output (`Tensor [N, C, h, w]`): the (guided) denoiser output in the scheduler's prediction type.
        sample (`Tensor [N, C, h, w]`): the latents `x_t` as the scheduler holds them.
        eta (`float`): DDIM's noise scale (0: deterministic DDIM, 1: DDPM-like ancestral); for flow matching the
            noise level `a` of Flow-GRPO's SDE (0: the ODE); the other kinds ignore it.
        noise (`Tensor [N, C, h, w]`, *optional*): the standard normal noise a stochastic step injects; required
            when `step_noise_std(scheduler, index, eta) > 0`.

    Returns:
        `(prev_sample, x0)`: `x_{t-1}` and the denoiser's x0 estimate (LCM: its boundary-condition output).
    """
    kind = scheduler_kind(scheduler)
    std = step_noise_std(scheduler, index, eta)
    if std > 0 and noise is None:
        raise ValueError(f"Step {index} of {type(scheduler).__name__} injects noise (std {std:.3g}): pass `noise`.")
    if kind == "flow":
        return flow_step(scheduler, index, model_output, sample, eta, noise)
    if kind == "ddim":
        t = scheduler.timesteps[index]
        alpha_prod, alpha_prev = _ddim_alphas(scheduler, t, sample.device, coefficient_dtype(sample))
        x0, eps = _x0_and_eps_vp(scheduler, model_output, sample, alpha_prod)
        prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2).clamp(min=0) ** 0.5 * eps
        return (prev + std * noise if std > 0 else prev), x0
    if kind in ("euler", "euler_ancestral"):
        sigma = scheduler.sigmas[index].to(sample.device, coefficient_dtype(sample))
        sigma_next = scheduler.sigmas[index + 1].to(sample.device, coefficient_dtype(sample))
        x0 = predict_x0_sigma(scheduler, model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        if kind == "euler":
            return sample + derivative * (sigma_next - sigma), x0
        sigma_down = (sigma_next**2 - std**2).clamp(min=0) ** 0.5
        prev = sample + derivative * (sigma_down - sigma)
        return (prev + std * noise if std > 0 else prev), x0
    # LCM
    t = scheduler.timesteps[index]
    alpha_prod = scheduler.alphas_cumprod[int(t)].to(sample.device, coefficient_dtype(sample))
    x0, _ = _x0_and_eps_vp(scheduler, model_output, sample, alpha_prod)
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    denoised = c_out * x0 + c_skip * sample
    if index == scheduler.num_inference_steps - 1:
        return denoised, denoised
    prev_t = int(scheduler.timesteps[index + 1])
    alpha_prev = scheduler.alphas_cumprod[prev_t].to(sample.device, coefficient_dtype(sample))
    return alpha_prev**0.5 * denoised + std * noise, denoised


# ---------------------------------------------------------------------------------------------------------------------
# Flow matching (SD3, FLUX): diffusers' convention x_t = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0,
# so x0 = x_t - sigma v and eps = x_t + (1 - sigma) v. Sampling runs from sigma = 1 (noise) to 0.
# ---------------------------------------------------------------------------------------------------------------------


def flow_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's static timestep shift: `sigma <- shift sigma / (1 + (shift - 1) sigma)`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_dynamic_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's resolution-dependent shift: `sigma <- e^mu / (e^mu + (1 / sigma - 1))`."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1's `mu`: linear in the packed image sequence length, `base_shift` at `base_seq_len` tokens and
    `max_shift` at `max_seq_len`."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flow_sde_std(scheduler, index: int, a: float) -> float:
    """Flow-GRPO's noise scale at step `index`: `a * sqrt(sigma / (1 - sigma))`, with the next sigma in the denominator
    at sigma = 1 (where `1 - sigma` vanishes), as the reference does."""
    sigma = float(scheduler.sigmas[index])
    denominator = 1 - (sigma if sigma < 1 else float(scheduler.sigmas[1]))
    return a * (sigma / denominator) ** 0.5


def flow_step(
    scheduler,
    index: int,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    a: float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One flow-matching step as a pure function, in fp32 like diffusers' `FlowMatchEulerDiscreteScheduler.step`:
    the Euler ODE step `x' = x + (sigma' - sigma) v` (`a = 0`); Flow-GRPO's SDE with noise level `a > 0` (the last
    step, to sigma 0, stays the ODE step, so the image carries no injected noise); with `a = 0` and the scheduler's
    `stochastic_sampling`, its full re-noise `x' = (1 - sigma') x0 + sigma' eps`. Returns `(x', x0)`."""
    sigma, sigma_next = scheduler.sigmas[index].float(), scheduler.sigmas[index + 1].float()
    x, v = sample.float(), model_output.float()
    x0 = x - sigma * v
    if a > 0 and float(sigma_next) > 0:
        prev, _ = flow_sde_step_with_logprob(scheduler, index, model_output, sample, a, noise=noise)
        return prev.to(model_output.dtype), x0.to(model_output.dtype)
    if a <= 0 and scheduler.config.get("stochastic_sampling", False) and float(sigma_next) > 0:
        prev = (1 - sigma_next) * x0 + sigma_next * noise.float()
    else:
        prev = x + (sigma_next - sigma) * v
    return prev.to(model_output.dtype), x0.to(model_output.dtype)


def flow_sde_step_with_logprob(
    scheduler,
    index: int,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    a: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    variant: str = "sde",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stochastic flow-matching step and the Gaussian log-probability of its transition (Flow-GRPO, Liu et al. 2025,
    https://arxiv.org/abs/2505.05470), in fp32.

    `variant="sde"`: `std_t = a sqrt(sigma / (1 - sigma))`,
    `mean = x + [v + std_t^2 / (2 sigma) (x + (1 - sigma) v)] dt` with `dt = sigma' - sigma < 0`,
    `x' = mean + std_t sqrt(-dt) eps`. `variant="cps"` (coefficients-preserving):
    `std = sigma' sin(a pi / 2)`, `mean = x0 (1 - sigma') + x1 sqrt(sigma'^2 - std^2)` with `x1 = x + (1 - sigma) v`,
    `x' = mean + std eps`; at `a = 1` it is diffusers' `stochastic_sampling`. The log-probability is the density of
    `prev_sample` (drawn as `mean + std * noise` when not given) under `N(mean, std^2)`, averaged over all dimensions
    but the batch. Returns `(prev_sample, log_prob [N])`."""
    mean, std = flow_sde_transition(scheduler, index, model_output, sample, a, variant)
    if prev_sample is None:
        if noise is None:
            raise ValueError("Pass `prev_sample` (a recorded transition) or `noise` to draw one.")
        prev_sample = mean + std * noise.float()
    return prev_sample, gaussian_log_prob(prev_sample.detach().float(), mean, std)


def flow_sde_transition(
    scheduler, index: int, model_output: torch.Tensor, sample: torch.Tensor, a: float = 0.7, variant: str = "sde"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian `N(mean, std^2)` of a stochastic flow-matching step (see :func:`flow_sde_step_with_logprob` for
    the formulas), in fp32: `(mean [N, ...], std)` with `std` a 0-d tensor, the whole step's standard deviation
    (for the SDE variant `std_t sqrt(-dt)`: the step size is kept)."""
    if variant not in ("sde", "cps"):
        raise ValueError(f"variant must be 'sde' or 'cps', got {variant!r}.")
    if not a > 0:
        raise ValueError(f"The log-probability needs a stochastic step (a > 0), got a={a!r}.")
    sigma, sigma_next = scheduler.sigmas[index].float(), scheduler.sigmas[index + 1].float()
    if not float(sigma_next) > 0:
        raise ValueError(f"Step {index} ends at sigma 0: it is deterministic and has no transition density.")
    x, v = sample.float(), model_output.float()
    dt = sigma_next - sigma
    if variant == "sde":
        std_t = flow_sde_std(scheduler, index, a)
        mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt  # [N, ...]
        std = std_t * (-dt) ** 0.5
    else:
        x0, x1 = x - sigma * v, x + (1 - sigma) * v
        std = sigma_next * math.sin(a * math.pi / 2)
        mean = x0 * (1 - sigma_next) + x1 * (sigma_next**2 - std**2).clamp_min(0) ** 0.5
    return mean, torch.as_tensor(std, dtype=torch.float32)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """`log N(x; mean, std^2)` averaged over all dimensions but the batch: `[N, ...] -> [N]`."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def predict_x0_sigma(scheduler, model_output, sample, sigma):
    """x0 in sigma space (Euler family) from the model output in the scheduler's prediction type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}.")


def ddim_step_with_logprob(
    scheduler,
    index: int,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A DDIM step that also returns the log-probability of the transition (DDPO, Black et al. 2023,
    https://arxiv.org/abs/2305.13301).

    `std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))`,
    `mean = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps`, and the log-probability is the Gaussian
    log-density of `prev_sample` under `N(mean, std^2)`, averaged over all dimensions but the batch.

    Args:
        prev_sample (`Tensor`, *optional*): the transition to score (a recorded trajectory); drawn as
            `mean + std * noise` when not given.

    Returns:
        `(prev_sample [N, C, h, w], log_prob [N])`.
    """
    mean, std = ddim_transition(scheduler, index, model_output, sample, eta)
    if prev_sample is None:
        if noise is None:
            raise ValueError("Pass `prev_sample` (a recorded transition) or `noise` to draw one.")
        prev_sample = mean + std * noise
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    )  # [N, C, h, w]
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ddim_transition(
    scheduler,
    index: int,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """The Gaussian `N(mean, std^2)` of a DDIM step with `eta > 0` (formulas in :func:`ddim_step_with_logprob`), in
    the sample's dtype: `(mean [N, C, h, w], std)`."""
    if scheduler_kind(scheduler) != "ddim":
        raise ValueError(f"A DDIM transition needs a DDIMScheduler, got {type(scheduler).__name__}.")
    std = step_noise_std(scheduler, index, eta)
    if std <= 0:
        raise ValueError(f"The log-probability needs a stochastic step (eta > 0), got eta={eta!r}.")
    t = scheduler.timesteps[index]
    alpha_prod, alpha_prev = _ddim_alphas(scheduler, t, sample.device, coefficient_dtype(sample))
    x0, eps = _x0_and_eps_vp(scheduler, model_output, sample, alpha_prod)
    return alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2).clamp(min=0) ** 0.5 * eps, std  # [N, C, h, w]


def stochastic_transition(
    scheduler, index: int, model_output: torch.Tensor, sample: torch.Tensor, eta: float, variant: str = "sde"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one stochastic step of a DDIM (`eta > 0`) or flow-matching (noise level `eta`, Flow-GRPO's
    `variant`) scheduler, in fp32: `(mean [N, ...], std)`, the policy of the RL trainers."""
    if scheduler_kind(scheduler) == "flow":
        return flow_sde_transition(scheduler, index, model_output, sample, eta, variant)
    mean, std = ddim_transition(scheduler, index, model_output.float(), sample.float(), eta)
    return mean, torch.tensor(std, dtype=torch.float32)
