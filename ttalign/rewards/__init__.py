"""Rewards: `reward(images: float [B, 3, H, W] in [0, 1], prompts: list[str]) -> Tensor[B]`, higher is better."""

from __future__ import annotations

from .base import Reward, check_images, check_scores
from .clip import AestheticMLP, CLIPEmbedder, CLIPScore, LaionAesthetic, PickScore
from .hps import HPSv2
from .jpeg import JpegCompressibility, JpegIncompressibility
from .preprocess import clip_preprocess
from .weighted import WeightedReward

#: Rewards that can be named on the command line: short name -> "module:class" (imported on use).
REWARDS: dict[str, str] = {
    "jpeg_compressibility": "ttalign.rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "ttalign.rewards.jpeg:JpegIncompressibility",
    "shapes_soft": "ttalign.shapes.soft:ShapesSoftVerifier",
    "shapes_clip": "ttalign.shapes.clip:ShapesCLIPScore",
}


def load_reward(name: str) -> Reward:
    """Instantiates a reward by its short name (see `REWARDS`)."""
    import importlib

    if name not in REWARDS:
        raise ValueError(f"Unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}.")
    module, _, cls = REWARDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = [
    "REWARDS",
    "AestheticMLP",
    "CLIPEmbedder",
    "CLIPScore",
    "HPSv2",
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
]
