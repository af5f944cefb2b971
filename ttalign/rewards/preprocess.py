"""Tensor-space image preprocessing for CLIP-family rewards, differentiable end to end.

The Hugging Face image processors work on PIL images or detached arrays; on a gradient path they cut the graph.
`clip_preprocess` reproduces `CLIPImageProcessor` (resize the shortest side with antialiased bicubic
interpolation, centre crop, normalize) on float tensors in `[0, 1]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shortest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, antialiased resize of `[B, 3, H, W]` so that the shorter side is `size` (as PIL and HF round)."""
    height, width = images.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    if (new_h, new_w) == (height, width):
        return images
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop of `[B, C, H, W]` to `[B, C, height, width]`, zero-padding a side that is too short."""
    h, w = images.shape[-2:]
    if h < height or w < width:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        h, w = images.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top : top + height, left : left + width]


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    crop_size: int | None = None,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """`CLIPImageProcessor` on tensors: `[B, 3, H, W]` in `[0, 1]` -> normalized `[B, 3, crop, crop]`."""
    crop_size = crop_size or size
    x = resize_shortest_side(images, size).clamp(0, 1)  # PIL clips bicubic overshoot to [0, 255]
    x = center_crop(x, crop_size, crop_size)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - mean_t) / std_t


def resize_longest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, antialiased resize of `[B, 3, H, W]` so that the longer side is `size` (ratio kept, sides rounded)."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    if (new_h, new_w) == (height, width):
        return images
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
