"""A differentiable soft verifier of the shapes world, usable as a reward by gradient-based methods.

It scores the same clauses as the exact verifier (:mod:`ttalign.shapes.verifier`) with smooth functions of the
pixels:

- colour maps: each pixel's coverage `alpha_c` of colour `c` (its position on the blend line from the background
  to `c`), damped by its distance from that line;
- shape evidence: normalized cross-correlation of a colour map with an ideal template of each shape; a softmax
  over shapes of the best responses gives the probability that the phrase's object has the right shape;
- existence and count: the colour map's mass against the area of one object;
- relations: the soft centroids (softmax over template responses) of the two phrases' objects.

The reward is the geometric mean of the clause scores, in `(0, 1]`; higher is better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttalign.rewards.base import Reward
from ttalign.shapes.world import BACKGROUND, COLORS, IMAGE_SIZE, SHAPES, parse_caption

#: Mean area in pixels (at 32x32) of one object of the world.
OBJECT_AREA = 75.0
_TEMPLATE_SIZE = 15


_RADII = (4.5, 5.5, 6.5)  # the world's range of object radii


def _templates() -> torch.Tensor:
    """Zero-mean, unit-norm coverage templates of each shape at each radius of `_RADII`, `[S * R, 1, 15, 15]`
    (shape-major)."""
    from ttalign.shapes.verifier import _coverage

    c = _TEMPLATE_SIZE / 2
    tpl = torch.stack(
        [
            torch.from_numpy(_coverage(s, c, c, r, _TEMPLATE_SIZE, _TEMPLATE_SIZE)).float()
            for s in SHAPES
            for r in _RADII
        ]
    )
    tpl = tpl - tpl.mean(dim=(1, 2), keepdim=True)
    return (tpl / tpl.flatten(1).norm(dim=1)[:, None, None])[:, None]


class ShapesSoftVerifier(Reward):
    """Differentiable soft verifier of shapes-world captions (see the module docstring).

    Args:
        tolerance (`float`, defaults to 0.2): RGB distance from a colour's blend line at which membership decays
            by `1/e`.
        sharpness (`float`, defaults to 20.0): inverse temperature of the softmax over shapes and positions.

    Example:

    ```py
    >>> from ttalign.shapes import ShapesSoftVerifier
    >>> reward = ShapesSoftVerifier()
    >>> reward(images, ["a red circle left of a blue square"] * len(images))  # images [B, 3, H, W] in [0, 1]
    ```
    """

    differentiable = True
    native_range = (0.0, 1.0)
    license = "Apache-2.0"

    def __init__(self, tolerance: float = 0.2, sharpness: float = 20.0):
        super().__init__()
        if tolerance <= 0 or sharpness <= 0:
            raise ValueError(f"tolerance and sharpness must be > 0, got {tolerance!r} and {sharpness!r}.")
        self.tolerance, self.sharpness = tolerance, sharpness
        self.register_buffer("background", torch.tensor(BACKGROUND), persistent=False)
        self.register_buffer("directions", torch.tensor(list(COLORS.values())) - self.background, persistent=False)
        self.register_buffer("templates", _templates(), persistent=False)

    def color_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Soft coverage of each palette colour, `[B, K, H, W]`, at 32x32."""
        if images.shape[-1] != IMAGE_SIZE or images.shape[-2] != IMAGE_SIZE:
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        d = self.directions.to(images)  # [K, 3]
        offset = images - self.background.to(images)[None, :, None, None]  # [B, 3, H, W]
        alpha = torch.einsum("bchw,kc->bkhw", offset, d) / (d**2).sum(-1)[None, :, None, None]
        alpha = alpha.clamp(0, 1)  # [B, K, H, W]
        residual = (offset[:, None] - alpha[:, :, None] * d[None, :, :, None, None]).norm(dim=2)  # [B, K, H, W]
        return alpha * torch.exp(-((residual / self.tolerance) ** 2))

    def _ncc(self, maps: torch.Tensor) -> torch.Tensor:
        """Normalized cross-correlation of maps `[B, 1, H, W]` with each shape (best radius): `[B, S, H, W]`."""
        tpl = self.templates.to(maps)
        pad = _TEMPLATE_SIZE // 2
        num = F.conv2d(F.pad(maps, (pad,) * 4), tpl)  # [B, S, H, W]
        ones = torch.ones_like(tpl[:1]) / tpl[0].numel()
        mean = F.conv2d(F.pad(maps, (pad,) * 4), ones)
        var = (F.conv2d(F.pad(maps**2, (pad,) * 4), ones) - mean**2).clamp_min(0)
        ncc = num / (var * tpl[0].numel() + 1e-3).sqrt()  # [B, S * R, H, W]
        return ncc.unflatten(1, (len(SHAPES), len(_RADII))).amax(2)

    def _phrase(self, colors: torch.Tensor, phrase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score of a phrase `[]`, and the soft centroid `(x, y)` of its object, for one image's maps `[K, H, W]`."""
        shape = SHAPES.index(phrase.shape)
        if phrase.color is not None:
            m = colors[list(COLORS).index(phrase.color)]
            ncc = self._ncc(m[None, None])[0]  # [S, H, W]
        else:  # the colour whose map holds the best match of the phrase's shape
            nccs = self._ncc(colors[:, None])  # [K, S, H, W]
            k = nccs[:, shape].flatten(1).amax(1).argmax()
            m, ncc = colors[k], nccs[k]
        best = ncc.flatten(1).amax(1)  # [S]
        shape_prob = torch.softmax(self.sharpness * best, 0)[shape]
        objects = m.sum() / OBJECT_AREA
        if phrase.exact:
            count = torch.exp(-(((objects - phrase.count) / 0.6) ** 2))
        else:
            count = torch.sigmoid(4 * (objects - 0.5))
        weights = torch.softmax(self.sharpness * ncc[shape].flatten(), 0).view_as(m)
        grid = torch.arange(m.shape[-1], device=m.device, dtype=m.dtype) + 0.5
        cx, cy = (weights.sum(0) * grid).sum(), (weights.sum(1) * grid).sum()
        return count * shape_prob, cx, cy

    def check_prompts(self, prompts: list[str]) -> None:
        """Raises `ValueError` for a caption outside the shapes grammar (this reward parses every prompt)."""
        for prompt in prompts:
            parse_caption(prompt)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        maps = self.color_maps(images)
        scores = []
        for colors, prompt in zip(maps, prompts):
            spec = parse_caption(prompt)
            clauses, centres = [], []
            for phrase in spec.phrases:
                value, cx, cy = self._phrase(colors, phrase)
                clauses.append(value)
                centres.append((cx, cy))
            if spec.relation is not None:
                (x1, y1), (x2, y2) = centres
                gap = {"left of": x2 - x1, "right of": x1 - x2, "above": y2 - y1, "below": y1 - y2}[spec.relation]
                clauses.append(torch.sigmoid(gap - 2.0))
            scores.append(torch.stack(clauses).clamp_min(1e-4).log().mean().exp())
        return torch.stack(scores)
