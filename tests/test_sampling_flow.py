"""Flow-matching math (SD3, FLUX): the functional step against diffusers' `FlowMatchEulerDiscreteScheduler`, the
shifts against the scheduler's own, Flow-GRPO's SDE and its log-probability against the published formula, and the
differentiable sampler against the SD3 and FLUX pipelines."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ttalign.hooks import AlignmentMethod, Stage
from ttalign.sampler import DifferentiableSampler
from ttalign.sampling import (
    flow_dynamic_shift,
    flow_sde_step_with_logprob,
    flow_shift,
    flux_mu,
    scheduler_kind,
    scheduler_step,
    step_noise_std,
)
from ttalign.testing import get_tiny_flux_pipeline, get_tiny_sd3_pipeline


def _scheduler(steps=6, mu=None, **config):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(steps, mu=mu)
    return scheduler


@pytest.mark.parametrize(
    "config,mu",
    [
        (dict(shift=1.0), None),
        (dict(shift=3.0), None),
        (dict(use_dynamic_shifting=True), 0.9),
        (dict(shift=3.0, stochastic_sampling=True), None),
    ],
    ids=["plain", "sd3-shift", "flux-dynamic-shift", "stochastic-sampling"],
)
def test_flow_step_matches_diffusers(config, mu):
    scheduler, reference = _scheduler(mu=mu, **config), _scheduler(mu=mu, **config)
    assert scheduler_kind(scheduler) == "flow"
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(reference.timesteps):
        output = torch.randn(2, 4, 8, 8, generator=g)
        seed = 100 + i
        expected = reference.step(output, t, sample, generator=torch.Generator().manual_seed(seed), return_dict=False)
        std = step_noise_std(scheduler, i)
        last = i == len(reference.timesteps) - 1
        assert (std > 0) == (config.get("stochastic_sampling", False) and not last)
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) if std > 0 else None
        prev, x0 = scheduler_step(scheduler, i, output, sample, noise=noise)
        assert torch.allclose(prev, expected[0], atol=1e-6), (i, (prev - expected[0]).abs().max())
        sigma = float(reference.sigmas[i])
        assert torch.allclose(x0, sample - sigma * output, atol=1e-6)  # x0 = x_t - sigma v
        sample = expected[0]


def test_shifts_match_the_scheduler():
    steps = 8
    plain = _scheduler(steps)
    base = torch.linspace(float(plain.sigmas[0]), float(plain.sigmas[-2]), steps)
    assert torch.allclose(plain.sigmas[:-1], base, atol=1e-6)
    shifted = _scheduler(steps, shift=3.0)  # spaces its steps between its own (shifted) training sigmas
    shifted_base = torch.linspace(shifted.sigma_max, shifted.sigma_min, steps)
    assert torch.allclose(shifted.sigmas[:-1], flow_shift(shifted_base, 3.0), atol=1e-6)
    mu = flux_mu(1024)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256))
    dynamic = _scheduler(steps, mu=mu, use_dynamic_shifting=True)
    assert torch.allclose(dynamic.sigmas[:-1], flow_dynamic_shift(base, mu), atol=1e-6)
    # the shift moves the schedule toward noise
    assert (flow_shift(base, 3.0)[1:-1] > base[1:-1]).all()


def test_flow_sde_step_is_the_flow_grpo_formula():
    scheduler = _scheduler(10, shift=3.0)
    g = torch.Generator().manual_seed(0)
    sample, v, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    a = 0.7
    for i in (0, 4):  # sigma = 1 takes the next sigma in the denominator
        sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        denominator = 1 - (sigma if sigma < 1 else float(scheduler.sigmas[1]))
        std_t = a * math.sqrt(sigma / denominator)
        dt = sigma_next - sigma
        mean = sample + (v + std_t**2 / (2 * sigma) * (sample + (1 - sigma) * v)) * dt
        std = std_t * math.sqrt(-dt)
        prev, log_prob = flow_sde_step_with_logprob(scheduler, i, v, sample, a, noise=noise)
        assert torch.allclose(prev, mean + std * noise, atol=1e-5)
        expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
        assert torch.allclose(log_prob, expected, atol=1e-4)
        assert step_noise_std(scheduler, i, a) == pytest.approx(std, rel=1e-5)
        # the sampler's step is the same transition
        step_prev, _ = scheduler_step(scheduler, i, v, sample, eta=a, noise=noise)
        assert torch.allclose(step_prev, prev, atol=1e-6)
        # a recorded, less likely transition scores lower
        _, far = flow_sde_step_with_logprob(scheduler, i, v, sample, a, prev_sample=mean + 3 * std * noise)
        assert (far < log_prob).all()
    # the last step, to sigma 0, injects nothing and is the ODE step
    last = len(scheduler.timesteps) - 1
    assert step_noise_std(scheduler, last, a) == 0
    prev, _ = scheduler_step(scheduler, last, v, sample, eta=a)
    assert torch.allclose(prev, sample - float(scheduler.sigmas[last]) * v, atol=1e-6)
    with pytest.raises(ValueError, match="a > 0"):
        flow_sde_step_with_logprob(scheduler, 2, v, sample, 0.0, noise=noise)
    with pytest.raises(ValueError, match="variant"):
        flow_sde_step_with_logprob(scheduler, 2, v, sample, a, noise=noise, variant="ode")


def test_flow_sde_matches_the_marginals():
    """Flow-GRPO's SDE has the ODE's marginals: with the exact velocity of a Gaussian data distribution, many SDE
    paths started from noise end with the data's mean and variance."""
    scheduler = _scheduler(40, shift=1.0)
    m, s = 2.0, 0.5  # data ~ N(m, s^2); x_t = (1 - sigma) x0 + sigma eps

    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        eps_hat = sigma * (x - (1 - sigma) * m) / var  # E[eps | x_t]
        x0_hat = m + (1 - sigma) * s**2 * (x - (1 - sigma) * m) / var  # E[x0 | x_t]
        return eps_hat - x0_hat

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g, dtype=torch.float64)
    for i in range(len(scheduler.timesteps)):
        sigma = float(scheduler.sigmas[i])
        std = step_noise_std(scheduler, i, 0.7)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64) if std > 0 else None
        x, _ = scheduler_step(scheduler, i, velocity(x, sigma).float(), x.float(), eta=0.7, noise=noise)
        x = x.double()
    assert float(x.mean()) == pytest.approx(m, abs=0.03)
    assert float(x.std()) == pytest.approx(s, abs=0.05)


