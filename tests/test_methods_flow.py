"""Every test-time method on tiny Stable Diffusion 3 and FLUX components (flow matching, transformer denoisers,
joint attention, FLUX's packed latents), each checked as its Stable Diffusion test checks it; per-image generator
lists; refusals; attention processors restored."""

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
    TokenReweight,
)
from ttalign.pipelines.joint_attention import JointControlProcessor
from ttalign.testing import Redness, get_tiny_flux_pipeline, get_tiny_sd3_pipeline

PROMPTS = ["a cat and a dog", "a red car and a tree"]
FAMILIES = ["sd3", "flux"]


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": get_tiny_sd3_pipeline(shift=3.0), "flux": get_tiny_flux_pipeline(guidance_embeds=True)}


def _call(pipe, alignment=(), prompts=PROMPTS, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "pt")
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    generator = kwargs.pop("generator", torch.Generator().manual_seed(seed))
    return pipe(prompts, generator=generator, alignment=list(alignment), **kwargs)


def _generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("steps", [1, 4])
def test_noise_optimization_on_schnell_style_flux(steps):
    """ReNO's FLUX-schnell setting: no guidance embedding, one to four steps, its defaults (SGD lr 5, clip 0.1)."""
    pipe, reward = get_tiny_flux_pipeline(guidance_embeds=False), Redness()
    out = _call(pipe, [NoiseOptimization(reward=reward, steps=4)], num_inference_steps=steps, guidance_scale=0.0)
    trace = out.traces["noise_optimization"]
    assert (trace["best"] > trace["rewards"][0]).all()
    assert torch.allclose(reward(out.images, PROMPTS), out.rewards, atol=1e-4)
    assert out.traces["compute"]["nfe"] == 4 * steps * 2  # the kept iterate's own render is returned


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_guidance_moves_x0_by_scale_sigma_squared_g(pipes, family):
    """On the velocity: `v <- v - scale * sigma * g`, with `g` the reward's gradient at `x0 = x_t - sigma v`."""
    pipe, reward, scale = pipes[family], Redness(), 3.0
    seen = []

    class Probe(AlignmentMethod):
        stages = (Stage.NOISE_PRED,)

        def on_noise_pred(self, state):
            seen.append((state.step_index, state.latents.clone(), state.noise_pred.clone()))

    class After(Probe):
        pass

    _call(pipe, [Probe(), RewardGuidance(reward=reward, scale=scale), After()], num_inference_steps=2)
    (i, x_t, v), (_, _, guided) = seen[2], seen[3]  # step 1: before and after the guidance
    sigma = float(pipe.scheduler.sigmas[i])
    x0 = (x_t - sigma * v).requires_grad_()
    images = (pipe.family.decode(x0, 32, 32) / 2 + 0.5).clamp(0, 1)
    (g,) = torch.autograd.grad(reward(images, PROMPTS).sum(), x0)
    assert g.abs().max() > 0
    assert torch.allclose(guided, v - scale * sigma * g, atol=1e-5)


