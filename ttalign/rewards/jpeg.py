"""JPEG compressibility rewards of DDPO (Black et al. 2023, https://arxiv.org/abs/2305.13301).

Non-differentiable: the score is the size of the image encoded as JPEG at quality 95, in kilobytes.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import Reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """`[B]` JPEG sizes in kB (1 kB = 1000 bytes) of images `[B, 3, H, W]` in `[0, 1]`."""
    pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegCompressibility(Reward):
    """Negative JPEG size in kB: higher for images that compress well (plain, smooth)."""

    native_range = (-500.0, 0.0)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -jpeg_size_kb(images)


class JpegIncompressibility(Reward):
    """JPEG size in kB: higher for images with more detail."""

    native_range = (0.0, 500.0)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return jpeg_size_kb(images)
