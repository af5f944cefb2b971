"""ImageReward: the official checkpoint layout loads onto transformers' BLIP modules and scores exactly as BLIP's
own ViT + `med.py` BERT computation, written out here from the original key names."""

import math

import pytest
import torch
import torch.nn.functional as F

from ttalign.rewards import ImageReward, clip_preprocess
from ttalign.rewards.image_reward import SCORE_MEAN, SCORE_STD, convert_image_reward_state_dict
from ttalign.testing import save_tiny_image_reward


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_image_reward(str(tmp_path_factory.mktemp("image_reward")))


def _attention(q, k, v, heads, mask=None):
    """`[B, Lq, D]`, `[B, Lk, D]` -> `[B, Lq, D]`, softmax(q k^T / sqrt(d) + mask) v per head."""
    b, lq, d = q.shape
    q, k, v = (x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, d)


def reference_image_reward(sd, pixels, ids, mask, text_heads=2):
    """BLIP's forward on the official key names: timm ViT (pre-norm, eps 1e-6, 64-dim heads), then BERT with
    cross-attention (post-norm, eps 1e-12, additive -10000 mask), first token, linear MLP head, standardization."""
    vit = lambda k: sd[f"blip.visual_encoder.{k}"]  # noqa: E731
    bert = lambda k: sd[f"blip.text_encoder.{k}"]  # noqa: E731
    lin = lambda x, get, k: F.linear(x, get(f"{k}.weight"), get(f"{k}.bias"))  # noqa: E731
    ln = lambda x, get, k, eps: F.layer_norm(x, x.shape[-1:], get(f"{k}.weight"), get(f"{k}.bias"), eps)  # noqa: E731

    patch = vit("patch_embed.proj.weight").shape[-1]
    x = F.conv2d(pixels, vit("patch_embed.proj.weight"), vit("patch_embed.proj.bias"), stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([vit("cls_token").expand(len(x), -1, -1), x], 1)
    x = x + vit("pos_embed")[:, : x.shape[1]]
    width = x.shape[-1]
    for i in range(sum(k.endswith("norm1.weight") for k in sd if "visual_encoder.blocks" in k)):
        h = ln(x, vit, f"blocks.{i}.norm1", 1e-6)
        q, k, v = lin(h, vit, f"blocks.{i}.attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attention(q, k, v, width // 64), vit, f"blocks.{i}.attn.proj")
        h = ln(x, vit, f"blocks.{i}.norm2", 1e-6)
        x = x + lin(F.gelu(lin(h, vit, f"blocks.{i}.mlp.fc1")), vit, f"blocks.{i}.mlp.fc2")
    image = ln(x, vit, "norm", 1e-6)

    t = bert("embeddings.word_embeddings.weight")[ids] + bert("embeddings.position_embeddings.weight")[: ids.shape[1]]
    t = ln(t, bert, "embeddings.LayerNorm", 1e-12)
    ext = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(sum(k.endswith("intermediate.dense.weight") for k in sd)):
        p = f"encoder.layer.{i}"
        for attn, kv, m in (("attention", t, ext), ("crossattention", image, None)):
            q, k, v = (lin(src, bert, f"{p}.{attn}.self.{n}") for src, n in ((t, "query"), (kv, "key"), (kv, "value")))
            t = ln(
                lin(_attention(q, k, v, text_heads, m), bert, f"{p}.{attn}.output.dense") + t,
                bert,
                f"{p}.{attn}.output.LayerNorm",
                1e-12,
            )
        h = F.gelu(lin(t, bert, f"{p}.intermediate.dense"))
        t = ln(lin(h, bert, f"{p}.output.dense") + t, bert, f"{p}.output.LayerNorm", 1e-12)
    r = t[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = lin(r, lambda k: sd[k], f"mlp.layers.{i}")
    return (r.squeeze(-1) - SCORE_MEAN) / SCORE_STD


def _images(n, size=48, seed=0):
    base = torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(base, size=(size, size), mode="bilinear").clamp(0, 1)


def test_image_reward_equals_the_blip_computation_on_the_official_layout(tiny_dir):
    reward = ImageReward.from_pretrained(tiny_dir)
    sd = torch.load(f"{tiny_dir}/ImageReward.pt", weights_only=True)
    images = _images(3)
    prompts = ["a red circle", "two blue squares left of a cat", "a zebra"]  # "zebra" is split in sub-words
    scores = reward(images, prompts)
    enc = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert enc.input_ids.shape == (3, 35) and (enc.attention_mask == 0).any()  # padding is masked
    pixels = clip_preprocess(images, 32, 32)
    expected = reference_image_reward(sd, pixels, enc.input_ids, enc.attention_mask)
    assert torch.allclose(scores, expected, atol=1e-4), (scores, expected)
    assert scores.std() > 1e-3  # distinct inputs, distinct scores: the comparison is not vacuous
    # Each image is scored on its own: a batch equals one at a time, and the tokenization is cached per prompt.
    single = torch.cat([reward(images[i : i + 1], [p]) for i, p in enumerate(prompts)])
    assert torch.allclose(scores, single, atol=1e-5)
    assert set(reward._token_cache) == set(prompts)


def test_image_reward_gradients_reach_the_pixels(tiny_dir):
    reward = ImageReward.from_pretrained(tiny_dir)
    assert reward.differentiable
    images = _images(2, size=40).requires_grad_()
    reward(images, ["a cat", "a dog"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


def test_image_reward_refuses_foreign_checkpoints(tiny_dir, tmp_path):
    sd = torch.load(f"{tiny_dir}/ImageReward.pt", weights_only=True)
    parts = convert_image_reward_state_dict(sd)
    assert "embeddings.position_ids" not in parts["text"] and not any("proj" in k for k in parts["head"])
    with pytest.raises(ValueError, match="unexpected keys.*model.foo"):
        convert_image_reward_state_dict({**sd, "model.foo": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="has no ImageReward.pt"):
        ImageReward.from_pretrained(str(tmp_path))


def test_reno_preset_weights_the_raw_scores(tiny_dir):
    from ttalign.rewards import WeightedReward
    from ttalign.rewards.weighted import RENO_WEIGHTS

    assert RENO_WEIGHTS == {"hps": 5.0, "image_reward": 1.0, "clip": 0.01, "pickscore": 0.05}  # REFERENCES.md
    image_reward = ImageReward.from_pretrained(tiny_dir)

    def constant(value):
        return lambda images, prompts: torch.full((len(images),), value)

    reward = WeightedReward.reno(
        hps=constant(0.3), image_reward=image_reward, clip=constant(30.0), pickscore=constant(20.0)
    )
    images, prompts = _images(2), ["a cat", "a dog"]
    expected = 5.0 * 0.3 + image_reward(images, prompts) + 0.01 * 30.0 + 0.05 * 20.0
    assert torch.allclose(reward(images, prompts), expected, atol=1e-5)
    assert [name.split(":")[1] for name in reward.last_components][1] == "ImageReward"


def test_every_registered_reward_name_resolves():
    from ttalign.rewards import REWARDS, reward_factory

    for name in REWARDS:
        assert callable(reward_factory(name)), name
    with pytest.raises(ValueError, match="Unknown reward 'nope'.*image_reward"):
        reward_factory("nope")
