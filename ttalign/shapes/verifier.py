"""The exact verifier of the shapes world: colour segmentation and shape geometry, no learned model.

Every pixel is assigned to the nearest palette colour (or to the background) when it lies close enough to it;
each colour's connected components of sufficient area are objects; an object's shape follows from its geometry
(the ideal circle, square or triangle of the same area and centroid that overlaps it best). A caption of
the grammar in :mod:`ttalign.shapes.world` becomes clauses (existence, exact count, colour, relation) that are
checked against the detected objects. An image passes when every clause holds, as in GenEval.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ttalign.rewards.base import Reward
from ttalign.shapes.world import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    ShapeObject,
    Spec,
    _shape_mask,
    layout_regions,
    parse_caption,
    relation_holds,
)

_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # [1 + K, 3]
#: How far (RGB Euclidean) a pixel may lie from the blend line of the background and a colour.
COLOR_TOLERANCE = 0.25
#: Connected components smaller than this many pixels (at 32x32) are noise, not objects.
MIN_AREA = 14
#: The least IoU between an object and its best-fitting ideal shape for the shape to count.
MIN_SHAPE_IOU = 0.6


@dataclasses.dataclass
class Detected:
    """A detected object: colour, shape (`None` when the geometry fits no shape), centre and area in pixels."""

    color: str
    shape: str | None
    x: float
    y: float
    area: int


@dataclasses.dataclass
class Verdict:
    """The verdict on one image: whether it passed, each clause's verdict, and what was detected."""

    prompt: str
    category: str
    passed: bool
    clauses: dict[str, bool]
    objects: list[Detected]


@dataclasses.dataclass
class Verification:
    """Verdicts on a batch of images, with accuracy per category and overall (mean over categories present)."""

    verdicts: list[Verdict]

    @property
    def passed(self) -> list[bool]:
        return [v.passed for v in self.verdicts]

    @property
    def category_accuracy(self) -> dict[str, float]:
        out = {}
        for category in CATEGORIES:
            hits = [v.passed for v in self.verdicts if v.category == category]
            if hits:
                out[category] = float(np.mean(hits))
        return out

    @property
    def overall(self) -> float:
        acc = self.category_accuracy
        return float(np.mean(list(acc.values()))) if acc else float("nan")


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask `[H, W]`, each as an array of (row, col) pixel coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    components = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        components.append(np.array(pixels))
    return components


def _coverage(shape: str, x: float, y: float, r: float, height: int, width: int, ss: int = 4) -> np.ndarray:
    """The fraction of each pixel `[height, width]` that an ideal shape covers (supersampled `ss` x `ss`)."""
    coords_y = (np.arange(height * ss) + 0.5) / ss
    coords_x = (np.arange(width * ss) + 0.5) / ss
    mask = _shape_mask(shape, x, y, r, np.meshgrid(coords_y, coords_x, indexing="ij"))
    return mask.reshape(height, ss, width, ss).mean(axis=(1, 3))


def classify_shape(pixels: np.ndarray, alpha: np.ndarray) -> str | None:
    """Classifies a component as circle, square or triangle, or `None` when no shape fits.

    `pixels` `[P, 2]` are the component's (row, col) coordinates and `alpha` `[H, W]` the estimated coverage of
    its colour at every pixel (soft edges included). Each ideal shape of the same soft area and centroid is
    compared with the coverage by soft intersection over union; the best fit wins if it reaches `MIN_SHAPE_IOU`.
    """
    rows, cols = pixels[:, 0], pixels[:, 1]
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    if not 0.55 <= h / w <= 1.8:
        return None
    r0, c0 = max(rows.min() - 2, 0), max(cols.min() - 2, 0)
    region = alpha[r0 : rows.max() + 3, c0 : cols.max() + 3]  # the box with two pixels of margin
    # each ideal shape of the same soft area and centroid (moments, not the box, so soft edges do not bias it)
    area = region.sum()
    gy, gx = np.meshgrid(np.arange(region.shape[0]) + 0.5, np.arange(region.shape[1]) + 0.5, indexing="ij")
    cy, cx = (region * gy).sum() / area, (region * gx).sum() / area
    r_tri = np.sqrt(area / 2.035)  # triangle area = 0.5 * 2.2 r * 1.85 r; its centroid lies 0.233 r below y
    fits = {
        "circle": _coverage("circle", cx, cy, np.sqrt(area / np.pi), *region.shape),
        "square": _coverage("square", cx, cy, np.sqrt(area) / 2 / 0.86, *region.shape),
        "triangle": _coverage("triangle", cx, cy - 0.233 * r_tri, r_tri, *region.shape),
    }
    ious = {name: np.minimum(fit, region).sum() / np.maximum(fit, region).sum() for name, fit in fits.items()}
    best = max(ious, key=ious.get)
    return best if ious[best] >= MIN_SHAPE_IOU else None


