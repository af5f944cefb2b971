"""The shapes-world evaluation harness: verified success per category with Wilson intervals, the soft-verifier and
shapes-CLIP rewards, diversity among the images of a prompt, compute and memory of a method list; the paired sign test
that compares two runs image by image.

Used by `benchmarks/shapes_eval.py`; every method reports through it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ttalign.shapes.soft import ShapesSoftVerifier
from ttalign.shapes.verifier import Verification, placement, verify
from ttalign.shapes.world import CATEGORIES


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes / n` (95% with `z = 1.96`); `(0, 1)` when `n = 0`."""
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}.")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability of a split at least this uneven if both directions were equally
    likely (ties left out)."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(base: list, run: list) -> dict:
    """Paired comparison of two runs on the same prompts and seeds, from their `verdicts` (`[category, passed]` per
    image, as :meth:`EvalResult.summary` gives them): images the run turned from failed to passed (`wins`) and back
    (`losses`), and the sign test on them."""
    if [c for c, _ in base] != [c for c, _ in run]:
        raise ValueError("the two runs were not made on the same prompts (their categories differ image by image)")
    wins = sum(r and not b for (_, b), (_, r) in zip(base, run))
    losses = sum(b and not r for (_, b), (_, r) in zip(base, run))
    return {"wins": wins, "losses": losses, "p_value": sign_test(wins, losses)}


