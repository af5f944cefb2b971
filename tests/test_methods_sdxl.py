"""Every test-time method on tiny SDXL components, each checked as its Stable Diffusion test checks it; per-image
generator lists; refusals before any compute; methods know the model only through its family."""

import pathlib
import re

import numpy as np
import pytest
import torch

from ttalign.hooks import AlignmentMethod, Stage
from ttalign.methods import (
    AttendAndExcite,
    BestOfN,
    NoiseOptimization,
    ParticleSteering,
    RegionReweight,
    RewardGuidance,
    SeedSearch,
    TokenReweight,
    TraceLatents,
)
from ttalign.pipelines import StableDiffusionXLFamily
from ttalign.testing import Redness, get_tiny_pipeline, get_tiny_sdxl_pipeline, get_tiny_sdxl_unet

PROMPTS = ["a cat and a dog", "a red car and a tree"]


@pytest.fixture(scope="module")
def pipe():
    return get_tiny_sdxl_pipeline("ddim")


def _call(pipe, alignment=(), prompts=PROMPTS, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("guidance_scale", 5.0)
    kwargs.setdefault("output_type", "pt")
    generator = kwargs.pop("generator", torch.Generator().manual_seed(seed))
    return pipe(prompts, generator=generator, alignment=list(alignment), **kwargs)


def test_best_of_n_returns_the_best_candidate(pipe):
    n, reward = 3, Redness()
    out = _call(pipe, [BestOfN(reward=reward, n=n)], num_images_per_prompt=2)
    plain = _call(pipe, num_images_per_prompt=2 * n).images  # exactly the candidates
    scores = reward(plain, None).view(4, n)
    trace = out.traces["best_of_n"]
    assert torch.allclose(trace["scores"], scores, atol=1e-5) and torch.equal(trace["chosen"], scores.argmax(1))
    assert torch.allclose(out.images, plain[trace["selected"]], atol=1e-6)
    assert out.traces["compute"]["nfe"] == 3 * 4 * n


def _generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize(
    "method",
    [
        BestOfN(reward=Redness(), n=3),
        SeedSearch(reward=Redness(), n=2, rounds=1, neighbors=2),
        NoiseOptimization(reward=Redness(), steps=2, lr=2.0),  # SGD: AdamW's sign-like steps amplify rounding
        ParticleSteering(reward=Redness(), particles=3, resample_every=1, resample_start=0.0),
    ],
    ids=["best_of_n", "seed_search", "noise_optimization", "particle_steering"],
)
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_per_image_generator_lists(method, family, pipe):
    """With diffusers' per-image generators, each image's candidates, noises or particles derive from its own
    generator: an image comes out the same whether drawn in a batch or alone with its generator."""
    model = pipe if family == "sdxl" else get_tiny_pipeline("ddim")
    batch = _call(model, [method], generator=_generators(11, 12), eta=1.0)
    for k in range(2):
        alone = _call(model, [method], prompts=PROMPTS[k : k + 1], generator=_generators(11 + k), eta=1.0)
        assert torch.allclose(batch.images[k], alone.images[0], atol=1e-4)  # batched vs single convolutions
        assert torch.allclose(batch.rewards[k], alone.rewards[0], atol=1e-6)
    seeded = _call(model, [method], generator=_generators(11, 13), eta=1.0)
    assert torch.allclose(seeded.images[0], batch.images[0], atol=1e-4)  # image 0 does not depend on image 1's
    assert not torch.allclose(seeded.images[1], batch.images[1], atol=1e-3)
    if isinstance(method, BestOfN):  # each image's first candidate is what the plain call draws from its generator
        plain = _call(model, generator=_generators(11, 12), eta=1.0).images
        assert torch.allclose(batch.traces["best_of_n"]["scores"][:, 0], Redness()(plain, None), atol=1e-5)
    with pytest.raises(ValueError, match="list of 3 generators for 2 images"):
        _call(model, [method], generator=_generators(1, 2, 3))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_seed_search_returns_the_scored_image(pipe, eta):
    reward = Redness()
    plain = _call(pipe, eta=eta).images
    out = _call(pipe, [SeedSearch(reward=reward, n=3, rounds=1, neighbors=2)], eta=eta)
    scores = out.traces["seed_search"]["scores"]
    assert scores.shape == (2, 5) and torch.allclose(out.rewards, scores.max(dim=1).values)
    # the returned image is the one that was scored (with eta > 0 the method's injected noises are replayed)
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    if eta == 0:  # deterministic: the first candidate is the plain call's noise
        assert torch.allclose(_call(pipe, [SeedSearch(reward=reward, n=1)]).images, plain, atol=1e-5)
        assert (out.rewards >= reward(plain, PROMPTS) - 1e-5).all()


def test_noise_optimization_raises_the_reward(pipe):
    reward = Redness()
    out = _call(pipe, [NoiseOptimization(reward=reward, steps=4, lr=1.0, optimizer="adamw", grad_clip=None)])
    trace = out.traces["noise_optimization"]
    assert (trace["best"] > trace["rewards"][0]).all()
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    all_noises = _call(pipe, [NoiseOptimization(reward=reward, optimize="all-noises", steps=3, lr=0.5)])
    trace = all_noises.traces["noise_optimization"]
    assert (trace["best"] >= trace["rewards"][0]).all() and (trace["best"] > trace["rewards"][0]).any()
    assert torch.allclose(reward(all_noises.images, PROMPTS), all_noises.rewards, atol=1e-4)  # noises replayed


@pytest.mark.parametrize("scheduler", ["euler_a", "lcm"])
def test_noise_optimization_on_one_step_turbo_schedules(scheduler):
    """ReNO's setting on SDXL-Turbo-style one-step schedules (Euler ancestral, LCM), no guidance, its defaults."""
    pipe = get_tiny_sdxl_pipeline(scheduler)
    reward = Redness()
    out = _call(pipe, [NoiseOptimization(reward=reward, steps=4)], num_inference_steps=1, guidance_scale=0.0)
    trace = out.traces["noise_optimization"]
    assert (trace["best"] > trace["rewards"][0]).all()
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    assert out.traces["compute"]["nfe"] == (4 + 1) * 2


def test_reward_guidance(pipe):
    reward = Redness()
    plain = _call(pipe).images
    assert torch.allclose(_call(pipe, [RewardGuidance(reward=reward, scale=0.0)]).images, plain, atol=1e-6)
    guided = _call(pipe, [RewardGuidance(reward=reward, scale=200.0)])
    assert (reward(guided.images, PROMPTS) > reward(plain, PROMPTS)).all()
    assert guided.traces["reward_guidance"]["steps"] == [0, 1, 2]


def test_particle_steering(pipe):
    reward = Redness()
    method = ParticleSteering(reward=reward, particles=3, resample_every=1, resample_start=0.0, ess_threshold=None)
    out = _call(pipe, [method], num_inference_steps=4)
    trace = out.traces["particle_steering"]
    assert trace["steps"] == [0, 1, 2] and all(p.shape == (2, 3) for p in trace["parents"])
    assert torch.allclose(out.rewards, trace["final_rewards"].max(dim=1).values)
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    assert torch.allclose(_call(pipe, [method], num_inference_steps=4).images, out.images)
    with pytest.raises(ValueError, match="stochastic sampler"):
        _call(get_tiny_sdxl_pipeline("euler"), [ParticleSteering(reward=reward)])


def test_trace_latents(pipe):
    seen = []
    out = _call(pipe, [TraceLatents()], output_type="latent",
                callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or {})  # fmt: skip
    assert out.traces["latents"].shape == (3, 2, 4, 32, 32) and out.traces["x0"].shape == (3, 2, 4, 32, 32)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out.traces["latents"], seen))


