"""BestOfN and TraceLatents."""

import pytest
import torch

from ttalign.methods import BestOfN, TraceLatents, method_from_spec
from ttalign.rewards import JpegIncompressibility
from ttalign.sampling import predict_x0
from ttalign.testing import get_tiny_scheduler


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_best_of_n_returns_the_best_candidate(pipes):
    reference, aligned = pipes
    n = 4
    out = aligned(
        ["a cat", "a dog"],
        num_inference_steps=2,
        output_type="pt",
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        alignment=[BestOfN(reward=brightness, n=n)],
    )
    assert out.images.shape == (4, 3, 64, 64)
    trace = out.traces["best_of_n"]
    assert trace["scores"].shape == (4, n)
    # the candidates are exactly what the plain pipeline draws with num_images_per_prompt * n
    plain = reference(
        ["a cat", "a dog"],
        num_inference_steps=2,
        output_type="pt",
        num_images_per_prompt=2 * n,
        generator=torch.Generator().manual_seed(0),
    ).images
    plain_scores = brightness(plain, None).view(4, n)
    assert torch.allclose(trace["scores"], plain_scores, atol=1e-5)
    assert torch.equal(trace["chosen"], plain_scores.argmax(1))
    assert torch.allclose(out.images, plain[trace["selected"]], atol=1e-6)
    assert torch.allclose(out.rewards, plain_scores.max(1).values, atol=1e-5)
    assert out.traces["compute"]["nfe"] == 2 * 4 * n
    assert out.traces["compute"]["reward_calls"] == 1


def test_best_of_n_latent_output_and_reward_batches(pipes):
    _, aligned = pipes
    calls = []

    def counting_reward(images, prompts):
        calls.append(len(prompts))
        return images.mean(dim=(1, 2, 3))

    out = aligned(
        "a cat",
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        alignment=[BestOfN(reward=counting_reward, n=5, reward_batch_size=2)],
    )
    assert out.images.shape == (1, 4, 32, 32)
    assert calls == [2, 2, 1]


def test_best_of_n_with_jpeg_reward_beats_single_sample(pipes):
    _, aligned = pipes
    reward = JpegIncompressibility()
    out = aligned(
        "a cat",
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        alignment=[BestOfN(reward=reward, n=4)],
    )
    assert out.rewards.item() == pytest.approx(out.traces["best_of_n"]["scores"].max().item())
    assert out.rewards.item() == pytest.approx(reward(out.images, ["a cat"]).item())


def test_best_of_n_bad_input(pipes):
    _, aligned = pipes
    with pytest.raises(ValueError, match="n >= 1, got n=0"):
        BestOfN(reward=brightness, n=0)
    with pytest.raises(ValueError, match="callable reward"):
        BestOfN(reward="pickscore")
    with pytest.raises(ValueError, match="list of 2 generators for 1 images"):  # diffusers' per-image lists: one each
        aligned("a cat", num_inference_steps=2, generator=[torch.Generator()] * 2, alignment=[BestOfN(brightness, 2)])
    with pytest.raises(ValueError, match="do not pass `latents`"):
        aligned("a cat", num_inference_steps=2, latents=torch.randn(1, 4, 32, 32), alignment=[BestOfN(brightness, 2)])
    with pytest.raises(ValueError, match="pass `prompt`, not only `prompt_embeds`"):
        aligned(prompt_embeds=torch.zeros(1, 77, 32), num_inference_steps=2, alignment=[BestOfN(brightness, 2)])
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        aligned("a cat", num_inference_steps=2, alignment=[BestOfN(lambda i, p: torch.zeros(3), 2)])


def test_best_of_n_ignores_nan_scores_and_refuses_all_nan(pipes):
    _, aligned = pipes

    def half_nan(images, prompts):
        scores = images.mean(dim=(1, 2, 3))
        scores[0] = float("nan")
        return scores

    with pytest.warns(UserWarning, match="1 non-finite"):
        out = aligned("a cat", num_inference_steps=2, alignment=[BestOfN(half_nan, 3)])
    assert out.traces["best_of_n"]["chosen"].item() != 0
    with pytest.raises(ValueError, match="no finite score"):
        aligned("a cat", num_inference_steps=2, alignment=[BestOfN(lambda i, p: torch.full((2,), float("nan")), 2)])


def test_trace_latents_records_each_step(pipes):
    reference, aligned = pipes
    seen = []
    reference(
        "a cat",
        num_inference_steps=3,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or {},
    )
    out = aligned(
        "a cat",
        num_inference_steps=3,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        alignment=[TraceLatents()],
    )
    assert out.traces["latents"].shape == (3, 1, 4, 32, 32)
    assert out.traces["x0"].shape == (3, 1, 4, 32, 32)
    assert len(out.traces["timesteps"]) == 3
    for recorded, expected in zip(out.traces["latents"], seen):
        assert torch.allclose(recorded, expected, atol=1e-6)
    assert torch.allclose(out.traces["latents"][-1], out.images, atol=1e-6)


def test_trace_latents_every(pipes):
    _, aligned = pipes
    out = aligned("a cat", num_inference_steps=5, output_type="latent", alignment=[TraceLatents(every=2, x0=False)])
    assert out.traces["latents"].shape[0] == 3  # steps 0, 2, 4
    assert "x0" not in out.traces


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_add_noise(scheduler, prediction_type):
    """x0 from the exact noise (or v) of a noised sample recovers the clean sample."""
    sched = get_tiny_scheduler(scheduler)
    sched.register_to_config(prediction_type=prediction_type)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = sched.timesteps[3]
    a = sched.alphas_cumprod[int(t)]
    if scheduler == "euler":
        sched._step_index = 3
        sigma = sched.sigmas[3]
        sample = x0 + sigma * noise
        a = 1 / (1 + sigma**2)  # the UNet sees sample * sqrt(a), the VP-space sample at the same noise level
        v = a**0.5 * noise - (1 - a) ** 0.5 * x0
    else:
        sample = sched.add_noise(x0, noise, t.reshape(1))
        v = sched.get_velocity(x0, noise, t.reshape(1))
    output = noise if prediction_type == "epsilon" else v
    assert torch.allclose(predict_x0(sched, output, t, sample), x0, atol=1e-4)


def test_method_from_spec():
    method = method_from_spec("best_of_n:n=3,reward=jpeg_compressibility")
    assert isinstance(method, BestOfN) and method.n == 3
    trace = method_from_spec("trace_latents:every=2,x0=false")
    assert trace.every == 2 and trace.x0 is False
    with pytest.raises(ValueError, match="Unknown alignment method 'nope'"):
        method_from_spec("nope")
    with pytest.raises(ValueError, match="Unknown option 'm' for method 'best_of_n'"):
        method_from_spec("best_of_n:m=3")
    with pytest.raises(ValueError, match="Bad value 'x' for option 'n'"):
        method_from_spec("best_of_n:n=x,reward=jpeg_compressibility")
    with pytest.raises(ValueError, match="Unknown reward 'nope'"):
        method_from_spec("best_of_n:reward=nope")
    with pytest.raises(ValueError, match="missing 1 required positional argument: 'reward'"):
        method_from_spec("best_of_n:n=2")
