"""The request policy's parts without a server: methods' declared prices against the evaluations they spend, the
option types, and the bounds of what only the server sets."""

import pytest
import torch

from ttalign.hooks import price_image_steps
from ttalign.methods import (
    AttendAndExcite,
    BestOfN,
    NoiseOptimization,
    ParticleSteering,
    PromptRewrite,
    RewardGuidance,
    SeedSearch,
)
from ttalign.serve.policy import Flag, Float, Int, OptionError, Regions, RequestPolicy, StepValues, Words
from ttalign.serve.protocol import Limits


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


brightness.differentiable = True


def _nfe_per_image(aligned, methods, steps=3, n=2):
    out = aligned(
        ["a cat"] * n,
        num_inference_steps=steps,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        alignment=methods,
    )
    return out.traces["compute"]["nfe"] / n


@pytest.mark.parametrize(
    "methods",
    [
        [],
        [BestOfN(reward=brightness, n=3)],
        [SeedSearch(reward=brightness, n=2, rounds=1, neighbors=2)],
        [ParticleSteering(reward=brightness, particles=3, resample_every=1)],
    ],
    ids=["plain", "best_of_n", "seed_search", "particle_steering"],
)
def test_the_price_counts_the_denoiser_evaluations(pipes, methods):
    """Methods of a fixed budget declare it exactly: the price is the measured NFE per image, plus (particle
    steering) an evaluation per resampling for its decode and reward call."""
    _, aligned = pipes
    steps = 3
    measured = _nfe_per_image(aligned, methods, steps)
    extra = sum(m.extra_evaluations_per_render(steps) * m.renders_per_image(steps) for m in methods)
    assert price_image_steps(methods, steps) - extra == measured


@pytest.mark.parametrize(
    "methods",
    [
        [NoiseOptimization(reward=brightness, steps=2, lr=0.1)],
        [RewardGuidance(reward=brightness, scale=1.0)],
        [AttendAndExcite(tokens=["cat"], max_iter_to_alter=2, thresholds={0: 0.99}, max_refinement_steps=2)],
    ],
    ids=["noise_optimization", "reward_guidance", "attend_and_excite"],
)
def test_the_price_bounds_adaptive_methods(pipes, methods):
    """Methods that may stop early (or refine only below a threshold) declare an upper bound."""
    _, aligned = pipes
    steps = 3
    assert _nfe_per_image(aligned, methods, steps) <= price_image_steps(methods, steps)
    assert price_image_steps(methods, steps) > steps


def test_prices_multiply_renders_and_add_evaluations():
    steps = 10
    best, search = BestOfN(reward=brightness, n=4), SeedSearch(reward=brightness, n=4, rounds=2, neighbors=3)
    assert price_image_steps([best], steps) == 40
    assert price_image_steps([search], steps) == (4 + 2 * 3 + 1) * 10
    assert price_image_steps([best, search], steps) == 4 * 11 * 10
    guidance = RewardGuidance(reward=brightness, every=2)
    assert price_image_steps([best, guidance], steps) == 4 * (10 + len(guidance.guided_steps(steps)))
    rewrite = PromptRewrite(model="m", candidates=3, rounds=2, reward=brightness)
    assert price_image_steps([rewrite], steps) == (1 + 2 * 3 + 1) * 10
    assert price_image_steps([PromptRewrite(model="m")], steps) == 10


@pytest.mark.parametrize(
    "method",
    [
        BestOfN(reward=brightness, n=2),
        SeedSearch(reward=brightness, n=2, rounds=1, neighbors=2),
        NoiseOptimization(reward=brightness, steps=2),
        ParticleSteering(reward=brightness, particles=2),
        AttendAndExcite(tokens=["cat"], max_iter_to_alter=2, thresholds={0: 0.5, 1: 0.6}, max_refinement_steps=2),
        PromptRewrite(model="m", candidates=2, rounds=1, reward=brightness),
    ],
    ids=lambda m: m.name,
)
def test_each_costly_option_raises_the_price(method):
    """What a method declares costly is what its price grows with: raising any one of them raises the price."""
    import dataclasses

    assert method.costly_options
    steps = 10
    for option in method.costly_options:
        more = dataclasses.replace(method, **{option: getattr(method, option) + 1})
        assert price_image_steps([more], steps) > price_image_steps([method], steps), option


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": 601}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 11}, "max_retries"),
        ({"candidates": 0}, "candidates"),
    ],
)
def test_prompt_rewrite_bounds_its_own_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptRewrite(model="m", **kwargs)


class _Policy:
    limits = Limits(max_candidates=8, max_steps=50)
    rewards = {"shapes_soft": object()}