def test_cps_at_one_is_stochastic_sampling():
    """The coefficients-preserving SDE at a = 1 is diffusers' full re-noise."""
    scheduler = _scheduler(6, shift=3.0, stochastic_sampling=True)
    g = torch.Generator().manual_seed(1)
    sample, v, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for i in range(len(scheduler.timesteps) - 1):
        prev, _ = flow_sde_step_with_logprob(scheduler, i, v, sample, 1.0, noise=noise, variant="cps")
        expected, _ = scheduler_step(scheduler, i, v, sample, noise=noise)
        assert torch.allclose(prev, expected, atol=1e-5)


class _Capture(AlignmentMethod):
    """Records the initial latents and the conditioning of a call."""

    stages = (Stage.INIT_LATENTS,)

    def on_init_latents(self, state):
        self.latents, self.conditioning = state.latents.clone(), state.conditioning
        self.guidance_scale = state.guidance_scale


def _reproduce(pipe, checkpointing=False, **kwargs):
    capture = _Capture()
    kwargs.update(num_inference_steps=3, height=32, width=32, output_type="np")
    expected = pipe(
        ["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0), alignment=[capture], **kwargs
    ).images
    plain = pipe(["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(expected - plain).max() <= 1e-6  # capturing changes nothing
    sampler = DifferentiableSampler(
        pipe, capture.conditioning, guidance_scale=capture.guidance_scale, gradient_checkpointing=checkpointing
    )
    with torch.no_grad():
        images = sampler.decode(sampler.sample(capture.latents))
    out = images.permute(0, 2, 3, 1).numpy()
    assert np.abs(out - expected).max() <= 1e-5, np.abs(out - expected).max()
    return sampler, capture


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_sampler_reproduces_sd3(guidance_scale):
    sampler, _ = _reproduce(get_tiny_sd3_pipeline(shift=3.0), guidance_scale=guidance_scale)
    assert sampler.denoiser_calls == 3 and sampler.denoiser_evals == 6 and not sampler.stochastic


@pytest.mark.parametrize(
    "kwargs",
    [dict(guidance_scale=3.5), dict(true_cfg_scale=3.0, negative_prompt="a cat")],
    ids=["dev-guidance", "true-cfg"],
)
def test_sampler_reproduces_flux(kwargs):
    sampler, capture = _reproduce(get_tiny_flux_pipeline(guidance_embeds=True), **kwargs)
    assert capture.latents.shape == (2, 256, 4)  # packed
    assert sampler.denoiser_calls == 3


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_checkpointing_gives_the_same_gradients_on_flow(family):
    pipe = get_tiny_sd3_pipeline() if family == "sd3" else get_tiny_flux_pipeline(guidance_embeds=True)
    _, capture = _reproduce(pipe, guidance_scale=3.0)
    grads, values, block_calls = [], [], []
    counter = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: block_calls.append(1))
    for checkpointing in (False, True, "blocks"):
        z = capture.latents.clone().requires_grad_()
        sampler = DifferentiableSampler(
            pipe, capture.conditioning, guidance_scale=capture.guidance_scale, gradient_checkpointing=checkpointing
        )
        block_calls.clear()
        loss = sampler.decode(sampler.sample(z)).mean()
        loss.backward()
        grads.append(z.grad)
        values.append(loss.detach())
        # per step (FLUX runs no unconditional pass with distilled guidance): the forward, the step's replay, and
        # with "blocks" the block's own replay
        assert len(block_calls) == 3 * {False: 1, True: 2, "blocks": 3}[checkpointing], checkpointing
    counter.remove()
    assert all(torch.allclose(values[0], v) for v in values[1:]) and grads[0].abs().sum() > 0
    assert all(torch.allclose(grads[0], g, atol=1e-6) for g in grads[1:])
    assert not pipe.transformer.gradient_checkpointing
