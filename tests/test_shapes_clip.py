"""The shapes CLIP: standard transformers layout, quality on held-out scenes, the reward and the training script."""

import os

import pytest
import torch

from ttalign.rewards import load_reward
from ttalign.shapes import CLIP_DIR, ShapesCLIPScore, render
from ttalign.shapes.clip import main as train_main
from ttalign.shapes.clip import pairwise_accuracy
from ttalign.shapes.world import ShapeObject


@pytest.fixture(scope="module")
def reward():
    return ShapesCLIPScore()


def test_loads_as_a_plain_clip_checkpoint():
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(CLIP_DIR)
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_DIR)
    processor = CLIPImageProcessor.from_pretrained(CLIP_DIR)
    assert processor.crop_size == {"height": 32, "width": 32}
    assert model.config.projection_dim == 64
    assert not [f for f in os.listdir(CLIP_DIR) if f.endswith((".bin", ".pt", ".pth"))]
    assert pairwise_accuracy(model, tokenizer, n=300) >= 0.85


def test_reward_prefers_the_matching_caption(reward):
    image = torch.from_numpy(
        render([ShapeObject("circle", "red", 9, 16, 5.5), ShapeObject("square", "blue", 23, 16, 5.5)])
    )
    images = image.permute(2, 0, 1)[None].repeat(3, 1, 1, 1)
    scores = reward(images, ["a red circle and a blue square", "a green triangle", "three yellow squares"])
    assert scores[0] > scores[1] and scores[0] > scores[2]


def test_reward_is_differentiable_and_caches_text(reward):
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    reward(images, ["a circle", "a circle"]).sum().backward()
    assert images.grad.abs().sum() > 0
    assert "a circle" in reward.embedder._text_cache
    assert isinstance(load_reward("shapes_clip"), ShapesCLIPScore)


def test_clip_training_script_smoke(tmp_path):
    out = tmp_path / "clip"
    train_main(["--out", str(out), "--steps", "2", "--batch-size", "8", "--dataset-size", "32"])
    assert ShapesCLIPScore(str(out))(torch.rand(1, 3, 32, 32), ["a circle"]).shape == (1,)
    assert "held-out pairwise accuracy" in (out / "training_log.txt").read_text()
