"""Rewards: tensor-space CLIP preprocessing, CLIPScore, LAION aesthetic, weighted sums, input checks."""

import numpy as np
import pytest
import torch
from PIL import Image

from ttalign.rewards import (
    AestheticMLP,
    CLIPScore,
    JpegCompressibility,
    JpegIncompressibility,
    LaionAesthetic,
    PickScore,
    WeightedReward,
    clip_preprocess,
)
from ttalign.rewards.preprocess import OPENAI_CLIP_STD
from ttalign.testing import get_tiny_tokenizer


def _smooth_image(height, width, seed=0):
    base = torch.rand(1, 3, height // 8 + 1, width // 8 + 1, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear").clamp(0, 1)
    return (image * 255).round() / 255  # exactly representable as 8-bit


@pytest.mark.parametrize("size", [(512, 512), (64, 96), (300, 200), (32, 32)])
def test_clip_preprocess_matches_the_hf_processor(size):
    from transformers import CLIPImageProcessor

    image = _smooth_image(*size)
    pil = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    reference = CLIPImageProcessor()(images=pil, return_tensors="pt").pixel_values
    ours = clip_preprocess(image)
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    diff = ((ours - reference) * torch.tensor(OPENAI_CLIP_STD)[None, :, None, None]).abs() * 255  # in 8-bit levels
    # the HF path rounds to 8 bits after resizing (up to half a level); the tensor path does not
    assert diff.mean() <= 0.5 and torch.quantile(diff.flatten(), 0.999) <= 1.0 and diff.max() <= 1.5


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP saved in the standard layout (config, safetensors, tokenizer, image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = get_tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=30,
            patch_size=2,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=32,
    )
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(path)
    return path


def test_clip_score_equals_the_reference_model_computation(tiny_clip_dir):
    from transformers import CLIPImageProcessor, CLIPModel

    reward = CLIPScore.from_pretrained(str(tiny_clip_dir))
    images = torch.cat([_smooth_image(64, 64, seed) for seed in range(3)])
    prompts = ["a red circle", "a cat", "a red circle"]
    scores = reward(images, prompts)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokens = reward.embedder.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip_dir)(
        images=[Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images],
        return_tensors="pt",
    ).pixel_values
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, pixel_values=pixels)
    expected = torch.diagonal(out.logits_per_image) / model.logit_scale.exp() * 100
    assert torch.allclose(scores, expected, atol=0.05)  # within the 8-bit rounding of the HF image path
    assert len(reward.embedder._text_cache) == 2  # one embedding per distinct prompt
    hessel = CLIPScore(reward.embedder, hessel=True)(images, prompts)
    assert torch.allclose(hessel, 2.5 * (scores / 100).clamp_min(0), atol=1e-5)


def test_pickscore_is_the_scaled_cosine_with_a_separate_processor(tiny_clip_dir):
    from transformers import CLIPModel

    reward = PickScore.from_pretrained(str(tiny_clip_dir), processor_path=str(tiny_clip_dir))
    clip = CLIPScore.from_pretrained(str(tiny_clip_dir))
    images = torch.cat([_smooth_image(64, 64, seed) for seed in range(2)])
    scale = CLIPModel.from_pretrained(tiny_clip_dir).logit_scale.exp().item()
    assert torch.allclose(
        reward(images, ["a cat", "a dog"]), clip(images, ["a cat", "a dog"]) / 100 * scale, atol=1e-4
    )


def test_laion_aesthetic_loads_the_released_layout(tiny_clip_dir, tmp_path):
    torch.manual_seed(0)
    mlp = AestheticMLP(32)
    state = mlp.state_dict()
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    torch.save(state, tmp_path / LaionAesthetic.MLP_FILENAME)
    reward = LaionAesthetic.from_pretrained(str(tmp_path / LaionAesthetic.MLP_FILENAME), clip_path=str(tiny_clip_dir))
    images = torch.cat([_smooth_image(48, 48, seed) for seed in range(2)])
    embeds = reward.embedder.image_embeds(images)
    assert torch.allclose(reward(images), mlp.eval()(embeds).squeeze(-1), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="No aesthetic MLP file"):
        LaionAesthetic.from_pretrained(str(tmp_path / "missing.pth"), clip_path=str(tiny_clip_dir))


@pytest.mark.parametrize("which", ["clip", "aesthetic"])
def test_gradients_reach_the_pixels(tiny_clip_dir, tmp_path, which):
    if which == "clip":
        reward = CLIPScore.from_pretrained(str(tiny_clip_dir))
    else:
        torch.save(AestheticMLP(32).state_dict(), tmp_path / "mlp.pth")
        reward = LaionAesthetic.from_pretrained(str(tmp_path / "mlp.pth"), clip_path=str(tiny_clip_dir))
    assert reward.differentiable
    images = _smooth_image(40, 56).requires_grad_()
    reward(images, ["a cat"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


def test_jpeg_rewards():
    flat, noisy = torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    assert JpegIncompressibility()(images)[1] > JpegIncompressibility()(images)[0]
    assert torch.equal(JpegCompressibility()(images), -JpegIncompressibility()(images))


def test_weighted_reward_logs_components_and_normalizes():
    def a(images, prompts):
        return images.mean(dim=(1, 2, 3))

    def b(images, prompts):
        return 10 * images.amax(dim=(1, 2, 3))

    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    reward = WeightedReward([(a, 2.0), (b, 0.5)])
    assert torch.allclose(reward(images), 2 * a(images, None) + 0.5 * b(images, None))
    assert set(reward.last_components) == {"0:a", "1:b"}
    jpeg = WeightedReward([(JpegIncompressibility(), 1.0)], normalization="affine")
    assert torch.allclose(jpeg(images), JpegIncompressibility()(images) / 500)
    z = WeightedReward([(a, 1.0)], normalization="zscore")
    first = z(images)
    assert abs(first.mean().item()) < 1e-5
    with pytest.raises(ValueError, match="finite native_range"):
        WeightedReward([(a, 1.0)], normalization="affine")(images)
    with pytest.raises(ValueError, match="normalization must be one of"):
        WeightedReward([(a, 1.0)], normalization="minmax")
    with pytest.raises(ValueError, match="non-finite scores"):
        WeightedReward([(lambda i, p: torch.full((4,), float("nan")), 1.0)])(images)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(2, 3, 8, 8) * 2, r"must lie in \[0, 1\]"),
        (torch.rand(2, 8, 8), r"shape \[B, 3, H, W\]"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "float tensor"),
        (np.zeros((2, 3, 8, 8)), "must be a torch.Tensor"),
    ],
)
def test_bad_input_is_refused_with_the_bad_value(images, message):
    with pytest.raises(ValueError, match=message):
        JpegIncompressibility()(images)


def test_non_finite_scores_are_reported():
    from ttalign.rewards import Reward

    class Broken(Reward):
        def score(self, images, prompts):
            scores = images.mean(dim=(1, 2, 3))
            scores[1] = float("nan")
            return scores

    with pytest.raises(ValueError, match=r"Broken returned non-finite scores for images \[1\]"):
        Broken()(torch.rand(3, 3, 8, 8))
