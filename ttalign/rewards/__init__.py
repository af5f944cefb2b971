"""Rewards: `reward(images: float [B, 3, H, W] in [0, 1], prompts: list[str]) -> Tensor[B]`, higher is better."""

from __future__ import annotations

from .base import Reward, check_images, check_scores
from .jpeg import JpegCompressibility, JpegIncompressibility

#: Rewards that can be named on the command line, by their short names.
REWARDS: dict[str, type[Reward]] = {
    "jpeg_compressibility": JpegCompressibility,
    "jpeg_incompressibility": JpegIncompressibility,
}


def load_reward(name: str) -> Reward:
    """Instantiates a reward by its short name (see `REWARDS`)."""
    if name not in REWARDS:
        raise ValueError(f"Unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}.")
    return REWARDS[name]()


__all__ = [
    "REWARDS",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Reward",
    "check_images",
    "check_scores",
    "load_reward",
]
