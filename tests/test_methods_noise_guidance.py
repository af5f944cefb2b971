"""Seed search, noise optimization, reward guidance and particle steering on the tiny components."""

import dataclasses

import numpy as np
import pytest
import torch

from ttalign.methods import BestOfN, NoiseOptimization, ParticleSteering, RewardGuidance, SeedSearch
from ttalign.methods.guidance import systematic_resample
from ttalign.methods.noise import noise_norm_nll
from ttalign.rewards import JpegIncompressibility
from ttalign.testing import Redness, get_tiny_pipeline

PROMPTS = ["a red circle", "two blue squares"]


def _call(pipe, alignment=(), seed=0, steps=3, **kwargs):
    kwargs.setdefault("guidance_scale", 3.0)
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        output_type="pt",
        alignment=list(alignment),
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


@pytest.fixture(scope="module")
def ddim():
    return get_tiny_pipeline("ddim")


def test_seed_search_with_one_candidate_is_the_plain_call(ddim):
    plain = _call(ddim).images
    out = _call(ddim, [SeedSearch(reward=Redness(), n=1)])
    assert torch.allclose(out.images, plain, atol=1e-5)
    assert torch.allclose(out.rewards, Redness()(plain, PROMPTS), atol=1e-5)


@pytest.mark.parametrize("scheduler,eta", [("ddim", 0.0), ("euler_a", 0.0), ("ddim", 1.0)])
def test_seed_search_returns_the_best_scored_image(scheduler, eta):
    pipe = get_tiny_pipeline(scheduler)
    reward = Redness()
    plain = _call(pipe, eta=eta)
    out = _call(pipe, [SeedSearch(reward=reward, n=3, rounds=1, neighbors=2)], eta=eta)
    scores = out.traces["seed_search"]["scores"]
    assert scores.shape == (2, 5)
    assert torch.allclose(out.rewards, scores.max(dim=1).values)
    # the returned image is the one that was scored (injected noises are replayed for stochastic schedules)
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    if scheduler == "ddim" and eta == 0:  # deterministic: candidate 0 is the plain call's image
        assert torch.allclose(scores[:, 0], reward(plain.images, PROMPTS), atol=1e-4)
        assert (out.rewards >= reward(plain.images, PROMPTS) - 1e-5).all()
    assert out.traces["compute"]["nfe"] == (5 + 1) * 3 * 2


def test_noise_optimization_improves_the_reward_and_returns_the_best_iterate(ddim):
    reward = Redness()
    method = NoiseOptimization(reward=reward, steps=4, lr=1.0, optimizer="adamw", grad_clip=None, regularizer=0.01)
    out = _call(ddim, [method])
    trace = out.traces["noise_optimization"]
    assert trace["rewards"].shape == (4, 2)
    assert (trace["best"] > trace["rewards"][0]).all()  # it improved on the initial noise
    assert torch.allclose(trace["best"], trace["rewards"].max(dim=0).values)
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    assert out.traces["compute"]["nfe"] == 4 * 3 * 2  # the kept iterate's render is returned, not sampled again
    assert trace["reused_render"] and "images" not in trace
    again = _call(ddim, [dataclasses.replace(method, reuse_render=False)])
    assert again.traces["compute"]["nfe"] == (4 + 1) * 3 * 2
    assert not again.traces["noise_optimization"]["reused_render"]
    assert torch.allclose(again.images, out.images, atol=1e-5)  # the pipeline's own loop renders the same image
    kept = _call(ddim, [dataclasses.replace(method, keep_images=True)]).traces["noise_optimization"]
    assert kept["images"].shape == (4, 2, 3, 64, 64)
    assert torch.allclose(kept["images"][0], _call(ddim).images, atol=1e-5)  # iteration 0: the plain call's noise
    assert torch.allclose(reward(kept["images"].flatten(0, 1), PROMPTS * 4).view(4, 2), kept["rewards"], atol=1e-4)
    # steps=k returns the best-rewarded of the first k iterates of a longer run (the compute-scaling benchmark's
    # reading of one run's record)
    from ttalign.shapes.evaluate import select_best

    for k in (2, 4):
        short = _call(ddim, [dataclasses.replace(method, steps=k)]).images
        pick = select_best(kept["rewards"].T, k)  # [2]
        assert torch.allclose(short, kept["images"][pick, torch.arange(2)], atol=1e-4)


