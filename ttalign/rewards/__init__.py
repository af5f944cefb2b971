"""Rewards: `reward(images: float [B, 3, H, W] in [0, 1], prompts: list[str]) -> Tensor[B]`, higher is better."""

from __future__ import annotations

from .base import Reward, check_images, check_scores
from .clip import AestheticMLP, CLIPEmbedder, CLIPScore, LaionAesthetic, PickScore
from .hps import HPSv2
from .image_reward import ImageReward
from .jpeg import JpegCompressibility, JpegIncompressibility
from .preprocess import clip_preprocess
from .weighted import WeightedReward

#: Rewards that can be named on the command line: short name -> "module:factory" (imported on use). The hub-backed
#: ones download their default checkpoint on first use.
REWARDS: dict[str, str] = {
    "clip": "ttalign.rewards.clip:CLIPScore.from_pretrained",
    "pickscore": "ttalign.rewards.clip:PickScore.from_pretrained",
    "hpsv2.1": "ttalign.rewards.hps:HPSv2.from_pretrained",
    "image_reward": "ttalign.rewards.image_reward:ImageReward.from_pretrained",
    "reno": "ttalign.rewards.weighted:WeightedReward.reno",
    "jpeg_compressibility": "ttalign.rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "ttalign.rewards.jpeg:JpegIncompressibility",
    "shapes_soft": "ttalign.shapes.soft:ShapesSoftVerifier",
    "shapes_clip": "ttalign.shapes.clip:ShapesCLIPScore",
    "shapes_exact": "ttalign.shapes.verifier:ShapesVerifierReward",
}


def reward_factory(name: str):
    """The callable behind a short reward name (see `REWARDS`); `ValueError` naming the choices if unknown."""
    import importlib

    if name not in REWARDS:
        raise ValueError(f"Unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}.")
    module, _, path = REWARDS[name].partition(":")
    factory = importlib.import_module(module)
    for attr in path.split("."):
        factory = getattr(factory, attr)
    return factory


def load_reward(name: str) -> Reward:
    """Instantiates a reward by its short name (see `REWARDS`)."""
    return reward_factory(name)()


__all__ = [
    "REWARDS",
    "AestheticMLP",
    "CLIPEmbedder",
    "CLIPScore",
    "HPSv2",
    "ImageReward",
    "LaionAesthetic",
    "PickScore",
    "WeightedReward",
    "clip_preprocess",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Reward",
    "check_images",
    "check_scores",
    "load_reward",
    "reward_factory",
]