@pytest.mark.parametrize(
    "option,value,expected",
    [
        (Int(1), "4", 4),
        (Int(1), " +4 ", 4),
        (Int(1), 8, 8),
        (Int(1, 15, odd=True), 3, 3),
        (Float(0.0, 1.0), "0.5", 0.5),
        (Float(0.0, 1.0), 1, 1.0),
        (Flag(), "yes", True),
        (Flag(), False, False),
        (Words(), "red circle+blue square", ("red circle", "blue square")),
        (Words(), ["cat"], ("cat",)),
        (StepValues(Float(0.0, 1.0)), "10:0.5;0:0.05", ((0, 0.05), (10, 0.5))),
        (StepValues(Float(0.0, 1.0)), {"0": 0.05}, ((0, 0.05),)),
        (Regions(), "red circle:0 0 0.5 1", (("red circle", (0.0, 0.0, 0.5, 1.0)),)),
    ],
)
def test_options_coerce_to_canonical_values(option, value, expected):
    assert option.coerce(value, _Policy()) == expected


@pytest.mark.parametrize(
    "option,value,message",
    [
        (Int(1), 9, "between 1 and 8, got 9"),
        (Int(1), "1e9", "expected an integer"),
        (Int(1), True, "expected an integer"),
        (Int(1), "9" * 40, "expected an integer"),
        (Int(1, 15, odd=True), 4, "must be odd"),
        (Float(0.0, 1.0), float("nan"), "finite"),
        (Float(0.0, 1.0), "inf", "finite"),
        (Float(0.0, 1.0, open_low=True), 0, "must be in (0, 1]"),
        (Flag(), "maybe", "true or false"),
        (Words(), "+".join(["w"] * 9), "1 to 8 words"),
        (Words(), ["x" * 41], "at most 40"),
        (Words(), ["a\x00b"], "printable"),
        (StepValues(Float(0.0, 1.0)), "51:0.5", "between 0 and 50"),
        (StepValues(Float(0.0, 1.0)), "nonsense", "STEP:VALUE"),
        (Regions(), "cat:0 0 0.5", "4 numbers"),
        (Regions(), "cat:0.5 0 0.5 1", "x0 < x1"),
    ],
)
def test_options_refuse_with_the_value_named(option, value, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        option.coerce(value, _Policy())


def test_canonical_keys_leave_out_the_servers_values():
    from ttalign.serve.protocol import APIError

    policy = RequestPolicy(Limits(), "m", {"best_of_n": {"n": 4}}, [], {"r": brightness}, native_side=32)
    (key,), (method,) = policy.methods(["best_of_n:reward=r,n=4"])
    (other_key,), (other,) = policy.methods([" best_of_n : reward = r ,"])
    assert key == other_key == ("best_of_n", (("reward", "r"),)) and method is other
    assert method.n == 4 and policy.cached_methods == 1  # the server's value
    with pytest.raises(APIError, match="given twice"):
        policy.methods(["best_of_n:n=2,n=3,reward=r"])
    policy = RequestPolicy(Limits(), "m", {"noise_optimization": {}}, [], {"r": brightness}, native_side=32)
    with pytest.raises(APIError, match="'gradient_checkpointing' of method 'noise_optimization' is set by the server"):
        policy.methods(["noise_optimization:reward=r,gradient_checkpointing=true"])


def test_a_cancelled_job_is_answered_with_why_whichever_side_notices(pipes):
    """The worker's own deadline check (in its denoiser hook) and the server's both cancel a job; either way the job's
    answer says why: 504 past its deadline, 499 when its client left, each exactly once."""
    from ttalign.serve.protocol import APIError, ImageRequest
    from ttalign.serve.worker import Job, PipelineWorker, new_seeds

    _, aligned = pipes
    worker = PipelineWorker(aligned)
    try:
        slow = ImageRequest(prompt="a cat", steps=400)
        timed = worker.submit(Job(slow, [], new_seeds(slow), timeout_s=0.5))  # expires while its call runs
        with pytest.raises(APIError) as error:
            timed.done.result(timeout=60)
        assert error.value.status == 504 and "within 0.5 s" in str(error.value) and timed.cancelled == "timeout"

        blocker = worker.submit(Job(slow, [], new_seeds(slow), timeout_s=1.0))
        queued = worker.submit(Job(ImageRequest(prompt="a dog", steps=2), [], [0]))
        worker.cancel(queued, "disconnected")  # still queued behind the blocker: answered at once
        with pytest.raises(APIError) as error:
            queued.done.result(timeout=1)
        assert error.value.status == 499
        worker.cancel(queued, "timeout")  # a second cancellation changes nothing
        assert queued.cancelled == "disconnected"
        with pytest.raises(APIError):
            blocker.done.result(timeout=60)
        quick = worker.submit(Job(ImageRequest(prompt="a dog", steps=2), [], [0]))
        assert len(quick.done.result(timeout=60)["images"]) == 1  # the worker goes on
    finally:
        worker.stop()
