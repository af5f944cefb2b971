"""The test-time methods on every registered model family (`ttalign.pipelines.FAMILIES`), through one shared fixture:
a family added to the registry (with its tiny pipeline in `ttalign.testing.TINY_FAMILY_PIPELINES`) gets these tests
for free. What differs between families is read from their declared capabilities, never from their names."""

import numpy as np
import pytest
import torch

from ttalign.hooks import AlignmentMethod, Stage
from ttalign.methods import (
    AttendAndExcite,
    BestOfN,
    NoiseOptimization,
    ParticleSteering,
    RewardGuidance,
    SeedSearch,
    TraceLatents,
)
from ttalign.pipelines import FAMILIES
from ttalign.testing import Redness, get_tiny_family_pipeline

PROMPTS = ["a cat and a dog", "a red car and a tree"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def pipe(request):
    """The tiny aligned pipeline of each registered family, built once for this module."""
    return get_tiny_family_pipeline(request.param)


def _flow(pipe) -> bool:
    return "flow_matching" in pipe.family.features


def _stochastic(pipe) -> dict:
    """Call arguments of a stochastic sampler: DDIM's eta on the diffusion families; the flow families' methods bring
    their own SDE (their `eta`, Flow-GRPO's noise level)."""
    return {} if _flow(pipe) else {"eta": 1.0}


def _call(pipe, alignment=(), prompts=PROMPTS, seed=0, **kwargs):
    size = pipe.family.default_image_size if not _flow(pipe) else 32
    kwargs = {"num_inference_steps": 3, "output_type": "pt", "height": size, "width": size, **kwargs}
    generator = kwargs.pop("generator", torch.Generator().manual_seed(seed))
    return pipe(prompts, generator=generator, alignment=list(alignment), **kwargs)


def _generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_best_of_n_returns_the_best_candidate(pipe):
    n, reward = 3, Redness()
    out = _call(pipe, [BestOfN(reward=reward, n=n)], num_images_per_prompt=2)
    plain = _call(pipe, num_images_per_prompt=2 * n).images  # exactly the candidates
    scores = reward(plain, None).view(4, n)
    trace = out.traces["best_of_n"]
    assert torch.allclose(trace["scores"], scores, atol=1e-5) and torch.equal(trace["chosen"], scores.argmax(1))
    assert torch.allclose(out.images, plain[trace["selected"]], atol=1e-6)
    assert out.traces["compute"]["nfe"] == 3 * 4 * n


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
def test_per_image_generator_lists(pipe, method):
    """With diffusers' per-image generators, each image's candidates, noises or particles derive from its own
    generator: an image comes out the same whether drawn in a batch or alone with its generator."""
    stochastic = _stochastic(pipe)
    batch = _call(pipe, [method], generator=_generators(11, 12), **stochastic)
    for k in range(2):
        alone = _call(pipe, [method], prompts=PROMPTS[k : k + 1], generator=_generators(11 + k), **stochastic)
        assert torch.allclose(batch.images[k], alone.images[0], atol=1e-4)  # batched vs single convolutions
        assert torch.allclose(batch.rewards[k], alone.rewards[0], atol=1e-5)
    seeded = _call(pipe, [method], generator=_generators(11, 13), **stochastic)
    assert torch.allclose(seeded.images[0], batch.images[0], atol=1e-4)  # image 0 does not depend on image 1's
    assert not torch.allclose(seeded.images[1], batch.images[1], atol=1e-3)
    if isinstance(method, BestOfN):  # each image's first candidate is what the plain call draws from its generator
        plain = _call(pipe, generator=_generators(11, 12), **stochastic).images
        assert torch.allclose(batch.traces["best_of_n"]["scores"][:, 0], Redness()(plain, None), atol=1e-5)
    with pytest.raises(ValueError, match="list of 3 generators for 2 images"):
        _call(pipe, [method], generator=_generators(1, 2, 3))


def test_seed_search_returns_the_scored_image(pipe):
    reward = Redness()
    plain = _call(pipe).images
    out = _call(pipe, [SeedSearch(reward=reward, n=3, rounds=1, neighbors=2)])
    scores = out.traces["seed_search"]["scores"]
    assert scores.shape == (2, 5) and torch.allclose(out.rewards, scores.max(dim=1).values)
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)  # the returned image was scored
    # deterministic sampler: the first candidate is the plain call's noise
    assert torch.allclose(_call(pipe, [SeedSearch(reward=reward, n=1)]).images, plain, atol=1e-5)
    assert (out.rewards >= reward(plain, PROMPTS) - 1e-5).all()
    if not _flow(pipe):  # with DDIM's eta > 0 the method's injected noises are replayed in the pipeline's loop
        noisy = _call(pipe, [SeedSearch(reward=reward, n=3, rounds=1, neighbors=2)], eta=1.0)
        assert torch.allclose(reward(noisy.images, PROMPTS), noisy.rewards, atol=1e-4)