def test_noise_optimization_is_per_image(ddim):
    """A batch is optimized as if each image were alone (per-image state, clipping and best iterate)."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    method = NoiseOptimization(reward=Redness(), steps=3, lr=2.0, grad_clip=0.05)
    both = ddim(
        PROMPTS, num_inference_steps=2, guidance_scale=3.0, latents=latents, output_type="latent", alignment=[method]
    ).images
    first = ddim(
        PROMPTS[:1],
        num_inference_steps=2,
        guidance_scale=3.0,
        latents=latents[:1],
        output_type="latent",
        alignment=[method],
    ).images
    assert torch.allclose(both[:1], first, atol=1e-4)


def test_noise_optimization_all_noises_mode_replays_the_optimized_noises(ddim):
    reward = Redness()
    method = NoiseOptimization(reward=reward, optimize="all-noises", steps=3, lr=0.5)
    assert (method.optimizer, method.eta, method.grad_clip) == ("adamw", 1.0, 1.0)  # DNO's preset
    out = _call(ddim, [method])
    trace = out.traces["noise_optimization"]
    assert (trace["best"] >= trace["rewards"][0]).all()
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)


def test_noise_optimization_early_stopping_and_non_finite_gradients(ddim):
    reward = Redness()
    out = _call(ddim, [NoiseOptimization(reward=reward, steps=5, lr=1.0, optimizer="adamw", target=-10.0)])
    assert out.traces["noise_optimization"]["iterations"].tolist() == [1, 1]  # the target was met at once

    class NaNGradientForFirst(Redness):
        def score(self, images, prompts):
            images = images.clone()
            images.register_hook(lambda g: torch.cat([g[:1] * float("nan"), g[1:]]))
            return super().score(images, prompts)

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = ddim(
        PROMPTS,
        num_inference_steps=2,
        guidance_scale=3.0,
        latents=latents,
        output_type="latent",
        alignment=[NoiseOptimization(reward=NaNGradientForFirst(), steps=3, lr=1.0)],
    )
    trace = out.traces["noise_optimization"]
    assert trace["skipped"].tolist() == [3, 0]
    plain = ddim(PROMPTS, num_inference_steps=2, guidance_scale=3.0, latents=latents, output_type="latent").images
    assert torch.allclose(out.images[0], plain[0], atol=1e-5)  # the first image never moved
    assert not torch.allclose(out.images[1], plain[1], atol=1e-3)


def test_gradient_methods_refuse_non_differentiable_rewards():
    for cls in (NoiseOptimization, RewardGuidance):
        with pytest.raises(ValueError, match="JpegIncompressibility"):
            cls(reward=JpegIncompressibility())


def test_noise_norm_regularizer_is_the_chi_nll():
    z = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).half()
    norm = z.float().norm(dim=1)
    assert torch.allclose(noise_norm_nll(z), 0.5 * norm**2 - 63 * torch.log(norm))
    assert noise_norm_nll(z).dtype == torch.float32 and torch.isfinite(noise_norm_nll(z)).all()


def test_reward_guidance(ddim):
    reward = Redness()
    plain = _call(ddim)
    assert torch.allclose(_call(ddim, [RewardGuidance(reward=reward, scale=0.0)]).images, plain.images, atol=1e-6)
    guided = _call(ddim, [RewardGuidance(reward=reward, scale=30.0)])
    assert (reward(guided.images, PROMPTS) > reward(plain.images, PROMPTS)).all()
    trace = guided.traces["reward_guidance"]
    assert trace["steps"] == [0, 1, 2] and trace["skipped"] == 0
    assert guided.traces["compute"]["vae_decodes"] == 3 * 2 + 2


def test_systematic_resampling():
    log_w = torch.log(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.0, 0.5]]))
    parents = systematic_resample(log_w, torch.tensor([[0.3], [0.3], [0.0]]))
    assert parents.tolist() == [[2, 2, 2, 2], [0, 1, 2, 3], [0, 0, 3, 3]]


@pytest.mark.parametrize("scheduler,potential", [("ddim", "max"), ("euler_a", "diff"), ("ddim", "add")])
def test_particle_steering(scheduler, potential):
    pipe = get_tiny_pipeline(scheduler)
    reward = Redness()
    method = ParticleSteering(
        reward=reward,
        particles=3,
        potential=potential,
        resample_every=1,
        resample_start=0.0,
        resample_stop=1.0,
        ess_threshold=None,
    )
    out = _call(pipe, [method], steps=4)
    trace = out.traces["particle_steering"]
    assert trace["steps"] == [0, 1, 2]  # every step but the last
    for ess, parents in zip(trace["ess"], trace["parents"]):
        assert ((ess >= 1 - 1e-5) & (ess <= 3 + 1e-5)).all()
        assert parents.shape == (2, 3) and parents.min() >= 0 and parents.max() <= 2
    assert torch.allclose(out.rewards, trace["final_rewards"].max(dim=1).values)
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    again = _call(pipe, [method], steps=4)
    assert torch.allclose(again.images, out.images)  # deterministic per-particle streams
    assert out.traces["compute"]["nfe"] == 4 * 2 * 3
    assert len(out.images) == 2


def test_particle_steering_resamples_towards_high_weights(ddim):
    """With a huge lambda, each image's particles collapse onto the best one at the first resampling."""
    method = ParticleSteering(
        reward=Redness(),
        particles=4,
        lmbda=1e6,
        resample_every=1,
        resample_start=0.0,
        resample_stop=0.0,
        ess_threshold=0.5,
    )
    out = _call(ddim, [method], steps=3)
    trace = out.traces["particle_steering"]
    best = trace["rewards"][0].argmax(dim=1)
    assert trace["resampled"][0].all()
    assert (trace["parents"][0] == best[:, None]).all()


