"""The shapes-world evaluation harness: verified success per category, reward, compute and memory of a method list.

Used by `benchmarks/shapes_eval.py`; every method reports through it.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ttalign.shapes.soft import ShapesSoftVerifier
from ttalign.shapes.verifier import Verification, placement, verify
from ttalign.shapes.world import CATEGORIES


@dataclasses.dataclass
class EvalResult:
    """What one evaluation run measured."""

    name: str
    methods: list[str]
    category_accuracy: dict[str, float]
    overall: float
    soft_reward: float
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
        """The measured figures, JSON-ready, with every image's category and verdict (in generation order, so runs
        with the same prompts and seeds can be compared image by image) and, for position captions, where each
        phrase's object was drawn (:func:`~ttalign.shapes.verifier.placement`; `[]` for other captions)."""
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
    with torch.no_grad():
        soft = torch.cat(
            [ShapesSoftVerifier()(samples[i : i + 256], texts[i : i + 256]) for i in range(0, len(texts), 256)]
        )
    accuracy = verification.category_accuracy
    return EvalResult(
        name=name,
        methods=[repr(m) for m in methods],
        category_accuracy=accuracy,
        overall=verification.overall,
        soft_reward=float(soft.mean()),
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


def markdown_table(results: list[EvalResult]) -> str:
    """One row per result: verified success per category (%), overall, soft reward, NFE, time and memory. Only the
    categories some result evaluated get a column."""
    categories = [c for c in CATEGORIES if any(c in r.category_accuracy for r in results)]
    head = ["run", *categories, "overall", "soft reward", "NFE / image", "time (s)", "peak mem (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.name] + [f"{100 * r.category_accuracy.get(c, float('nan')):.1f}" for c in categories]
        cells += [f"{100 * r.overall:.1f}", f"{r.soft_reward:.3f}", f"{r.nfe_per_image:.0f}"]
        cells += [f"{r.wall_time_s:.0f}", f"{r.peak_memory_mb:.0f}"]
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