def test_particle_steering_on_diffusers_stochastic_sampling():
    """diffusers' `stochastic_sampling` re-noise is a stochastic sampler of its own: no SDE needed."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = get_tiny_sd3_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    out = _call(pipe, [ParticleSteering(reward=Redness(), particles=2, eta=0.0, resample_start=0.0)])
    assert out.images.shape == (2, 3, 32, 32) and len(out.traces["particle_steering"]["steps"]) > 0


def _captured_embeds(pipe, prompts, alignment=(), **kwargs):
    captured = {}

    def grab(p, i, t, kw):
        captured.update(kw)
        return {}

    inputs = ["prompt_embeds", "pooled_prompt_embeds"] if hasattr(pipe, "text_encoder_3") else ["prompt_embeds"]
    out = _call(
        pipe,
        alignment,
        prompts=prompts,
        callback_on_step_end=grab,
        callback_on_step_end_tensor_inputs=inputs,
        guidance_scale=1.0,
        **kwargs,
    )
    return out, captured


def _mean_restored(part, weights):
    scaled = part * weights
    return scaled * (part.mean() / scaled.mean())


def test_token_reweight_weights_clip_and_t5_rows_on_sd3(pipes):
    pipe = pipes["sd3"]
    plain, _ = _captured_embeds(pipe, ["a red cat"])
    same, _ = _captured_embeds(pipe, ["a (red:1.0) cat"], [TokenReweight()])
    assert torch.allclose(same.images, plain.images, atol=1e-6)
    weighted, captured = _captured_embeds(pipe, ["a (red:1.5) cat"], [TokenReweight()])
    embeds, _, pooled, _ = pipe.encode_prompt("a red cat", None, None, device="cpu", do_classifier_free_guidance=False)
    clip_w, t5_w = torch.ones(77, 1), torch.ones(embeds.shape[1] - 77, 1)
    clip_w[2], t5_w[1] = 1.5, 1.5  # CLIP: <start> a red; T5: ▁a ▁red
    expected = embeds.clone()
    expected[:, :77, :32] = _mean_restored(embeds[:, :77, :32], clip_w)  # CLIP-L's columns
    expected[:, :77, 32:64] = _mean_restored(embeds[:, :77, 32:64], clip_w)  # CLIP-G's columns
    expected[:, 77:] = _mean_restored(embeds[:, 77:], t5_w)  # T5's rows
    assert torch.allclose(captured["prompt_embeds"], expected, atol=1e-5)
    assert torch.equal(captured["pooled_prompt_embeds"], pooled)  # the pooled embedding is not weighted
    assert (weighted.images - plain.images).abs().max() > 1e-5


def test_token_reweight_weights_the_t5_sequence_on_flux(pipes):
    pipe = pipes["flux"]
    plain, _ = _captured_embeds(pipe, ["a red cat"])
    weighted, captured = _captured_embeds(pipe, ["a (red:1.5) cat"], [TokenReweight()])
    embeds, _, _ = pipe.encode_prompt("a red cat", None, device="cpu")
    w = torch.ones(embeds.shape[1], 1)
    w[1] = 1.5
    assert torch.allclose(captured["prompt_embeds"], _mean_restored(embeds, w), rtol=1e-4, atol=1e-5)
    assert (weighted.images - plain.images).abs().max() > 1e-5
    # `prompt_2` (FLUX's T5 prompt) carries its own weights; `prompt` then feeds CLIP's pooled vector only
    _, both = _captured_embeds(pipe, ["a (red:1.5) cat"], [TokenReweight()], prompt_2=["a red (cat:2)"])
    w2 = torch.ones(embeds.shape[1], 1)
    w2[2] = 2.0
    assert torch.allclose(both["prompt_embeds"], _mean_restored(embeds, w2), rtol=1e-4, atol=1e-5)
    attention = _call(pipe, [TokenReweight(mode="attention")], prompts=["a (red:3) cat"]).images
    assert (attention - _call(pipe, prompts=["a red cat"]).images).abs().max() > 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_attend_and_excite_on_joint_attention(pipes, family):
    pipe = pipes[family]
    processors = dict(pipe.transformer.attn_processors)

    def run(refinements):
        method = AttendAndExcite(
            tokens=lambda p: p.split()[-4::3],
            max_iter_to_alter=2,
            thresholds={0: 0.99},
            scale_factor=200,
            max_refinement_steps=refinements,
        )
        return _call(pipe, [method])

    before, after = run(0), run(5)
    assert (after.traces["attend_and_excite"]["losses"][0] < before.traces["attend_and_excite"]["losses"][0]).all()
    assert max(after.traces["attend_and_excite"]["refinements"][0]) > 0
    assert (after.images - _call(pipe).images).abs().max() > 1e-3
    assert all(pipe.transformer.attn_processors[k] is v for k, v in processors.items())
    assert not any(isinstance(p, JointControlProcessor) for p in pipe.transformer.attn_processors.values())


class _Probe(AlignmentMethod):
    """Records the first step's text view of the joint attention: one token's map over the image queries."""

    stages = (Stage.ATTENTION, Stage.STEP_START)

    def __init__(self, positions, grid, conditional_half):
        self.positions, self.grid, self.half, self.maps = positions, grid, conditional_half, []

    def on_step_start(self, state):
        from ttalign.attention import sync_step

        sync_step(state)

    def on_attention(self, state):
        from ttalign.attention import attention_control

        control, probe = attention_control(state), self

        class Keep:
            @staticmethod
            def wants(ctx):
                return ctx.is_cross and ctx.step_index == 0

            def __call__(self, ctx, probs):  # [B * heads, image tokens, text tokens]
                rows = probs[probs.shape[0] // 2 :] if probe.half else probs
                probe.maps.append(rows[:, :, probe.positions].sum(-1).mean(0).view(probe.grid))

        control.recording = True
        control.recorders.append(Keep())


@pytest.mark.parametrize("family", FAMILIES)
def test_region_reweight_moves_attention_into_the_region(pipes, family):
    pipe = pipes[family]
    (positions,) = pipe.family.token_spans("a cat", ["cat"])
    grid = (32, 32) if family == "sd3" else (16, 16)
    shares = {}
    for weight in (0.0, 1.0, 4.0):
        probe = _Probe(positions, grid, conditional_half=family == "sd3")
        method = RegionReweight(regions={"cat": (0.0, 0.0, 0.5, 1.0)}, stop=1.0, cross_weight=weight, self_weight=0.0)
        _call(pipe, [method, probe], prompts=["a cat"])
        attention = torch.stack(probe.maps).mean(0)  # the cat token's map at step 0
        shares[weight] = float(attention[:, : grid[1] // 2].sum() / attention.sum())  # its share in the left half
    assert shares[4.0] > shares[1.0] > shares[0.0] and shares[4.0] > shares[0.0] + 0.02


@pytest.mark.parametrize("family", FAMILIES)
def test_family_sets_the_pipelines_schedule(pipes, family):
    """Methods and trainers that sample outside the call set the scheduler as the pipeline does (SD3's shift,
    FLUX's default sigmas and resolution-dependent `mu`)."""
    pipe = pipes[family]
    seen = {}

    class Grab(AlignmentMethod):
        stages = (Stage.INIT_LATENTS,)

        def on_init_latents(self, state):
            seen["timesteps"] = state.timesteps.clone()

    for size, kwargs in [(32, {}), (48, {}), (32, {"sigmas": [1.0, 0.7, 0.2]})]:
        _call(pipe, [Grab()], prompts=PROMPTS[:1], height=size, width=size, **kwargs)
        timesteps = pipe.family.set_timesteps(3, "cpu", size, size, **kwargs)
        assert torch.allclose(timesteps, seen["timesteps"]), (size, kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_methods_in_bfloat16_score_and_step_in_float32(family):
    """FLUX runs in bf16: the methods run there, with rewards, the SDE step and noise norms in fp32."""
    pipe = get_tiny_sd3_pipeline() if family == "sd3" else get_tiny_flux_pipeline(guidance_embeds=True)
    pipe.to(dtype=torch.bfloat16)
    methods = [
        BestOfN(reward=Redness(), n=2),
        NoiseOptimization(reward=Redness(), steps=2),
        ParticleSteering(reward=Redness(), particles=2, resample_start=0.0, eta=0.7),
        NoiseOptimization(reward=Redness(), optimize="all-noises", steps=2, eta=0.7),
    ]
    for method in methods:
        out = _call(pipe, [method], prompts=PROMPTS[:1])
        assert out.images.dtype == torch.bfloat16 and torch.isfinite(out.images.float()).all()
        assert out.rewards.dtype == torch.float32
    trace = _call(pipe, [NoiseOptimization(reward=Redness(), steps=2)], prompts=PROMPTS[:1]).traces
    assert trace["noise_optimization"]["rewards"].dtype == torch.float32


def test_flux_in_float16_warns():
    pipe = get_tiny_flux_pipeline().to(dtype=torch.float16)
    with pytest.warns(UserWarning, match="bfloat16"):
        _call(pipe, prompts=PROMPTS[:1], num_inference_steps=1)


def test_words_map_to_grouped_t5_pieces_and_clip_tokens(pipes):
    """A word outside the vocabulary is several sentencepiece pieces, grouped; SD3 maps a word to its CLIP tokens and
    its T5 pieces (after CLIP's 77 positions)."""
    flux, sd3 = pipes["flux"].family, pipes["sd3"].family
    assert flux.tokenizer.tokenize("a zebroid") == ["▁a", "▁z", "e", "b", "r", "o", "i", "d"]
    spans = flux.token_spans("a zebroid and a cat", ["zebroid", "cat", "a cat"])
    assert spans == [[1, 2, 3, 4, 5, 6, 7], [10], [9, 10]]
    clip_cat = sd3.token_spans("a zebroid and a cat", ["cat"], sd3.tokenizer)[0]
    assert sd3.token_spans("a zebroid and a cat", ["cat"]) == [clip_cat + [77 + 10]]


def test_explicit_attention_only_in_the_blocks_asked_for(pipes, monkeypatch):
    """FLUX's A&E reads the double-stream blocks by default; `from_where` picks others; the unconditional pass of
    true CFG and every call no hook wants keep the stock processor."""
    pipe, parts = pipes["flux"], []
    original = JointControlProcessor._attend

    def counting(self, *args):
        parts.append(self.part)
        return original(self, *args)

    monkeypatch.setattr(JointControlProcessor, "_attend", counting)
    method = AttendAndExcite(tokens=["cat"], max_iter_to_alter=1, thresholds={}, max_refinement_steps=0)
    _call(pipe, [method], prompts=["a cat"], true_cfg_scale=2.0, negative_prompt="a dog")
    # the forward without gradients that finds the last layer read, then one recorded conditional forward of step 0,
    # in the one double-stream block, recomputed once in its backward (the loss pass's gradient checkpointing)
    assert parts == ["double", "double", "double"]
    parts.clear()
    single = AttendAndExcite(tokens=["cat"], max_iter_to_alter=1, thresholds={}, from_where=("single",))
    _call(pipe, [single], prompts=["a cat"])
    assert set(parts) == {"single"}
    with pytest.raises(ValueError, match="from_where"):
        _call(pipe, [AttendAndExcite(tokens=["cat"], from_where=("up",))], prompts=["a cat"])


def test_sd3_family_sets_the_dynamic_shift_as_the_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = get_tiny_sd3_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=64, max_image_seq_len=4096
    )
    seen = {}

    class Grab(AlignmentMethod):
        stages = (Stage.INIT_LATENTS,)

        def on_init_latents(self, state):
            seen["timesteps"] = state.timesteps.clone()

    for size, mu in [(32, None), (64, None), (32, 0.3)]:
        _call(pipe, [Grab()], prompts=PROMPTS[:1], height=size, width=size, mu=mu)
        timesteps = pipe.family.set_timesteps(3, "cpu", size, size, mu=mu)
        assert torch.allclose(timesteps, seen["timesteps"]), (size, mu)
    assert not torch.allclose(pipe.family.set_timesteps(3, "cpu", 32, 32), pipe.family.set_timesteps(3, "cpu", 64, 64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_with_lse_gives_both_outputs_and_their_gradients(dtype):
    """The CPU flash kernel's attention with its row log-sum-exp: values and gradients (from the output, from the lse,
    from both) equal the explicit softmax attention's; `gradcheck` in float64."""
    from ttalign.pipelines.joint_attention import _AttentionWithLSE

    torch.manual_seed(0)
    # [B, heads, S, d], strided as the processors' views of [B, S, heads, d] are
    q, k, v = (torch.randn(2, 40, 3, 8, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(3))
    scale = 8**-0.5

    def explicit(q, k, v):
        scores = q @ k.transpose(-1, -2) * scale  # [B, heads, S, S]
        return scores.softmax(-1) @ v, torch.logsumexp(scores, -1)

    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    for use in ("output", "lse", "both"):
        grads = []
        for f in (_AttentionWithLSE.apply, lambda *x: explicit(*x[:3])):
            out, lse = f(q, k, v, scale)
            loss = (out.square().sum() if use != "lse" else 0) + (
                (lse * lse.detach().cos()).sum() if use != "output" else 0
            )
            grads.append(torch.autograd.grad(loss, (q, k, v), allow_unused=True))
            grads[-1] = [torch.zeros_like(q) if g is None else g for g in grads[-1]]
        for ours, theirs in zip(*grads):
            torch.testing.assert_close(ours, theirs, **tol)
    torch.testing.assert_close(_AttentionWithLSE.apply(q, k, v, scale)[1], explicit(q, k, v)[1], **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda q, k, v: _AttentionWithLSE.apply(q, k, v, scale), (q, k, v))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["attend_and_excite", "token_reweight", "region_cross"])
@pytest.mark.parametrize("kernel_lse", [True, False], ids=["kernel-lse", "chunked-lse"])
def test_the_lean_joint_attention_path_matches_the_explicit_one(pipes, family, which, kernel_lse, monkeypatch):
    """Hooks on the text view only (maps recorded and stepped on, probabilities re-weighted, text logits modulated)
    give the same images, losses and maps on the lean path (no joint score matrix) as on the explicit one, with the
    lse from the CPU flash kernel and computed in chunks (the path of other devices); A&E's maps are computed for the
    prompts' tokens only."""
    pipe = pipes[family]
    methods = {
        "attend_and_excite": lambda: AttendAndExcite(
            tokens=lambda p: p.split()[-4::3], max_iter_to_alter=2, thresholds={0: 0.99}, max_refinement_steps=2
        ),
        "token_reweight": lambda: TokenReweight(mode="attention"),
        "region_cross": lambda: RegionReweight(
            regions={"cat": (0.0, 0.0, 0.5, 1.0)}, stop=1.0, cross_weight=2.0, self_weight=0.0
        ),
    }
    prompts = {
        "attend_and_excite": PROMPTS,
        "token_reweight": ["a (cat:1.5) and a dog", "a red car and a (tree:0.5)"],
        "region_cross": ["a cat and a dog", "a cat and a tree"],
    }[which]
    calls = []
    original = JointControlProcessor._attend_lean

    def counting(self, query, key, value, image, text, cross, *args):
        out = original(self, query, key, value, image, text, cross, *args)
        calls.append((cross.tokens, key[:, :, text].shape[2]))
        return out

    monkeypatch.setattr(JointControlProcessor, "_attend_lean", counting)
    monkeypatch.setattr(JointControlProcessor, "chunk_elements", 64)  # several chunks even at these sizes
    monkeypatch.setattr(JointControlProcessor, "kernel_lse", kernel_lse)
    lean = _call(pipe, [methods[which]()], prompts=prompts)
    assert calls, "the lean path did not run"
    if which == "attend_and_excite":  # the maps hold the prompts' own tokens only, not the padding
        assert all(tokens is not None and 0 < len(tokens) < n_text for tokens, n_text in calls)
    else:  # hooks that change the attention see every text token
        assert all(tokens is None for tokens, _ in calls)
    monkeypatch.setattr(JointControlProcessor, "lean", False)
    explicit = _call(pipe, [methods[which]()], prompts=prompts)
    torch.testing.assert_close(lean.images, explicit.images, atol=2e-5, rtol=1e-4)
    if which == "attend_and_excite":
        for key in ("losses", "refinements"):
            a, b = lean.traces["attend_and_excite"][key], explicit.traces["attend_and_excite"][key]
            assert len(a) == len(b)
            for x, y in zip(a, b):
                torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), atol=1e-5, rtol=1e-4)


def test_attend_and_excite_with_some_layers_narrowed_and_some_not():
    """A&E's maps from layers that computed the prompts' tokens only and from layers that computed every text token
    (the explicit path, taken here by every other block) are combined on the same columns: the losses and images
    equal those of the explicit path everywhere."""
    pipe = get_tiny_sd3_pipeline(layout="sd3")  # 24 joint blocks, all read

    def method():
        return AttendAndExcite(
            tokens=lambda p: p.split()[-4::3], max_iter_to_alter=1, thresholds={0: 0.99}, max_refinement_steps=2
        )

    original = JointControlProcessor._attend
    narrowed = []

    def mixed(self, query, key, value, mask, image, text, cross, *hooks):
        if int(self.name.split(".")[1]) % 2:  # "transformer_blocks.<i>.attn.processor"
            return self._attend_explicit(query, key, value, mask, image, text, cross, *hooks)
        out = original(self, query, key, value, mask, image, text, cross, *hooks)
        narrowed.append(cross.tokens is not None)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(JointControlProcessor, "_attend", mixed)
        both = _call(pipe, [method()], num_inference_steps=2)
    assert narrowed and all(narrowed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(JointControlProcessor, "lean", False)
        explicit = _call(pipe, [method()], num_inference_steps=2)
    torch.testing.assert_close(both.images, explicit.images, atol=2e-5, rtol=1e-4)
    for a, b in zip(both.traces["attend_and_excite"]["losses"], explicit.traces["attend_and_excite"]["losses"]):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=1e-5, rtol=1e-4)