def test_particle_steering_refusals(ddim):
    with pytest.raises(ValueError, match="stochastic sampler"):
        _call(get_tiny_pipeline("euler"), [ParticleSteering(reward=Redness())])
    with pytest.raises(ValueError, match="stochastic sampler"):
        _call(ddim, [ParticleSteering(reward=Redness(), eta=0.0)])
    with pytest.raises(ValueError):
        _call(ddim, [ParticleSteering(reward=Redness()), BestOfN(reward=Redness())])
    with pytest.raises(ValueError, match="each draw the noise the sampler.s steps inject"):
        _call(ddim, [NoiseOptimization(reward=Redness(), optimize="all-noises"), ParticleSteering(reward=Redness())])
    with pytest.raises(ValueError, match="potential"):
        ParticleSteering(reward=Redness(), potential="min")


def test_methods_compose(ddim):
    """Seed search, then noise optimization from the chosen seed, then guidance, with best-of-N selection."""
    reward = Redness()
    out = _call(
        ddim,
        [
            SeedSearch(reward=reward, n=2),
            NoiseOptimization(reward=reward, steps=2, lr=1.0, optimizer="adamw"),
            RewardGuidance(reward=reward, scale=5.0),
            BestOfN(reward=reward, n=2),
        ],
    )
    assert len(out.images) == 2 and np.isfinite(out.rewards.numpy()).all()
    assert {"seed_search", "noise_optimization", "reward_guidance", "best_of_n"} <= set(out.traces)


def test_new_methods_from_command_line_specs():
    from ttalign.methods import method_from_spec

    po = method_from_spec("particle_steering:particles=2,reward=shapes_soft,potential=diff,ess_threshold=0.3")
    assert (po.particles, po.potential, po.ess_threshold) == (2, "diff", 0.3)
    no = method_from_spec("noise_optimization:reward=shapes_soft,optimize=all-noises,steps=7")
    assert (no.steps, no.optimizer, no.lr) == (7, "adamw", 0.01)
    assert method_from_spec("seed_search:reward=jpeg_incompressibility,n=3,rounds=1").rounds == 1
    assert method_from_spec("reward_guidance:reward=shapes_soft,scale=2.5").scale == 2.5
    with pytest.raises(ValueError, match="set `differentiable = True` on the `Reward` subclass"):
        method_from_spec("reward_guidance:reward=jpeg_incompressibility")

    def my_score(images, prompts):
        return images.mean(dim=(1, 2, 3))

    with pytest.raises(ValueError, match=r"mark the function with `my_score.differentiable = True`; otherwise use"):
        RewardGuidance(reward=my_score)
    my_score.differentiable = True
    assert RewardGuidance(reward=my_score).reward is my_score