def select_best(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Selection among candidates: for each row of `scores` `[P, K]` (a reward of `K` candidates, e.g. the images of
    one prompt and seed, or noise optimization's iterates), the index of the highest-scoring of the first `n` (the
    first of equal scores; a NaN score never wins). Best-of-`n` with a reward; with a verifier's verdicts as the
    scores, pass@`n` (an oracle's pick: right whenever any of the `n` is). Returns `[P]` long."""
    if scores.ndim != 2:
        raise ValueError(f"select_best needs scores of shape [P, K], got {tuple(scores.shape)}.")
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"select_best: n must be in [1, {scores.shape[1]}], got {n!r}.")
    first = scores[:, :n].float().nan_to_num(nan=float("-inf"))  # [P, n]
    return first.argmax(dim=1)  # the first maximum


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def diversity(embeds: torch.Tensor, verification: Verification, images_per_prompt: int) -> dict:
    """Diversity among the images of each prompt (consecutive blocks of `images_per_prompt` images, as
    :func:`evaluate` generates them), averaged over the prompts; `nan` with one image per prompt:

    - `clip_distance`: mean pairwise cosine distance `1 - cos` of the images' unit-norm embeddings `embeds` `[N, D]`
      (the shapes CLIP's in :func:`evaluate`; 0: identical images);
    - `position_spread`: the standard deviation (pixels at 32x32, both axes together) of where the objects are, each
      image's detected objects' mean centre;
    - `size_spread`: the standard deviation of the detected objects' mean area (pixels at 32x32).

    Images without a detected object count for the CLIP distance only.
    """
    verdicts = verification.verdicts
    if len(embeds) != len(verdicts) or len(verdicts) % images_per_prompt:
        raise ValueError(
            f"diversity needs one embedding per verdict in blocks of images_per_prompt="
            f"{images_per_prompt}, got {len(embeds)} embeddings, {len(verdicts)} verdicts."
        )
    groups = [list(range(i, i + images_per_prompt)) for i in range(0, len(verdicts), images_per_prompt)]
    if any(len({verdicts[i].prompt for i in group}) > 1 for group in groups):
        raise ValueError(f"diversity: the blocks of {images_per_prompt} images do not each share one prompt.")
    distances, positions, sizes = [], [], []
    for indices in groups:
        if len(indices) < 2:
            continue
        e = embeds[indices]  # [k, D], unit norm
        k = len(indices)
        distances.append(float((1 - e @ e.T).sum() / (k * (k - 1))))  # the diagonal is 0
        found = [verdicts[i].objects for i in indices]
        centres = np.array([[np.mean([o.x for o in f]), np.mean([o.y for o in f])] for f in found if f])
        areas = np.array([np.mean([o.area for o in f]) for f in found if f])
        if len(centres) >= 2:
            positions.append(float(np.sqrt(centres.var(0).sum())))
            sizes.append(float(areas.std()))
    return {
        "clip_distance": _mean(distances),
        "position_spread": _mean(positions),
        "size_spread": _mean(sizes),
        "prompts": len(distances),
    }


@dataclasses.dataclass
class EvalResult:
    """What one evaluation run measured."""

    name: str
    methods: list[str]
    category_accuracy: dict[str, float]
    overall: float
    soft_reward: float
    clip_reward: float
    intervals: dict[str, tuple[float, float]]
    diversity: dict[str, float]
    images: int
    wall_time_s: float
    nfe_per_image: float
    denoiser_calls: int
    reward_calls: int
    peak_memory_mb: float
    settings: dict
    verification: Verification = dataclasses.field(repr=False)
    samples: torch.Tensor = dataclasses.field(repr=False)  # [N, 3, H, W] in [0, 1]
    prompts: list[str] = dataclasses.field(repr=False)

    def summary(self) -> dict:
        """The measured figures (`intervals`: 95% Wilson intervals per category and overall), JSON-ready, with every
        image's category and verdict (in generation order, so runs with the same prompts and seeds can be compared
        image by image) and, for position captions, where each phrase's object was drawn
        (:func:`~ttalign.shapes.verifier.placement`; `[]` for other captions)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("verification", "samples", "prompts"):
            out.pop(key)
        out["verdicts"] = [[v.category, bool(v.passed)] for v in self.verification.verdicts]
        out["placements"] = [placement(v) for v in self.verification.verdicts]
        return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: kB)


def evaluate(
    pipe,
    prompts: list[tuple[str, str]],
    methods: list | None = None,
    name: str = "baseline",
    seeds: int = 4,
    batch_prompts: int = 16,
    seed: int = 0,
    **call_kwargs,
) -> EvalResult:
    """Generates `seeds` images for every prompt with `methods` and verifies them.

    Prompts go through the pipeline `batch_prompts` at a time, each batch with its own generator seeded by
    `seed + batch index`, so a run is reproducible and the baseline and a method see the same initial noise
    streams.
    """
    methods = list(methods or [])
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    images, texts = [], []
    totals = {"nfe": 0, "denoiser_calls": 0, "reward_calls": 0}
    start = time.perf_counter()
    batches = range(0, len(prompts), batch_prompts)
    for b, first in enumerate(tqdm(batches, desc=f"eval {name}", disable=os.environ.get("TTALIGN_QUIET") == "1")):
        chunk = [p for p, _ in prompts[first : first + batch_prompts]]
        out = pipe(
            chunk,
            num_images_per_prompt=seeds,
            generator=torch.Generator().manual_seed(seed + b),
            output_type="pt",
            alignment=methods,
            **call_kwargs,
        )
        images.append(out.images.float().cpu())
        texts += [p for p in chunk for _ in range(seeds)]
        for key in totals:
            totals[key] += out.traces["compute"][key]
    wall = time.perf_counter() - start
    samples = torch.cat(images)
    verification = verify(samples, texts)
    from ttalign.shapes.clip import ShapesCLIPScore

    embedder = ShapesCLIPScore().embedder
    with torch.no_grad():
        soft = torch.cat(
            [ShapesSoftVerifier()(samples[i : i + 256], texts[i : i + 256]) for i in range(0, len(texts), 256)]
        )
        # shapes-CLIP image embeddings once, for CLIPScore (100 cos) and diversity: [N, D]
        embeds = torch.cat([embedder.image_embeds(samples[i : i + 256]) for i in range(0, len(texts), 256)])
        clip_scores = 100 * (embeds * embedder.text_embeds(texts)).sum(-1)
    accuracy = verification.category_accuracy
    intervals = {}
    for category in accuracy:
        hits = [v.passed for v in verification.verdicts if v.category == category]
        intervals[category] = wilson_interval(sum(hits), len(hits))
    intervals["overall"] = wilson_interval(sum(verification.passed), len(texts))  # equal categories: the pooled share
    return EvalResult(
        name=name,
        methods=[repr(m) for m in methods],
        category_accuracy=accuracy,
        overall=verification.overall,
        soft_reward=float(soft.mean()),
        clip_reward=float(clip_scores.mean()),
        intervals=intervals,
        diversity=diversity(embeds, verification, seeds),
        images=len(texts),
        wall_time_s=wall,
        nfe_per_image=totals["nfe"] / len(texts),
        denoiser_calls=totals["denoiser_calls"],
        reward_calls=totals["reward_calls"],
        peak_memory_mb=_peak_memory_mb(pipe.device),
        settings={"seeds": seeds, "batch_prompts": batch_prompts, "seed": seed, **call_kwargs},
        verification=verification,
        samples=samples,
        prompts=texts,
    )


def _percent(value: float, interval: tuple[float, float] | None) -> str:
    text = f"{100 * value:.1f}"
    return text if interval is None else f"{text} ({100 * interval[0]:.0f}-{100 * interval[1]:.0f})"


def markdown_table(results: list[EvalResult], baseline: list | None = None) -> str:
    """One row per result: verified success per category and overall (%, with the 95% Wilson interval), the soft
    verifier's and the shapes CLIP's mean reward, diversity (shapes-CLIP distance and position spread among a prompt's
    images), NFE, time and memory; with `baseline` (the `verdicts` of a run on the same prompts and seeds, as
    :meth:`EvalResult.summary` gives them), the paired comparison against it (won / lost, sign test p). Only the
    categories some result evaluated get a column."""
    categories = [c for c in CATEGORIES if any(c in r.category_accuracy for r in results)]
    head = ["run", *categories, "overall"]
    if baseline is not None:
        head.append("vs baseline: won / lost, p")
    head += [
        "soft reward",
        "CLIP reward",
        "diversity: CLIP distance / position spread",
        "NFE / image",
        "time (s)",
        "peak mem (MB)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.name] + [
            _percent(r.category_accuracy[c], r.intervals.get(c)) if c in r.category_accuracy else "-"
            for c in categories
        ]
        cells.append(f"**{_percent(r.overall, r.intervals.get('overall'))}**")
        if baseline is not None:
            p = paired(baseline, [[v.category, bool(v.passed)] for v in r.verification.verdicts])
            cells.append("-" if p["wins"] == p["losses"] == 0 else f"{p['wins']} / {p['losses']}, {p['p_value']:.2g}")
        cells += [
            f"{r.soft_reward:.3f}",
            f"{r.clip_reward:.1f}",
            f"{r.diversity['clip_distance']:.3f} / {r.diversity['position_spread']:.1f}",
            f"{r.nfe_per_image:.0f}",
            f"{r.wall_time_s:.0f}",
            f"{r.peak_memory_mb:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def example_grid(result: EvalResult, per_category: int = 6, scale: int = 4):
    """A PNG-ready PIL image: one row per category, each sample framed green (passed) or red (failed)."""
    from PIL import Image, ImageDraw

    size = result.samples.shape[-1] * scale
    cell, label = size + 8, 150
    rows = [c for c in CATEGORIES if any(v.category == c for v in result.verification.verdicts)]
    canvas = Image.new("RGB", (label + per_category * cell, len(rows) * (cell + 12)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, category in enumerate(rows):
        top = row * (cell + 12)
        draw.text((4, top + cell // 2), category, fill="black")
        picks = [i for i, v in enumerate(result.verification.verdicts) if v.category == category][::4][:per_category]
        for col, i in enumerate(picks):
            array = (result.samples[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((size, size), Image.NEAREST)
            x = label + col * cell
            passed = result.verification.verdicts[i].passed
            draw.rectangle([x, top, x + size + 7, top + size + 7], fill=(40, 170, 60) if passed else (210, 40, 40))
            canvas.paste(tile, (x + 4, top + 4))
            draw.text((x, top + cell), result.prompts[i][:22], fill="black")
    return canvas
