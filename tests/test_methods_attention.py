"""Attention control: Attend-and-Excite parity with diffusers' deprecated pipeline, token and region re-weighting."""

import warnings

import numpy as np
import pytest
import torch

from ttalign import AlignedStableDiffusionPipeline
from ttalign.attention import LayerContext
from ttalign.methods import AttendAndExcite, RegionReweight, TokenReweight
from ttalign.methods.attention import gaussian_kernel, parse_weighted_prompt, token_spans
from ttalign.pipelines.stable_diffusion import ControlProcessor
from ttalign.rewards import Reward
from ttalign.testing import Redness, get_tiny_components, get_tiny_pipeline

PROMPTS = ["a cat and a dog", "a red car and a tree"]


@pytest.fixture(scope="module")
def pipe():
    return get_tiny_pipeline("ddim")


def _call(pipe, prompts=PROMPTS, alignment=(), **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("guidance_scale", 7.5)
    return pipe(
        prompts, output_type="np", generator=torch.Generator().manual_seed(0), alignment=list(alignment), **kwargs
    )


def _reference_and_ours(components):
    from diffusers import StableDiffusionAttendAndExcitePipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = StableDiffusionAttendAndExcitePipeline(
            **{k: v for k, v in components.items() if k != "image_encoder"}
        )
    reference.set_progress_bar_config(disable=True)
    ours = AlignedStableDiffusionPipeline.from_pipe(reference)
    ours.set_progress_bar_config(disable=True)
    return reference, ours


def test_attend_and_excite_reproduces_diffusers_pipeline(tiny_components):
    reference, ours = _reference_and_ours(tiny_components)
    settings = {"max_iter_to_alter": 3, "thresholds": {1: 0.5}, "scale_factor": 20, "attn_res": (16, 16)}
    indices = [[2, 5], [3, 6]]
    expected = reference(
        PROMPTS,
        token_indices=indices,
        num_inference_steps=4,
        guidance_scale=7.5,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **settings,
    ).images
    out = _call(ours, alignment=[AttendAndExcite(token_indices=indices, **settings)])
    plain = _call(ours).images
    assert np.abs(out.images - expected).max() <= 1e-4
    assert np.abs(plain - expected).max() > 3e-4  # the method did change the images (parity is ~1e-5)
    refinements = out.traces["attend_and_excite"]["refinements"]
    assert len(refinements) == 3 and max(refinements[1]) > 0  # refined at the threshold step
    # words are mapped to the same token indices automatically
    by_words = _call(ours, alignment=[AttendAndExcite(tokens=lambda p: p.split()[-4::3], **settings)])
    assert np.abs(by_words.images - out.images).max() <= 1e-6
    # the UNet's processors are the original ones again
    assert all(type(p).__name__ != "ControlProcessor" for p in ours.unet.attn_processors.values())


def test_attend_and_excite_reproduces_diffusers_pipeline_on_sd_layout(monkeypatch):
    """Stable Diffusion 1.x's UNet layout: the maps at the chosen resolution come from two down and three up layers
    (other resolutions, the mid block and every self-attention layer keep their fast path) and are averaged as the
    reference averages them. At 128 px: with 8x8 latents the UNet's 1x1 mid block makes its own gradients differ
    between a batch and single samples, so no batched method could match a per-sample loop there."""
    reference, ours = _reference_and_ours(get_tiny_components(layout="sd"))
    settings = {"max_iter_to_alter": 2, "thresholds": {}, "scale_factor": 1000, "attn_res": (8, 8)}
    indices = [[2, 5], [3, 6]]
    call = {"num_inference_steps": 3, "guidance_scale": 7.5, "height": 128, "width": 128}
    expected = reference(
        PROMPTS,
        token_indices=indices,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **call,
        **settings,
    ).images
    explicit = []
    control_explicit = ControlProcessor.explicit

    def counting(attn, hidden_states, encoder_hidden_states, *args):
        explicit.append(hidden_states.shape[1])
        return control_explicit(attn, hidden_states, encoder_hidden_states, *args)

    monkeypatch.setattr(ControlProcessor, "explicit", staticmethod(counting))
    out = _call(ours, alignment=[AttendAndExcite(token_indices=indices, **settings)], **call)
    # only the 8x8 cross-attention layers (64 queries) took the explicit path: five per A&E forward, two forwards,
    # each recomputed once in its backward (the loss passes' gradient checkpointing), and the first one's forward
    # without gradients that finds the last layer read
    assert explicit == [64] * 25
    explicit.clear()
    kept = _call(
        ours, alignment=[AttendAndExcite(token_indices=indices, gradient_checkpointing=False, **settings)], **call
    )
    assert explicit == [64] * 15
    monkeypatch.undo()
    plain = _call(ours, **call).images
    assert np.abs(out.images - expected).max() <= 1e-4
    assert np.abs(kept.images - out.images).max() <= 1e-6
    assert np.abs(plain - expected).max() > 3e-3  # the method's effect (parity is ~2e-6)


def test_token_spans_include_sub_words(pipe):
    tokenizer = pipe.tokenizer
    assert token_spans(tokenizer, "a cat and a dog", ["cat", "dog"]) == [[2], [5]]
    pieces = tokenizer.tokenize("zebra")
    assert len(pieces) > 1  # not in the generated vocabulary: split into characters
    assert token_spans(tokenizer, "a zebra and a cat", ["zebra", "cat"]) == [
        list(range(2, 2 + len(pieces))),
        [2 + len(pieces) + 2],
    ]
    with pytest.raises(ValueError, match="'horse' is not in the prompt"):
        token_spans(tokenizer, "a cat", ["horse"])


def test_attend_and_excite_settings_and_errors(pipe):
    method = AttendAndExcite(tokens=["cat"])
    assert method.thresholds == {0: 0.05, 10: 0.5, 20: 0.8} and method.max_iter_to_alter == 25
    assert method.scale_factor == 20 and method.attn_res is None  # chosen from the denoiser's layout:
    assert AttendAndExcite.default_resolution(pipe.family, 32, 32) == (16, 16)  # the only one of the tiny UNet
    sd_layout = AlignedStableDiffusionPipeline(**get_tiny_components(layout="sd")).family
    assert sd_layout.cross_attention_resolutions(64, 64) == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert AttendAndExcite.default_resolution(sd_layout, 64, 64) == (16, 16)  # SD 1.x at 512 px: the reference's
    kernel = gaussian_kernel(3, 0.5)
    assert kernel.shape == (3, 3) and torch.isclose(kernel.sum(), torch.tensor(1.0))
    assert kernel[1, 1] / kernel[0, 1] == pytest.approx(np.exp(1.0), rel=1e-5)  # exp(-((x - m) / (2 sigma))^2)
    with pytest.raises(ValueError, match="exactly one"):
        AttendAndExcite()
    with pytest.raises(ValueError, match="resolution"):
        _call(pipe, alignment=[AttendAndExcite(tokens=["a"], attn_res=(5, 5), max_iter_to_alter=1, thresholds={})])
    assert all(type(p).__name__ != "ControlProcessor" for p in pipe.unet.attn_processors.values())
    with pytest.raises(ValueError, match="from_where"):
        AttendAndExcite(tokens=["cat"], from_where=("left",))


def test_attend_and_excite_records_only_the_chosen_layers(pipe, monkeypatch):
    """`from_where` picks the UNet parts whose maps are recorded: fewer layers take the explicit path, and the maps
    (so the losses) change; the default records every part, as the reference."""
    calls = []
    explicit = ControlProcessor.explicit

    def counting(attn, hidden_states, encoder_hidden_states, attention_mask, temb, ctx, *hooks):
        calls.append(ctx.name.split(".")[0])
        return explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb, ctx, *hooks)

    monkeypatch.setattr(ControlProcessor, "explicit", staticmethod(counting))
    losses = {}
    for parts in (("up", "down", "mid"), ("up",)):
        calls.clear()
        method = AttendAndExcite(tokens=["cat"], max_iter_to_alter=1, thresholds={}, from_where=parts)
        losses[parts] = _call(pipe, prompts=["a cat"], alignment=[method]).traces["attend_and_excite"]["losses"]
        assert set(calls) == ({"up_blocks"} if parts == ("up",) else {"up_blocks", "down_blocks", "mid_block"})
    assert not torch.allclose(losses[("up",)][0], losses[("up", "down", "mid")][0])