def test_attend_and_excite_resolution_and_padding_from_the_family(pipe):
    """The maps' resolution is chosen from the UNet's layout: 16x16 on the tiny SDXL UNet (its only cross-attention
    level), 32x32 at 1024 px on SDXL's layout (10 layers at 64x64, 60 at 32x32); SDXL leaves padding out by default."""
    assert AttendAndExcite.default_resolution(pipe.family, 32, 32) == (16, 16)
    sdxl_layout = StableDiffusionXLFamily(type("P", (), {"unet": get_tiny_sdxl_unet("sdxl")})())
    assert sdxl_layout.cross_attention_resolutions(128, 128) == [(64, 64), (32, 32)]
    assert AttendAndExcite.default_resolution(sdxl_layout, 128, 128) == (32, 32)
    assert StableDiffusionXLFamily.attention_defaults["normalize_eot"] is True

    def losses(**kwargs):
        method = AttendAndExcite(tokens=["cat", "dog"], max_iter_to_alter=1, thresholds={}, **kwargs)
        return _call(pipe, [method], prompts=PROMPTS[:1]).traces["attend_and_excite"]["losses"][0]

    assert torch.equal(losses(), losses(normalize_eot=True))
    assert not torch.allclose(losses(), losses(normalize_eot=False))


def test_attend_and_excite_lowers_its_loss_and_changes_the_images(pipe):
    def run(refinements):
        method = AttendAndExcite(tokens=lambda p: p.split()[-4::3], max_iter_to_alter=2, thresholds={0: 0.99},
                                 scale_factor=2000, max_refinement_steps=refinements)  # fmt: skip
        return _call(pipe, [method])

    before, after = run(0), run(5)
    assert (after.traces["attend_and_excite"]["losses"][0] < before.traces["attend_and_excite"]["losses"][0]).all()
    assert max(after.traces["attend_and_excite"]["refinements"][0]) > 0
    assert (after.images - _call(pipe).images).abs().max() > 1e-3
    assert all(type(p).__name__ != "ControlProcessor" for p in pipe.unet.attn_processors.values())


