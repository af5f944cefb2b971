"""The shapes world: seeded scenes of coloured shapes on a plain background, their captions and their grammar.

Images are 32x32 RGB, rendered with 4x supersampling (soft, antialiased edges). A scene holds 1 to 3 objects of
4 colours and 3 shapes. Captions follow a small grammar that covers GenEval's six categories
(Ghosh et al. 2023, https://arxiv.org/abs/2310.11513):

| category            | example caption                      |
|---------------------|--------------------------------------|
| `single_object`     | "a circle"                           |
| `colors`            | "a red circle"                       |
| `counting`          | "three squares", "two blue circles"  |
| `two_objects`       | "a circle and a triangle"            |
| `position`          | "a circle left of a square"          |
| `color_attribution` | "a red circle and a blue square"     |

Training captions also mix the forms ("a red circle above a green square").
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4
BACKGROUND = (0.94, 0.94, 0.94)
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}
CATEGORIES: tuple[str, ...] = ("single_object", "colors", "counting", "two_objects", "position", "color_attribution")
#: Words of the grammar: the tokenizer of the shapes model has one token for each.
VOCABULARY: tuple[str, ...] = (
    ("a", "an", "one", "two", "three", "and", "left", "right", "of", "above", "below")
    + tuple(COLORS)
    + SHAPES
    + tuple(s + "s" for s in SHAPES)
)


@dataclasses.dataclass
class ShapeObject:
    """One object of a scene: centre and radius in pixels of the 32x32 image."""

    shape: str
    color: str
    x: float
    y: float
    r: float


@dataclasses.dataclass
class Phrase:
    """A parsed noun phrase: `count` objects of `shape`, with `color` if the caption names one."""

    count: int
    color: str | None
    shape: str
    exact: bool  # "two circles" means exactly two; "a circle" means at least one


@dataclasses.dataclass
class Spec:
    """A parsed caption: one or two phrases, and the relation between them (`"left of"`, ...) if any."""

    phrases: list[Phrase]
    relation: str | None
    category: str


# --- rendering ---------------------------------------------------------------------------------------------------


def _shape_mask(shape: str, x: float, y: float, r: float, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    gy, gx = grid
    if shape == "circle":
        return (gx - x) ** 2 + (gy - y) ** 2 <= r**2
    if shape == "square":
        half = r * 0.86  # about the circle's area
        return (np.abs(gx - x) <= half) & (np.abs(gy - y) <= half)
    if shape == "triangle":
        top, bottom, half = y - r, y + 0.85 * r, 1.1 * r  # upright isosceles triangle
        t = (gy - top) / (bottom - top)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(gx - x) <= half * t)
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def render(objects: list[ShapeObject], size: int = IMAGE_SIZE) -> np.ndarray:
    """Renders objects to a float32 `[size, size, 3]` image in `[0, 1]`, antialiased by supersampling."""
    hi = size * SUPERSAMPLE
    coords = (np.arange(hi, dtype=np.float32) + 0.5) / SUPERSAMPLE
    grid = np.meshgrid(coords, coords, indexing="ij")
    canvas = np.empty((hi, hi, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for obj in objects:
        canvas[_shape_mask(obj.shape, obj.x, obj.y, obj.r, grid)] = COLORS[obj.color]
    return canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))


# --- scene sampling ----------------------------------------------------------------------------------------------


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str, margin: float = 2.0) -> bool:
    """Whether `a` stands in `relation` to `b` (image coordinates: y grows downwards), judged by centres."""
    dx, dy = a.x - b.x, a.y - b.y
    if relation == "left of":
        return dx < -margin
    if relation == "right of":
        return dx > margin
    if relation == "above":
        return dy < -margin
    if relation == "below":
        return dy > margin
    raise ValueError(f"Unknown relation {relation!r}; expected one of {RELATIONS}.")


def _place(rng: np.random.Generator, n: int, relation: str | None = None, size: int = IMAGE_SIZE):
    """Samples `n` non-overlapping (centre, radius) placements; with a relation, object 0 stands clearly in it to 1."""
    for _ in range(1000):
        radii = rng.uniform(4.5, 6.5, size=n)
        xs = [rng.uniform(r + 1, size - r - 1) for r in radii]
        ys = [rng.uniform(r + 1, size - r - 1) for r in radii]
        ok = all(np.hypot(xs[i] - xs[j], ys[i] - ys[j]) >= radii[i] + radii[j] + 2 for i in range(n) for j in range(i))
        if ok and relation is not None:
            dx, dy = xs[0] - xs[1], ys[0] - ys[1]
            main, other = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
            sign = -1 if relation in ("left of", "above") else 1
            ok = sign * main >= 8 and abs(main) > 1.5 * abs(other)
        if ok:
            return list(zip(xs, ys, radii))
    raise RuntimeError("Could not place the objects; this should not happen for up to 3 objects.")


def _phrase(count: int, color: str | None, shape: str) -> str:
    head = ("a" if count == 1 else COUNT_WORDS[count]) + (f" {color}" if color else "")
    return f"{head} {shape}{'s' if count > 1 else ''}"


def sample_scene(rng: np.random.Generator, category: str | None = None) -> tuple[list[ShapeObject], str]:
    """Samples a scene and a caption that describes it; `category` picks the caption form (random if `None`).

    Training draws categories uniformly, so composite captions are as frequent as single objects.
    """
    category = category or CATEGORIES[rng.integers(len(CATEGORIES))]
    colors, shapes = list(COLORS), list(SHAPES)
    if category in ("single_object", "colors"):
        (x, y, r), color, shape = _place(rng, 1)[0], rng.choice(colors), rng.choice(shapes)
        objects = [ShapeObject(shape, color, x, y, r)]
        return objects, _phrase(1, color if category == "colors" else None, shape)
    if category == "counting":
        count, shape, color = int(rng.integers(2, 4)), rng.choice(shapes), rng.choice(colors)
        objects = [ShapeObject(shape, color, x, y, r) for x, y, r in _place(rng, count)]
        return objects, _phrase(count, color if rng.random() < 0.5 else None, shape)
    # two objects of different shapes and different colours
    s1, s2 = rng.choice(shapes, size=2, replace=False)
    c1, c2 = rng.choice(colors, size=2, replace=False)
    relation = RELATIONS[rng.integers(len(RELATIONS))] if category == "position" else None
    (x1, y1, r1), (x2, y2, r2) = _place(rng, 2, relation)
    objects = [ShapeObject(s1, c1, x1, y1, r1), ShapeObject(s2, c2, x2, y2, r2)]
    with_color = category == "color_attribution" or (category == "position" and rng.random() < 0.5)
    p1, p2 = _phrase(1, c1 if with_color else None, s1), _phrase(1, c2 if with_color else None, s2)
    if relation is not None:
        return objects, f"{p1} {relation} {p2}"
    return objects, f"{p1} and {p2}"


def sample_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """`n` rendered scenes as float32 `[n, 3, 32, 32]` in `[0, 1]`, and their captions."""
    images, captions = [], []
    for _ in range(n):
        objects, caption = sample_scene(rng)
        images.append(render(objects))
        captions.append(caption)
    return np.stack(images).transpose(0, 3, 1, 2).copy(), captions


# --- grammar -----------------------------------------------------------------------------------------------------

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_PHRASE = rf"(a|an|one|two|three)\s+(?:({_COLOR})\s+)?({_SHAPE})(s?)"
_CAPTION = re.compile(rf"^\s*{_PHRASE}(?:\s+(and|left of|right of|above|below)\s+{_PHRASE})?\s*$")


def parse_caption(caption: str) -> Spec:
    """Parses a caption of the grammar into a :class:`Spec`; raises `ValueError` for any other text."""
    match = _CAPTION.match(caption.lower())
    if not match:
        raise ValueError(
            f"Caption {caption!r} is not in the shapes-world grammar (e.g. 'a red circle left of a square')."
        )
    g = match.groups()
    phrases = []
    for number, color, shape, plural in (g[0:4], g[5:9]):
        if number is None:
            continue
        count = NUMBERS[number]
        if (count > 1) != bool(plural):
            raise ValueError(f"Caption {caption!r}: {number!r} does not agree with {shape + plural!r}.")
        phrases.append(Phrase(count=count, color=color, shape=shape, exact=count > 1))
    connective = g[4]
    relation = connective if connective not in (None, "and") else None
    if len(phrases) == 1:
        p = phrases[0]
        category = "counting" if p.count > 1 else ("colors" if p.color else "single_object")
    elif relation is not None:
        category = "position"
    else:
        category = "color_attribution" if all(p.color for p in phrases) else "two_objects"
    return Spec(phrases=phrases, relation=relation, category=category)


def evaluation_prompts(per_category: int = 40, seed: int = 1234) -> list[tuple[str, str]]:
    """The fixed evaluation set: `per_category` captions of each of the six categories, as `(prompt, category)`.

    Captions are drawn with :func:`sample_scene` from their own seeded stream, so the set never changes; small
    categories repeat captions (there are only 3 single-object captions).
    """
    rng = np.random.default_rng(seed)
    return [(sample_scene(rng, category)[1], category) for category in CATEGORIES for _ in range(per_category)]


# --- attention-control helpers ------------------------------------------------------------------------------------


def subject_words(caption: str) -> list[str]:
    """The subject nouns of a caption as they are written (`"circles"` for two circles): Attend-and-Excite's tokens.

    `attend_and_excite:tokens=@ttalign.shapes.world:subject_words` on the command line."""
    return [phrase.shape + ("s" if phrase.count > 1 else "") for phrase in parse_caption(caption).phrases]


_HALVES = {
    "left of": ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)),
    "right of": ((0.5, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 1.0)),
    "above": ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)),
    "below": ((0.0, 0.5, 1.0, 1.0), (0.0, 0.0, 1.0, 0.5)),
}


def layout_regions(caption: str) -> dict[str, tuple[float, float, float, float]]:
    """A layout for a position caption: each phrase (colour and noun, as written) -> the half of the image its
    relation puts it in, as a box `(x0, y0, x1, y1)`; `{}` for captions without a relation.

    `region_reweight:regions=@ttalign.shapes.world:layout_regions` on the command line."""
    spec = parse_caption(caption)
    if spec.relation is None:
        return {}
    words = [(f"{p.color} " if p.color else "") + p.shape + ("s" if p.count > 1 else "") for p in spec.phrases]
    return dict(zip(words, _HALVES[spec.relation]))