def test_attend_and_excite_works_with_lora_and_other_methods(tiny_components):
    from peft import LoraConfig

    pipe = AlignedStableDiffusionPipeline(**{**tiny_components, "unet": get_tiny_pipeline().unet})
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a non-trivial adapter
    before = dict(pipe.unet.attn_processors)
    method = AttendAndExcite(tokens=["cat", "dog"], max_iter_to_alter=2, thresholds={}, attn_res=(16, 16))
    region = RegionReweight(regions={"dog": (0.5, 0.0, 1.0, 1.0)}, stop=1.0)
    out = _call(pipe, prompts=["a cat and a dog"], alignment=[method, TokenReweight(mode="attention"), region])
    assert np.isfinite(out.images).all()
    assert pipe.unet.attn_processors == before
    pipe.unet.disable_adapters()
    without = _call(pipe, prompts=["a cat and a dog"], alignment=[method, TokenReweight(mode="attention"), region])
    assert np.abs(without.images - out.images).max() > 1e-4  # the adapter took part in the controlled call


def test_attention_methods_compose_when_attend_and_excite_refines_some_images(pipe):
    """A&E refines only the first image (the second has no subject tokens), in forwards of that image alone, while
    region and token re-weighting act on the same layers: each hook applies the data of the images in the batch, so
    the batched call equals each prompt alone from the same initial latents."""
    prompts = ["a (cat:1.5) and a dog", "a red car and a [tree]"]

    def regions(prompt):
        if "cat" in prompt:
            return {"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}
        return {"car": (0.0, 0.0, 1.0, 0.5)}

    def methods(indices):
        return [
            AttendAndExcite(token_indices=indices, max_iter_to_alter=2, thresholds={0: 0.9}, attn_res=(16, 16)),
            RegionReweight(regions=regions, stop=0.5, time_power=0.0, cross_weight=2.0),
            TokenReweight(mode="attention"),
        ]

    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    both = pipe(prompts, latents=latents, num_inference_steps=4, output_type="np", alignment=methods([[2, 5], []]))
    refinements = both.traces["attend_and_excite"]["refinements"]
    assert refinements[0][0] > 0 and refinements[0][1] == 0  # the refinement forwards held the first image only
    for k, indices in enumerate(([[2, 5]], [[]])):
        alone = pipe(
            prompts[k], latents=latents[k : k + 1], num_inference_steps=4, output_type="np", alignment=methods(indices)
        ).images
        assert np.abs(both.images[k] - alone[0]).max() <= 1e-4
    plain = pipe(prompts, latents=latents, num_inference_steps=4, output_type="np").images
    assert np.abs(both.images - plain).max() > 1e-3


def test_attention_methods_compose_with_best_of_n_and_guidance(pipe):
    """Best-of-N enlarges the batch before the attention stage: A&E and region re-weighting act on every candidate, and
    the chosen images are the best of exactly what the two methods draw with `num_images_per_prompt=n`. Reward
    guidance on top changes the images again and leaves the processors restored."""
    from ttalign.methods import BestOfN, RewardGuidance

    redness = Redness()

    def attention():
        return [
            AttendAndExcite(tokens=["cat", "dog"], max_iter_to_alter=2, thresholds={}, attn_res=(16, 16)),
            RegionReweight(regions={"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}),
        ]

    prompts = ["a cat and a dog", "a dog and a cat"]
    best = _call(pipe, prompts, [*attention(), BestOfN(reward=redness, n=2)])
    candidates = _call(pipe, prompts, attention(), num_images_per_prompt=2).images  # [4, H, W, 3]
    scores = redness.score(torch.from_numpy(candidates).permute(0, 3, 1, 2), None).view(2, 2)
    assert torch.allclose(best.traces["best_of_n"]["scores"], scores, atol=1e-5)
    assert np.abs(best.images - candidates[best.traces["best_of_n"]["selected"].numpy()]).max() <= 1e-5
    assert len(best.traces["attend_and_excite"]["losses"][0]) == 4  # A&E saw every candidate
    guided = _call(pipe, prompts, [*attention(), RewardGuidance(reward=redness, scale=50.0)])
    assert np.abs(guided.images - candidates[::2]).max() > 1e-3
    assert all(type(p).__name__ != "ControlProcessor" for p in pipe.unet.attn_processors.values())


def test_a_hook_that_returns_none_only_looks(pipe):
    """A probability hook returning `None` sees the pipeline's own conditional maps and leaves the images as they are
    (the explicit path computes what SDPA computes)."""
    from ttalign.attention import attention_control, sync_step
    from ttalign.hooks import AlignmentMethod, Stage

    seen = []

    class Look(AlignmentMethod):
        stages = (Stage.ATTENTION, Stage.STEP_START)

        def on_attention(self, state):
            class Hook:
                wants = staticmethod(lambda ctx: ctx.is_cross)

                def __call__(self, ctx, probs):
                    seen.append((ctx.step_index, ctx.cfg, probs.shape[0] // ctx.heads(probs.shape[0], 2)))
                    return None

            attention_control(state).prob_hooks.append(Hook())

        def on_step_start(self, state):
            sync_step(state)

    out = _call(pipe, alignment=[Look()])
    assert np.abs(out.images - _call(pipe).images).max() <= 1e-5
    assert {step for step, _, _ in seen} == {0, 1, 2, 3} and all(cfg and rows == 4 for _, cfg, rows in seen)


def test_layer_context_selects_the_images_of_the_batch():
    ctx = LayerContext(
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", True, 8, 8, True, 0, None, rows=[2]
    )
    assert ctx.per_image(torch.arange(4)).tolist() == [2]
    assert ctx.heads(batch=16, images=1) == 8  # [uncond; cond] x 8 heads of one image
    with pytest.raises(RuntimeError, match="does not hold 3 images with CFG"):
        ctx.heads(batch=16, images=3)


def test_parse_weighted_prompt():
    assert parse_weighted_prompt("a (red:1.3) cat") == ("a red cat", [("red", 1.3)])
    text, weights = parse_weighted_prompt("a (big red) dog on [snow]")
    assert text == "a big red dog on snow"
    assert weights[0] == ("big red", pytest.approx(1.1)) and weights[1] == ("snow", pytest.approx(1 / 1.1))
    with pytest.raises(ValueError, match="must be > 0"):
        parse_weighted_prompt("a (red:0) cat")


def test_token_reweight_embedding_mode_is_a1111s_rule():
    pipe = get_tiny_pipeline("ddim")
    with torch.no_grad():  # a non-zero mean, as real CLIP's final layer norm gives (the tiny one is zero-mean)
        pipe.text_encoder.final_layer_norm.bias.fill_(0.1)
    plain = _call(pipe, prompts=["a red cat"]).images
    assert np.abs(_call(pipe, prompts=["a (red:1.0) cat"], alignment=[TokenReweight()]).images - plain).max() < 1e-6
    captured = {}

    def grab(p, i, t, kwargs):
        captured["embeds"] = kwargs["prompt_embeds"]
        return kwargs

    weighted = _call(
        pipe,
        prompts=["a (red:1.5) cat"],
        alignment=[TokenReweight()],
        guidance_scale=1.0,
        callback_on_step_end=grab,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    with torch.no_grad():
        base = pipe.encode_prompt(["a red cat"], "cpu", 1, False)[0]
    w = torch.ones(base.shape[1])
    w[2] = 1.5
    scaled = base * w[None, :, None]
    expected = scaled * (base.mean() / scaled.mean())
    assert torch.allclose(captured["embeds"], expected, atol=1e-5)
    assert np.abs(weighted.images - plain).max() > 1e-4


def test_token_reweight_attention_mode_changes_only_with_weights(pipe):
    plain = _call(pipe, prompts=["a red cat"]).images
    same = _call(pipe, prompts=["a (red:1.0) cat"], alignment=[TokenReweight(mode="attention")]).images
    assert np.abs(same - plain).max() < 1e-5
    moved = _call(pipe, prompts=["a (red:3.0) cat"], alignment=[TokenReweight(mode="attention")]).images
    assert np.abs(moved - plain).max() > 1e-4


def test_region_reweight_moves_attention_into_the_region(pipe):
    """The recorded cross-attention of a phrase's token is larger inside its box with the method than without."""
    from ttalign.attention import attention_control, sync_step
    from ttalign.hooks import AlignmentMethod, Stage

    class Probe(AlignmentMethod):
        stages = (Stage.ATTENTION, Stage.STEP_START)

        def on_step_start(self, state):
            sync_step(state)

        def __init__(self):
            self.maps = []

        def on_attention(self, state):
            control = attention_control(state)
            maps = self.maps

            class Keep:
                @staticmethod
                def wants(ctx):
                    return ctx.is_cross and ctx.step_index == 0 and ctx.height == 16

                def __call__(self, ctx, probs):
                    maps.append(probs[probs.shape[0] // 2 :, :, 2].mean(0).view(16, 16))

            control.recording = True
            control.recorders.append(Keep())

    regions = {"cat": (0.0, 0.0, 0.5, 1.0)}
    runs = {}
    for name, methods in (
        ("plain", []),
        ("region", [RegionReweight(regions=regions, stop=1.0)]),
        ("strong", [RegionReweight(regions=regions, stop=1.0, cross_weight=4.0)]),
    ):
        probe = Probe()
        _call(pipe, prompts=["a cat"], alignment=[*methods, probe])
        attention = torch.stack(probe.maps).mean(0)  # [16, 16]
        runs[name] = attention[:, :8].sum() / attention.sum()  # share of the token's attention in the left half
    assert runs["strong"] > runs["region"] > runs["plain"] and runs["strong"] > runs["plain"] + 0.03
    # a batch of prompts with and without regions, several images each
    method = RegionReweight(regions=lambda p: regions if "cat" in p else {}, stop=1.0)
    batch = _call(pipe, prompts=["a cat", "a dog"], num_images_per_prompt=2, alignment=[method]).images
    assert np.isfinite(batch).all() and batch.shape[0] == 4
    unchanged = _call(
        pipe, prompts=["a cat"], alignment=[RegionReweight(regions=regions, stop=0.0, encode_phrases=False)]
    ).images
    assert np.abs(unchanged - _call(pipe, prompts=["a cat"]).images).max() < 1e-6
    with pytest.raises(ValueError, match="box must be"):
        _call(pipe, prompts=["a cat"], alignment=[RegionReweight(regions={"cat": (0.5, 0, 0.2, 1)}, stop=1.0)])


def test_attend_and_excite_with_different_subject_counts(pipe):
    method = AttendAndExcite(
        tokens=lambda p: [w for w in p.split() if w in ("cat", "dog")], max_iter_to_alter=2, thresholds={}
    )
    out = _call(pipe, prompts=["a cat", "a cat and a dog", "a tree"], alignment=[method])
    losses = out.traces["attend_and_excite"]["losses"]
    assert len(losses) == 2 and losses[0].shape == (3,) and losses[0][2] == 0  # no subject, no loss


def test_densediffusion_modulation_formula():
    """Positive logits move towards the row maximum by the fraction `strength`, all others towards the row minimum."""
    from ttalign.methods.attention import densediffusion_modulate

    scores = torch.tensor([[[1.0, 2.0, 4.0, -2.0]]])  # [1, q=1, k=4]: max 4, min -2
    positive = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])
    out = densediffusion_modulate(scores, positive, torch.tensor(0.5))
    assert torch.allclose(out, torch.tensor([[[2.5, 0.0, 1.0, 1.0]]]))
    assert torch.equal(densediffusion_modulate(scores, positive, torch.tensor(0.0)), scores)


def test_region_reweight_encodes_each_phrase_alone(pipe):
    """With `encode_phrases`, a phrase's tokens carry the embeddings of the phrase encoded on its own (the rest of the
    prompt's embeddings unchanged); prompts without regions keep their embeddings."""
    from ttalign.hooks import AlignmentMethod, Stage

    class Keep(AlignmentMethod):
        stages = (Stage.ATTENTION,)

        def on_attention(self, state):
            self.embeds = state.prompt_embeds.clone()

    prompts = ["a red cat and a blue dog", "a tree"]
    regions = {"blue dog": (0.5, 0.0, 1.0, 1.0)}
    keep = Keep()
    method = RegionReweight(regions=lambda p: regions if "dog" in p else {}, stop=0.0)
    _call(pipe, prompts=prompts, num_images_per_prompt=2, alignment=[method, keep])
    full, _ = pipe.encode_prompt(prompts, "cpu", 2, False)
    alone, _ = pipe.encode_prompt(["blue dog"], "cpu", 1, False)
    (span,) = token_spans(pipe.tokenizer, prompts[0], ["blue dog"])
    assert torch.allclose(keep.embeds[:2, span], alone[:, 1 : 1 + len(span)].expand(2, -1, -1))
    others = [i for i in range(full.shape[1]) if i not in span]
    assert torch.equal(keep.embeds[:2, others], full[:2, others]) and torch.equal(keep.embeds[2:], full[2:])
    assert not torch.allclose(full[0, span], alone[0, 1 : 1 + len(span)])  # the prompt's context did colour them


class Probe(Reward):
    """A fixed random linear functional of the pixels: sensitive to any change of the image."""

    differentiable = True

    def __init__(self):
        super().__init__()
        self.weight = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))

    def score(self, images, prompts):
        return (images * self.weight).sum((1, 2, 3))


def test_seed_search_and_noise_optimization_render_candidates_with_the_attention_methods(pipe):
    """Searches over the initial noise render each candidate with the call's attention methods (region re-weighting's
    modulated attention, Attend-and-Excite's latent updates), so the reward of the chosen candidate is the reward of
    the returned image; A&E's trace holds the returned images' steps only, and the processors are restored."""
    from ttalign.methods import NoiseOptimization, SeedSearch

    redness = Probe()

    def attention():
        return [
            AttendAndExcite(tokens=["cat", "dog"], max_iter_to_alter=1, thresholds={}, attn_res=(16, 16)),
            RegionReweight(
                regions={"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}, cross_weight=3.0, time_power=0.0
            ),
        ]

    prompts = ["a cat and a dog", "a dog and a cat"]
    before = dict(pipe.unet.attn_processors)
    search = _call(pipe, prompts, [*attention(), SeedSearch(reward=redness, n=2)])
    returned = redness(torch.from_numpy(search.images).permute(0, 3, 1, 2), prompts)
    assert torch.allclose(search.rewards, returned, atol=1e-3)
    # the first candidate is the plain controlled call's noise: its score is that call's image's reward
    controlled = _call(pipe, prompts, attention())
    assert len(search.traces["attend_and_excite"]["losses"]) == len(controlled.traces["attend_and_excite"]["losses"])
    controlled = controlled.images
    first = search.traces["seed_search"]["scores"][:, 0]
    assert torch.allclose(first, redness(torch.from_numpy(controlled).permute(0, 3, 1, 2), prompts), atol=1e-3)
    # without the attention methods the candidates differ: the search saw what the controls draw
    plain = _call(pipe, prompts, [SeedSearch(reward=redness, n=2)]).traces["seed_search"]["scores"]
    assert (plain - search.traces["seed_search"]["scores"]).abs().max() > 1e-2
    optimized = _call(pipe, prompts, [*attention(), NoiseOptimization(reward=redness, steps=2, lr=0.5)])
    returned = redness(torch.from_numpy(optimized.images).permute(0, 3, 1, 2), prompts)
    assert torch.allclose(optimized.rewards, returned, atol=1e-3)
    assert pipe.unet.attn_processors == before


def test_noise_optimization_under_region_control_is_the_same_with_gradient_checkpointing(pipe):
    """Region re-weighting's strength depends on the step; a checkpointed step replayed in the backward pass is synced
    to its own step, so the optimized images equal those of the run without checkpointing."""
    from ttalign.methods import NoiseOptimization

    def run(checkpointing):
        region = RegionReweight(regions={"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}, cross_weight=3.0)
        method = NoiseOptimization(reward=Probe(), steps=2, lr=0.5, gradient_checkpointing=checkpointing)
        return _call(pipe, ["a cat and a dog"], [region, method])

    calls = []
    hook = pipe.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    results, forwards = {}, {}
    for mode in (True, False, "blocks"):
        calls.clear()
        results[mode] = run(mode)
        forwards[mode] = len(calls)
    hook.remove()
    checkpointed, plain, blocks = results[True], results[False], results["blocks"]
    assert forwards["blocks"] > forwards[True] > forwards[False]  # each replays more in the backward
    moved = checkpointed.traces["noise_optimization"]["rewards"]
    assert (moved[1] - moved[0]).abs().min() > 1e-3  # the noise moved
    assert np.abs(checkpointed.images - plain.images).max() <= 1e-5
    # the denoiser's blocks checkpointed inside each step too: a block replayed in the backward sees the control as
    # its forward did (the control's own checkpointing), and diffusers' switches are off again after the call
    assert np.abs(blocks.images - plain.images).max() <= 1e-5
    assert not any(getattr(m, "gradient_checkpointing", False) for m in pipe.unet.modules())


def test_attend_and_excite_loss_passes_stop_after_the_last_recorded_layer():
    """Only the maps matter in a loss pass: the forward stops at the last layer that records, so SD's
    highest-resolution up blocks never run there; the call's first loss pass finds that layer with one forward of one
    image without gradients (the parity tests above hold the images)."""
    pipe = AlignedStableDiffusionPipeline(**get_tiny_components(layout="sd"))
    pipe.set_progress_bar_config(disable=True)
    calls = {"first_down": 0, "last_up": 0}
    pipe.unet.down_blocks[0].register_forward_hook(lambda *_: calls.__setitem__("first_down", calls["first_down"] + 1))
    pipe.unet.up_blocks[-1].register_forward_hook(lambda *_: calls.__setitem__("last_up", calls["last_up"] + 1))
    method = AttendAndExcite(tokens=["cat", "dog"], attn_res=(8, 8), max_iter_to_alter=3, thresholds={})
    _call(pipe, prompts=["a cat and a dog"], alignment=[method], num_inference_steps=3, height=256, width=256)
    # three pipeline steps (both CFG branches in one batch), the forward that finds the last layer, and three loss
    # passes, which all stop early
    assert calls == {"first_down": 7, "last_up": 4}


def test_attend_and_excite_refinement_does_not_keep_the_first_loss_graph(pipe, monkeypatch):
    """At a threshold step whose loss calls for refinement, the loss is taken again after it: the first pass's graph
    (every recorded layer's activations, without checkpointing) is let go before the refinement passes run."""
    import weakref

    graphs, alive = [], []
    original = AttendAndExcite._loss

    def loss(self, *args):
        alive.append([ref() is not None for ref in graphs])
        out = original(self, *args)
        graphs.append(weakref.ref(out))  # the loss holds its graph
        return out

    monkeypatch.setattr(AttendAndExcite, "_loss", loss)
    method = AttendAndExcite(
        tokens=lambda p: p.split()[-1:],
        max_iter_to_alter=1,
        thresholds={0: 0.9},
        max_refinement_steps=2,
        gradient_checkpointing=False,
    )
    out = _call(pipe, alignment=[method], num_inference_steps=2)
    assert out.traces["attend_and_excite"]["refinements"][0] == [2, 2]  # it refined
    assert len(alive) == 4  # the first loss, two refinement passes, the loss after them
    assert not alive[1][0]  # the first pass's graph was gone when the refinement began