def test_token_reweight_weights_both_encoders_and_not_the_pooled_embedding(pipe):
    captured = {}

    def grab(p, i, t, kwargs):
        captured.update(kwargs)
        return {}

    inputs = ["prompt_embeds", "add_text_embeds"]
    call = dict(prompts=["a red cat"], guidance_scale=1.0, callback_on_step_end=grab,
                callback_on_step_end_tensor_inputs=inputs)  # fmt: skip
    plain = _call(pipe, **call).images
    same = _call(pipe, [TokenReweight()], **dict(call, prompts=["a (red:1.0) cat"])).images
    assert torch.allclose(same, plain, atol=1e-6)
    weighted = _call(pipe, [TokenReweight()], **dict(call, prompts=["a (red:1.5) cat"]))
    embeds, _, pooled, _ = pipe.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=False)
    w = torch.ones(embeds.shape[1], 1)
    w[2] = 1.5
    expected = []
    for part in (embeds[..., :32], embeds[..., 32:]):  # each encoder's columns, its mean restored on its own
        scaled = part * w
        expected.append(scaled * (part.mean() / scaled.mean()))
    assert torch.allclose(captured["prompt_embeds"], torch.cat(expected, dim=-1), atol=1e-5)
    assert torch.equal(captured["add_text_embeds"], pooled)  # the pooled embedding is not weighted
    assert (weighted.images - plain).abs().max() > 1e-5
    # `prompt_2` carries its own weights for the second encoder
    both = _call(pipe, [TokenReweight()], prompt_2=["a red (cat:2)"], **dict(call, prompts=["a (red:1.5) cat"]))
    assert both.traces["token_reweight"]["prompts"] == ["a red cat"]
    second = captured["prompt_embeds"][..., 32:]
    assert torch.allclose(captured["prompt_embeds"][..., :32], expected[0], atol=1e-5)
    assert not torch.allclose(second, expected[1], atol=1e-4)
    attention = _call(pipe, [TokenReweight(mode="attention")], prompts=["a (red:3) cat"]).images
    assert (attention - _call(pipe, prompts=["a red cat"]).images).abs().max() > 1e-5