def test_reno_defaults_on_a_one_step_schedule():
    """ReNO's setting: a one-step model (Euler ancestral from sigma_max to 0), no guidance, SGD with its defaults."""
    pipe = get_tiny_pipeline("euler_a")
    reward = Redness()
    method = NoiseOptimization(reward=reward, steps=4)
    assert (method.optimizer, method.lr, method.grad_clip, method.regularizer) == ("sgd", 5.0, 0.1, 0.01)
    out = pipe(
        PROMPTS,
        num_inference_steps=1,
        guidance_scale=0.0,
        output_type="pt",
        alignment=[method],
        generator=torch.Generator().manual_seed(0),
    )
    trace = out.traces["noise_optimization"]
    assert (trace["best"] > trace["rewards"][0]).all()
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    assert out.traces["compute"]["nfe"] == 4 * 2  # four iterations; the kept one's render is returned


@pytest.mark.parametrize("optimize", ["initial", "all-noises"])
def test_noise_optimization_reuses_its_render_on_a_flow_model_and_not_beside_step_methods(optimize):
    from ttalign.methods import TraceLatents
    from ttalign.testing import get_tiny_sd3_pipeline

    sd3 = get_tiny_sd3_pipeline()
    method = NoiseOptimization(reward=Redness(), optimize=optimize, steps=2, lr=0.5, eta=0.7)
    out = _call(sd3, [method], height=32, width=32)
    again = _call(sd3, [dataclasses.replace(method, reuse_render=False)], height=32, width=32)
    assert out.traces["noise_optimization"]["reused_render"]
    assert torch.allclose(out.images, again.images, atol=1e-5)
    assert again.traces["compute"]["nfe"] - out.traces["compute"]["nfe"] == 3 * 2  # one sampling per image saved
    # a method acting at the steps needs the loop: the kept noise is sampled again
    traced = _call(sd3, [method, TraceLatents()], height=32, width=32)
    assert not traced.traces["noise_optimization"]["reused_render"] and traced.traces["latents"].shape[0] == 3
    assert torch.allclose(traced.images, out.images, atol=1e-5)


@pytest.mark.parametrize("method", ["initial", "all-noises", "guidance", "attend_and_excite"])
def test_gradient_methods_freeze_the_weights_they_backpropagate_through(ddim, method):
    """The gradients are of the latents or noises only: while a method backpropagates, the UNet's and VAE's weights
    do not require grad (so no layer input is kept for them), and afterwards no weight holds a `.grad`."""
    from ttalign.methods import AttendAndExcite

    alignment = {
        "initial": NoiseOptimization(reward=Redness(), steps=2, lr=1.0),
        "all-noises": NoiseOptimization(reward=Redness(), optimize="all-noises", steps=2, lr=0.5),
        "guidance": RewardGuidance(reward=Redness(), scale=10.0),
        "attend_and_excite": AttendAndExcite(tokens=lambda p: p.split()[-1:], max_iter_to_alter=2),
    }[method]
    modules = {"unet": ddim.unet, "vae": ddim.vae}
    seen = {name: [] for name in modules}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out, name=name: (
                seen[name].append(mod.weight.requires_grad) if torch.is_grad_enabled() else None
            )
        )
        for name, m in (("unet", ddim.unet.conv_in), ("vae", ddim.vae.decoder.conv_in))
    ]
    try:
        _call(ddim, [alignment])
    finally:
        for hook in hooks:
            hook.remove()
    through = {"unet"} if method == "attend_and_excite" else {"vae"} if method == "guidance" else {"unet", "vae"}
    for name in through:
        assert seen[name] and not any(seen[name]), name  # a pass with gradients ran, with the weights frozen
    for name, module in modules.items():
        assert all(p.requires_grad for p in module.parameters()), name
        assert all(p.grad is None for p in module.parameters()), name
