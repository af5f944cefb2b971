"""The shared denoising math: functional scheduler steps, the differentiable sampler, DDPO's log-probability."""

import math

import pytest
import torch

from ttalign.sampler import DifferentiableSampler
from ttalign.sampling import (
    ddim_step_with_logprob,
    scheduler_step,
    step_noise_std,
)
from ttalign.testing import get_tiny_pipeline, get_tiny_scheduler


@pytest.mark.parametrize(
    "name,prediction_type,eta",
    [
        ("ddim", "epsilon", 0.0),
        ("ddim", "epsilon", 1.0),
        ("ddim", "v_prediction", 0.5),
        ("euler", "epsilon", 0.0),
        ("euler", "v_prediction", 0.0),
        ("euler_a", "epsilon", 0.0),
        ("lcm", "epsilon", 0.0),
    ],
)
def test_scheduler_step_matches_diffusers(name, prediction_type, eta):
    scheduler = get_tiny_scheduler(name)
    scheduler.register_to_config(prediction_type=prediction_type)
    reference = get_tiny_scheduler(name)
    reference.register_to_config(prediction_type=prediction_type)
    for s in (scheduler, reference):
        s.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g) * float(scheduler.init_noise_sigma)
    stochastic_steps = 0
    for i, t in enumerate(reference.timesteps):
        output = torch.randn(2, 4, 8, 8, generator=g)
        seed = 100 + i
        kwargs = {}
        if name == "ddim":
            kwargs = {
                "eta": eta,
                "variance_noise": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)),
            }
        elif name in ("euler_a", "lcm"):
            kwargs = {"generator": torch.Generator().manual_seed(seed)}
        expected = reference.step(output, t, sample, **kwargs, return_dict=False)[0]
        std = step_noise_std(scheduler, i, eta)
        stochastic_steps += std > 0
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) if std > 0 else None
        prev, x0 = scheduler_step(scheduler, i, output, sample, eta=eta, noise=noise)
        assert torch.allclose(prev, expected, atol=1e-5, rtol=1e-5), (i, (prev - expected).abs().max())
        assert x0.shape == sample.shape
        sample = expected
    assert (stochastic_steps > 0) == (eta > 0 or name in ("euler_a", "lcm"))


@pytest.mark.parametrize("name,eta", [("ddim", 1.0), ("ddim", 0.0), ("euler_a", 0.0), ("lcm", 0.0)])
def test_scheduler_step_in_half_precision_keeps_its_coefficients_in_float32(name, eta):
    """In bf16, `1 - alpha_prev` at the last DDIM step rounds to 0 and `sqrt(1 - alpha_prev - std^2)` to NaN; the
    coefficients stay float32 (as diffusers' schedulers keep them), so a bf16 step is finite, bf16, and near the
    float32 one."""
    scheduler = get_tiny_scheduler(name)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    for i in range(4):
        output, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        noise = noise if step_noise_std(scheduler, i, eta) > 0 else None
        expected, _ = scheduler_step(scheduler, i, output, sample, eta=eta, noise=noise)
        half = noise.bfloat16() if noise is not None else None
        prev, x0 = scheduler_step(scheduler, i, output.bfloat16(), sample.bfloat16(), eta=eta, noise=half)
        assert prev.dtype == x0.dtype == torch.bfloat16
        assert torch.isfinite(prev).all() and torch.isfinite(x0).all(), i
        assert (prev.float() - expected).abs().max() <= 0.05 * expected.abs().max(), i
        sample = expected