def test_region_reweight_moves_attention_into_the_region(pipe):
    from ttalign.attention import attention_control, sync_step

    class Probe(AlignmentMethod):
        stages = (Stage.ATTENTION, Stage.STEP_START)

        def __init__(self):
            self.maps = []

        def on_step_start(self, state):
            sync_step(state)

        def on_attention(self, state):
            control, maps = attention_control(state), self.maps

            class Keep:
                @staticmethod
                def wants(ctx):
                    return ctx.is_cross and ctx.step_index == 0

                def __call__(self, ctx, probs):
                    maps.append(probs[probs.shape[0] // 2 :, :, 2].mean(0).view(16, 16))

            control.recording = True
            control.recorders.append(Keep())

    shares = {}
    regions = {"cat": (0.0, 0.0, 0.5, 1.0)}
    for weight in (0.0, 1.0, 4.0):
        probe = Probe()
        _call(pipe, [RegionReweight(regions=regions, stop=1.0, cross_weight=weight, self_weight=0.0), probe],
              prompts=["a cat"])  # fmt: skip
        attention = torch.stack(probe.maps).mean(0)  # [16, 16]: the cat token's map at step 0
        shares[weight] = float(attention[:, :8].sum() / attention.sum())  # its share in the left half
    assert shares[4.0] > shares[1.0] > shares[0.0] and shares[4.0] > shares[0.0] + 0.02


def test_components_restored_when_a_method_raises(pipe):
    class Breaker(AlignmentMethod):
        stages = (Stage.ATTENTION, Stage.STEP_START)

        def on_attention(self, state):
            from ttalign.attention import attention_control

            attention_control(state)
            state.family.denoiser.train()

        def on_step_start(self, state):
            raise RuntimeError("boom")

    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        _call(pipe, [AttendAndExcite(tokens=["a"], max_iter_to_alter=1, thresholds={}), Breaker()])
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items()) and not pipe.unet.training


def test_a_method_the_family_cannot_run_is_refused_before_any_compute(pipe):
    class NoCrossAttention(StableDiffusionXLFamily):
        name = "No Cross-Attention"
        features = frozenset()

    class Pipe(type(pipe)):
        @property
        def family(self):
            return NoCrossAttention(self)

    limited = Pipe.from_pipe(pipe)
    calls = []
    handle = limited.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        for method in (AttendAndExcite(tokens=["cat"]), RegionReweight(regions={}), TokenReweight(mode="attention")):
            with pytest.raises(ValueError, match=f"{method.name} cannot run on the No Cross-Attention family"):
                _call(limited, [method])
        assert calls == []  # nothing was encoded
        assert np.isfinite(_call(limited, [TokenReweight()]).images.numpy()).all()  # embedding mode needs no maps
    finally:
        handle.remove()


def test_methods_trainers_and_the_sampler_know_models_only_through_their_family():
    root = pathlib.Path(__file__).resolve().parents[1] / "ttalign"
    files = sorted([*(root / "methods").glob("*.py"), *(root / "training").glob("*.py"), root / "sampling.py",
                    root / "attention.py"])  # fmt: skip
    pattern = re.compile(r"\.unet\b|encoder_hidden_states\s*=|StableDiffusion\w*Pipeline|pipe\.(text_encoder|vae|"
                         r"tokenizer)\b|unet\.config")  # fmt: skip
    offending = [f"{f.name}:{i}: {line.strip()}" for f in files for i, line in
                 enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert len(files) > 10 and offending == []


@pytest.mark.parametrize(
    "scheduler,eta,steps",
    [("ddim", 0.0, 3), ("ddim", 1.0, 3), ("euler", 0.0, 3), ("euler_a", 0.0, 1), ("lcm", 0.0, 2)],
)
def test_sampler_reproduces_the_sdxl_pipeline(scheduler, eta, steps):
    """`DifferentiableSampler` through the SDXL family (pooled embedding, time ids, CFG): the pipeline's latents."""
    from ttalign.sampling import DifferentiableSampler

    pipe = get_tiny_sdxl_pipeline(scheduler)
    expected = _call(pipe, output_type="latent", eta=eta, num_inference_steps=steps).images
    g = torch.Generator().manual_seed(0)  # the pipeline's draws in its order: initial latents, then one noise per step
    pipe.scheduler.set_timesteps(steps)
    latents = torch.randn(expected.shape, generator=g) * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        cond = pipe.family.encode_prompt(PROMPTS, "cpu", do_cfg=True, guidance_scale=5.0)
        sampler = DifferentiableSampler(pipe, cond, guidance_scale=5.0, eta=eta)
        out = sampler.sample(latents, sampler.draw_noises(latents.shape, generator=g))
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