def test_noise_optimization_raises_the_reward(pipe):
    reward = Redness()
    out = _call(pipe, [NoiseOptimization(reward=reward, steps=4, lr=1.0, optimizer="adamw", grad_clip=None)])
    trace = out.traces["noise_optimization"]
    assert (trace["best"] > trace["rewards"][0]).all()
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    # DNO over every injected noise (DDIM eta 1, or Flow-GRPO's SDE at noise level 0.7), replayed in the loop
    method = NoiseOptimization(reward=reward, optimize="all-noises", steps=3, lr=0.5, eta=0.7 if _flow(pipe) else 1.0)
    all_noises = _call(pipe, [method])
    trace = all_noises.traces["noise_optimization"]
    assert (trace["best"] >= trace["rewards"][0]).all() and (trace["best"] > trace["rewards"][0]).any()
    assert torch.allclose(reward(all_noises.images, PROMPTS), all_noises.rewards, atol=1e-4)
    with pytest.raises(ValueError, match="stochastic schedule"):
        _call(pipe, [NoiseOptimization(reward=reward, optimize="all-noises", steps=1, eta=0.0)])


def test_reward_guidance_raises_the_reward(pipe):
    reward = Redness()
    plain = _call(pipe).images
    assert torch.allclose(_call(pipe, [RewardGuidance(reward=reward, scale=0.0)]).images, plain, atol=1e-6)
    guided = _call(pipe, [RewardGuidance(reward=reward, scale=50.0 if _flow(pipe) else 200.0)])
    assert (reward(guided.images, PROMPTS) > reward(plain, PROMPTS)).all()
    assert guided.traces["reward_guidance"]["steps"] == [0, 1, 2]


def test_particle_steering_resamples_and_returns_the_best_particle(pipe):
    reward = Redness()
    method = ParticleSteering(
        reward=reward,
        particles=3,
        resample_every=1,
        resample_start=0.0,
        ess_threshold=None,
        eta=0.7 if _flow(pipe) else 1.0,
    )
    out = _call(pipe, [method], num_inference_steps=4)
    trace = out.traces["particle_steering"]
    assert trace["steps"] == [0, 1, 2] and all(p.shape == (2, 3) for p in trace["parents"])
    assert torch.allclose(out.rewards, trace["final_rewards"].max(dim=1).values)
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    assert torch.allclose(_call(pipe, [method], num_inference_steps=4).images, out.images)  # seeded: repeatable
    with pytest.raises(ValueError, match="stochastic sampler"):
        _call(pipe, [ParticleSteering(reward=reward, eta=0.0)])


def test_trace_latents_are_the_loops_latents(pipe):
    seen = []
    out = _call(
        pipe,
        [TraceLatents()],
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or {},
    )
    size = pipe.family.default_image_size if not _flow(pipe) else 32
    latents = out.traces["latents"]
    assert latents.shape[:2] == (3, 2) and out.traces["x0"].shape == latents.shape
    unpacked = [pipe.family.unpack_latents(x, size, size) for x in seen]  # packed latents (FLUX) -> image-shaped
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(latents, unpacked))


def test_components_restored_when_a_method_raises(pipe):
    denoiser = pipe.family.denoiser

    class Breaker(AlignmentMethod):
        stages = (Stage.ATTENTION, Stage.STEP_START)

        def on_attention(self, state):
            state.family.denoiser.train()

        def on_step_start(self, state):
            raise RuntimeError("boom")

    processors = dict(denoiser.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        _call(pipe, [AttendAndExcite(tokens=["a"], max_iter_to_alter=1, thresholds={}), Breaker()])
    assert all(denoiser.attn_processors[k] is v for k, v in processors.items()) and not denoiser.training
    assert np.isfinite(_call(pipe).images.numpy()).all()


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    """VQAScore on a tiny Qwen2.5-VL (differentiable) and the question-decomposed score on it."""
    from ttalign.rewards import QuestionScore, VQAScore
    from ttalign.testing import save_tiny_vlm

    score = VQAScore.from_pretrained(save_tiny_vlm(str(tmp_path_factory.mktemp("vlm")), "qwen2_5_vl"))
    return score, QuestionScore(score, lambda prompt: [f"Is there {part}?" for part in prompt.split(" and ")])


@pytest.mark.parametrize("which", ["vqascore", "questions"])
def test_reward_driven_methods_take_vision_language_rewards(pipe, vqa, which):
    """Every reward-driven method runs with VQAScore and its question-decomposed form, the gradient methods through
    the model's own processor: each returns the rewards it selected by or raised."""
    reward = vqa[0] if which == "vqascore" else vqa[1]
    methods = [
        BestOfN(reward=reward, n=2),
        SeedSearch(reward=reward, n=2, rounds=1, neighbors=1),
        ParticleSteering(reward=reward, particles=2, resample_every=1, resample_start=0.0),
        NoiseOptimization(reward=reward, steps=2),
        RewardGuidance(reward=reward, scale=1.0),
    ]
    for method in methods:
        kwargs = _stochastic(pipe) if isinstance(method, ParticleSteering) else {}
        out = _call(pipe, [method], **kwargs)
        assert out.images.shape[0] == 2 and torch.isfinite(out.images).all(), type(method).__name__
        if not isinstance(method, RewardGuidance):
            assert out.rewards.shape == (2,) and ((out.rewards >= 0) & (out.rewards <= 1)).all()
    if which == "questions":  # the winners' answers reach the trace
        best = _call(pipe, [BestOfN(reward=reward, n=2)]).traces["best_of_n"]["reward_details"]
        assert [q["question"] for q in best[0]["questions"]] == ["Is there a cat?", "Is there a dog?"]