def detect(image: np.ndarray) -> list[Detected]:
    """Detects the objects of one image, float `[H, W, 3]` in `[0, 1]`; coordinates in 32x32 pixel units.

    A pixel's colour is modelled as a blend `bg + alpha (c - bg)` of the background and one palette colour `c`
    (what antialiasing produces); it belongs to the colour whose blend line passes within `COLOR_TOLERANCE` and
    nearest, when its coverage `alpha` is at least one half.
    """
    scale = 32.0 / image.shape[0]
    bg = _PALETTE[0]
    direction = _PALETTE[1:] - bg  # [K, 3]
    offset = image - bg  # [H, W, 3]
    alpha = np.clip(offset @ direction.T / (direction**2).sum(-1), 0, 1)  # [H, W, K]
    residual = np.linalg.norm(offset[:, :, None, :] - alpha[..., None] * direction, axis=-1)  # [H, W, K]
    residual = np.where(alpha >= 0.5, residual, np.inf)
    nearest = residual.argmin(-1)
    close = residual.min(-1) <= COLOR_TOLERANCE
    objects = []
    for k, name in enumerate(COLORS):
        member = (nearest == k) & close
        soft = np.where(residual[..., k] <= 2 * COLOR_TOLERANCE, alpha[..., k], 0.0)
        for pixels in _components(member):
            area = len(pixels) * scale**2
            if area < MIN_AREA:
                continue
            cy, cx = (pixels.mean(0) + 0.5) * scale
            objects.append(Detected(name, classify_shape(pixels, soft), float(cx), float(cy), int(round(area))))
    return objects


def _matches(objects: list[Detected], phrase) -> list[Detected]:
    return [o for o in objects if o.shape == phrase.shape and (phrase.color is None or o.color == phrase.color)]


def _describe(phrase) -> str:
    return " ".join(filter(None, [str(phrase.count), phrase.color, phrase.shape]))


def judge(objects: list[Detected], spec: Spec) -> dict[str, bool]:
    """The verdict of each clause of a parsed caption on the detected objects."""
    clauses = {}
    for phrase in spec.phrases:
        found = len(_matches(objects, phrase))
        if phrase.exact:
            clauses[f"exactly {_describe(phrase)}"] = found == phrase.count
        else:
            clauses[f"exists {_describe(phrase)}"] = found >= 1
    if spec.relation is not None:
        first, second = (_matches(objects, p) for p in spec.phrases)
        holds = any(
            a is not b and relation_holds(_as_object(a), _as_object(b), spec.relation) for a in first for b in second
        )
        clauses[f"{_describe(spec.phrases[0])} {spec.relation} {_describe(spec.phrases[1])}"] = holds
    return clauses


def placement(verdict: Verdict) -> list[bool | None]:
    """Where a position caption's objects were drawn, against the layout :func:`~ttalign.shapes.world.layout_regions`
    gives the caption (each phrase in the half of the image its relation names): per phrase, `None` when no detected
    object matches it, else whether a match has its centre inside the phrase's half. `[]` without a relation.

    Region control is judged by this: it moves drawn objects into their regions, which the relation clause only sees
    when both objects are drawn."""
    spec = parse_caption(verdict.prompt)
    if spec.relation is None:
        return []
    out = []
    for phrase, (x0, y0, x1, y1) in zip(spec.phrases, layout_regions(verdict.prompt).values()):
        found = _matches(verdict.objects, phrase)
        inside = [x0 <= o.x / IMAGE_SIZE < x1 and y0 <= o.y / IMAGE_SIZE < y1 for o in found]  # centres in 32 px
        out.append(any(inside) if found else None)
    return out


def _as_object(d: Detected) -> ShapeObject:
    return ShapeObject(d.shape or "?", d.color, d.x, d.y, 0.0)


def _to_numpy(images) -> np.ndarray:
    """Images as float `[B, H, W, 3]` in `[0, 1]`, from a tensor `[B, 3, H, W]`, an array, or PIL images."""
    if isinstance(images, torch.Tensor):
        return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"Expected images [B, H, W, 3] or [B, 3, H, W], got shape {images.shape}.")
        array = images.transpose(0, 2, 3, 1) if images.shape[1] == 3 and images.shape[-1] != 3 else images
        return array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


def verify(images, prompts: list[str] | str) -> Verification:
    """Verifies images against shapes-world captions.

    Args:
        images: float tensor `[B, 3, H, W]` in `[0, 1]`, an array `[B, H, W, 3]`, or a list of PIL images.
        prompts: one caption per image (or one for all), in the grammar of :mod:`ttalign.shapes.world`.

    Returns:
        [`Verification`]: per-image verdicts (`passed`, each clause, detected objects) and per-category accuracy.
    """
    array = _to_numpy(images)
    prompts = [prompts] * len(array) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(array):
        raise ValueError(f"Got {len(prompts)} prompts for {len(array)} images.")
    verdicts = []
    for image, prompt in zip(array, prompts):
        spec = parse_caption(prompt)
        objects = detect(image)
        clauses = judge(objects, spec)
        verdicts.append(Verdict(prompt, spec.category, all(clauses.values()), clauses, objects))
    return Verification(verdicts)


class ShapesVerifierReward(Reward):
    """The exact verifier as a reward (not differentiable), for the trainers and methods that only need scores
    (GRPO, DDPO, best-of-N, particle steering): the share of a caption's clauses that hold, so a passing image scores
    1 and one that fails every clause 0; with `strict=True` only a pass counts (GenEval's binary verdict).

    Flow-GRPO trains on GenEval's rule-based judge in the same way; a run optimizing this reward is judged by the
    reward itself, the best case (compare with the soft verifier or the shapes CLIP).

    Args:
        strict (`bool`, defaults to `False`): score 1 for a pass and 0 otherwise, instead of the share of clauses.
    """

    native_range = (0.0, 1.0)
    license = "Apache-2.0"

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict

    def check_prompts(self, prompts: list[str]) -> None:
        """Raises `ValueError` for a caption outside the shapes grammar (this reward parses every prompt)."""
        for prompt in prompts:
            parse_caption(prompt)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        verdicts = verify(images, prompts).verdicts
        if self.strict:
            values = [float(v.passed) for v in verdicts]
        else:
            values = [sum(v.clauses.values()) / len(v.clauses) for v in verdicts]
        return torch.tensor(values, device=images.device)