def test_stochastic_methods_on_a_bf16_pipeline_give_finite_images():
    from ttalign.methods import ParticleSteering
    from ttalign.testing import Redness

    pipe = get_tiny_pipeline().to(dtype=torch.bfloat16)
    out = pipe(
        ["a cat and a dog"],
        num_inference_steps=4,
        alignment=[ParticleSteering(reward=Redness(), particles=2, resample_every=1)],
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(out.images).all()


def test_unsupported_scheduler_is_named():
    scheduler = get_tiny_scheduler("pndm")
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="PNDMScheduler"):
        scheduler_step(scheduler, 0, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize(
    "name,eta,steps",
    [
        ("ddim", 0.0, 4),
        ("ddim", 1.0, 4),
        ("euler", 0.0, 4),
        ("euler_a", 0.0, 4),
        ("lcm", 0.0, 4),
        ("lcm", 0.0, 1),
        ("euler_a", 0.0, 1),
    ],
)
def test_sampler_reproduces_the_pipeline(name, eta, steps):
    pipe = get_tiny_pipeline(name)
    prompts = ["a red circle", "two blue squares"]
    expected = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=3.0,
        eta=eta,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images

    # the same draws, in the pipeline's order: initial latents, then one noise per stochastic step
    g = torch.Generator().manual_seed(0)
    pipe.scheduler.set_timesteps(steps)
    latents = torch.randn(expected.shape, generator=g) * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    sampler = DifferentiableSampler(pipe, cond, uncond, guidance_scale=3.0, eta=eta)
    noises = sampler.draw_noises(latents.shape, generator=g)
    with torch.no_grad():
        out = sampler.sample(latents, noises)
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
    assert sampler.denoiser_calls == steps and sampler.denoiser_evals == 2 * steps
    if steps == 1:  # a one-step (turbo / LCM-style) schedule injects no noise
        assert not sampler.stochastic


def test_checkpointing_gives_the_same_gradients():
    pipe = get_tiny_pipeline("ddim")
    pipe.scheduler.set_timesteps(3)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(["a cat"], "cpu", 1, True)
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    grads, values, decoder_blocks, resnet_calls = [], [], [], []
    block = pipe.vae.decoder.up_blocks[0]
    hook = block.register_forward_pre_hook(lambda *_: decoder_blocks.append(pipe.vae.decoder.gradient_checkpointing))
    resnet = pipe.unet.down_blocks[0].resnets[0]
    counter = resnet.register_forward_pre_hook(lambda *_: resnet_calls.append(1))
    for checkpointing in (False, True, "blocks"):
        z = start.clone().requires_grad_()
        sampler = DifferentiableSampler(pipe, cond, uncond, 3.0, gradient_checkpointing=checkpointing)
        decoder_blocks.clear()
        resnet_calls.clear()
        loss = sampler.decode(sampler.sample(z)).mean()
        loss.backward()
        grads.append(z.grad)
        values.append(loss.detach())
        # per step: the forward; the step's replay in the backward; with "blocks", each block's replay as well
        assert len(resnet_calls) == 3 * {False: 1, True: 2, "blocks": 3}[checkpointing], checkpointing
        if checkpointing is True:
            # the decode is checkpointed with the VAE's own block switches: each decoder block runs in the forward
            # (with the switches on) and again in the backward (after the decode put them back)
            assert decoder_blocks == [True, False]
    hook.remove()
    counter.remove()
    assert all(torch.allclose(values[0], v) for v in values[1:]) and grads[0].abs().sum() > 0
    assert all(torch.allclose(grads[0], g, atol=1e-6) for g in grads[1:])
    assert not pipe.vae.decoder.gradient_checkpointing
    assert not any(getattr(m, "gradient_checkpointing", False) for m in pipe.unet.modules())
    with pytest.raises(ValueError, match="'steps'"):
        DifferentiableSampler(pipe, cond, uncond, 3.0, gradient_checkpointing="steps")


def test_ddim_logprob_is_the_ddpo_formula():
    scheduler = get_tiny_scheduler("ddim")
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    sample, output, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    i, eta = 4, 1.0
    t = int(scheduler.timesteps[i])
    prev_t = t - 1000 // 10
    a_t, a_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev_t]
    std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0_hat = (sample - (1 - a_t).sqrt() * output) / a_t.sqrt()
    mean = a_prev.sqrt() * x0_hat + math.sqrt(1 - a_prev - std**2) * output

    prev, log_prob = ddim_step_with_logprob(scheduler, i, output, sample, eta=eta, noise=noise)
    assert torch.allclose(prev, mean + std * noise, atol=1e-5)
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(log_prob, expected, atol=1e-4)
    # the drawn transition is the one diffusers' DDIM step takes with the same noise
    reference = scheduler.step(output, scheduler.timesteps[i], sample, eta=eta, variance_noise=noise).prev_sample
    assert torch.allclose(prev, reference, atol=1e-5)
    # scoring a recorded transition: a less likely one has a lower log-probability
    _, far = ddim_step_with_logprob(scheduler, i, output, sample, eta=eta, prev_sample=mean + 3 * std * noise)
    assert (far < log_prob).all()
    with pytest.raises(ValueError, match="eta > 0"):
        ddim_step_with_logprob(scheduler, i, output, sample, eta=0.0, noise=noise)


def test_sigma_space_is_decided_by_the_scheduler_class():
    """A one-step "leading" Euler ancestral schedule starts near the data (init_noise_sigma < 1) and is still sigma
    space: its model input is scaled and x0 = x - sigma * eps."""
    from ttalign.sampling import is_sigma_space

    euler_a = get_tiny_scheduler("euler_a")
    euler_a.set_timesteps(1)
    assert float(euler_a.init_noise_sigma) < 1 and is_sigma_space(euler_a)
    assert not is_sigma_space(get_tiny_scheduler("ddim")) and not is_sigma_space(get_tiny_scheduler("lcm"))
