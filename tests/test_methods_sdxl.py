"""Every test-time method on tiny SDXL components, each checked as its Stable Diffusion test checks it; per-image
generator lists; refusals before any compute; methods know the model only through its family."""

import numpy as np
import pytest
import torch

from ttalign.hooks import AlignmentMethod, Stage
from ttalign.methods import (
    AttendAndExcite,
    NoiseOptimization,
    RegionReweight,
    TokenReweight,
)
from ttalign.pipelines import StableDiffusionXLFamily
from ttalign.testing import Redness, get_tiny_sdxl_pipeline, get_tiny_sdxl_unet

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


def _generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("scheduler", ["euler_a", "lcm"])
def test_noise_optimization_on_one_step_turbo_schedules(scheduler):
    """ReNO's setting on SDXL-Turbo-style one-step schedules (Euler ancestral, LCM), no guidance, its defaults."""
    pipe = get_tiny_sdxl_pipeline(scheduler)
    reward = Redness()
    out = _call(pipe, [NoiseOptimization(reward=reward, steps=4)], num_inference_steps=1, guidance_scale=0.0)
    trace = out.traces["noise_optimization"]
    assert (trace["best"] > trace["rewards"][0]).all()
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    assert out.traces["compute"]["nfe"] == 4 * 2  # the kept iterate's own render is returned


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
        method = AttendAndExcite(
            tokens=lambda p: p.split()[-4::3],
            max_iter_to_alter=2,
            thresholds={0: 0.99},
            scale_factor=2000,
            max_refinement_steps=refinements,
        )
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
    call = dict(
        prompts=["a red cat"], guidance_scale=1.0, callback_on_step_end=grab, callback_on_step_end_tensor_inputs=inputs
    )
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
        _call(
            pipe,
            [RegionReweight(regions=regions, stop=1.0, cross_weight=weight, self_weight=0.0), probe],
            prompts=["a cat"],
        )
        attention = torch.stack(probe.maps).mean(0)  # [16, 16]: the cat token's map at step 0
        shares[weight] = float(attention[:, :8].sum() / attention.sum())  # its share in the left half
    assert shares[4.0] > shares[1.0] > shares[0.0] and shares[4.0] > shares[0.0] + 0.02


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


@pytest.mark.parametrize(
    "scheduler,eta,steps",
    [("ddim", 0.0, 3), ("ddim", 1.0, 3), ("euler", 0.0, 3), ("euler_a", 0.0, 1), ("lcm", 0.0, 2)],
)
def test_sampler_reproduces_the_sdxl_pipeline(scheduler, eta, steps):
    """`DifferentiableSampler` through the SDXL family (pooled embedding, time ids, CFG): the pipeline's latents."""
    from ttalign.sampler import DifferentiableSampler

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
