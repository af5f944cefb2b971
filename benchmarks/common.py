"""Helpers shared by the benchmark scripts: environment facts and writing results as JSON and Markdown."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

#: Every suite's results live in a folder of their own below this one (`benchmarks/run.py SUITE`).
RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: Where this run writes (and reads the runs it builds on): the suite's folder, which `benchmarks/run.py` sets; a
#: script run on its own writes to `results/unsorted/`.
RESULTS = os.environ.get("TTALIGN_RESULTS") or os.path.join(RESULTS_ROOT, "unsorted")


def suite_results(suite: str) -> str:
    """The results folder of another suite (for a run that reads what that suite wrote)."""
    return os.path.join(RESULTS_ROOT, suite)


CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


def shapes_candidates(model: str, per_category: int, seeds: int, k: int) -> dict:
    """`k` candidates for each of `seeds` groups of every evaluation prompt (`per_category` per category), sampled
    by the embedded shapes `model` at its own settings and judged by the exact verifier: `samples` `[N, 3, H, W]`
    uint8 (as a saved image holds them), `prompts`, `passed` `[N]`, `categories` (one per group of `k` consecutive
    candidates), `sample_s` and the `sampling` settings. Deterministic, so kept in `benchmarks/.cache/` for the next
    script that asks for the same set (delete it after retraining a model)."""
    from ttalign.shapes import evaluation_prompts, load_pipeline, sampling_defaults
    from ttalign.shapes.evaluate import evaluate

    path = os.path.join(CACHE, f"candidates_{model}_{per_category}x{seeds}x{k}.pt")
    lock = path + ".lock"  # another script is sampling this set: wait for it rather than sample it twice
    if not os.path.isfile(path) and os.path.isfile(lock):
        print(f"waiting for {path}: another process is sampling it (remove {lock} if it is gone)", flush=True)
    while not os.path.isfile(path) and os.path.isfile(lock) and time.time() - os.path.getmtime(lock) < 4 * 3600:
        time.sleep(30)
    if os.path.isfile(path):
        print(f"candidates from {path}")
        return torch.load(path, weights_only=True)
    os.makedirs(CACHE, exist_ok=True)
    with open(lock, "w") as f:
        f.write(str(os.getpid()))
    try:  # a failed run leaves no lock behind for the next script to wait on
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        settings = sampling_defaults(pipe)
        start = time.perf_counter()
        prompts = evaluation_prompts(per_category)
        run = evaluate(pipe, prompts, [], "candidates", seeds=seeds * k, batch_prompts=4, **settings)
        data = {
            "samples": (run.samples.clamp(0, 1) * 255).round().to(torch.uint8),
            "prompts": list(run.prompts),
            "passed": torch.tensor(run.verification.passed, dtype=torch.bool),
            "categories": [v.category for v in run.verification.verdicts][::k],
            "sample_s": time.perf_counter() - start,
            "sampling": settings,
        }
        torch.save(data, path + ".tmp")
        os.replace(path + ".tmp", path)
    finally:
        os.remove(lock)
    return data


def environment() -> dict:
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def write_results(name: str, data: dict, markdown: str) -> None:
    """Writes `<name>.json` and `<name>.md` to the run's results folder (:data:`RESULTS`), each atomically."""
    os.makedirs(RESULTS, exist_ok=True)
    for ext, text in (("json", json.dumps(data, indent=2) + "\n"), ("md", markdown)):
        path = os.path.join(RESULTS, f"{name}.{ext}")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")


def recorded_trained_by(folder: str) -> str:
    """The `trained_by` of the record beside the LoRA in `folder` (`training.json`; empty when there is none)."""
    try:
        with open(os.path.join(folder, "training.json")) as f:
            return str(json.load(f).get("trained_by", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def save_image(image, path: str) -> None:
    """Writes a PIL image to `path` as a PNG, atomically, creating its folder (a script run on its own writes to
    `results/unsorted/`, which may not exist yet)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def run_sides(script: str, sides: tuple[str, ...], argv: list[str]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Runs `script --one SIDE PATH *argv` for each side, each in a fresh process (so that each one's peak memory is
    its own). Returns the JSON row each printed last, and the array each saved to PATH.

    Without CUDA each side runs twice: once as users run it, for its time, images and everything else in its row, and
    once with glibc's mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`) for its `peak_added_mb`: there every
    block freed above 64 KiB goes back to the system at once, so the peak resident size follows the live tensors. With
    glibc's default (a threshold that rises to 32 MiB as large blocks are freed) the heap keeps freed tensors and its
    fragmentation, not the tensors, sets the peak; with the fixed threshold every large allocation maps fresh pages,
    which slows a call, so its time is not the one quoted."""
    memory_env = None if torch.cuda.is_available() else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows, arrays = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            path = os.path.join(tmp, f"{side}.npy")
            cmd = [sys.executable, script, "--one", side, path, *argv]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            arrays[side] = np.load(path)
            if memory_env is not None:
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=memory_env).stdout
                row["peak_added_mb_heap"] = row["peak_added_mb"]  # the default allocator's, for the record
                row["peak_added_mb"] = json.loads(out.strip().splitlines()[-1])["peak_added_mb"]
            rows.append(row)
            print(row, flush=True)
    return rows, arrays


# region re-weighting with each position caption's layout, as a method spec (`method_from_spec`, `--align`)
REGIONS = "region_reweight:regions=@ttalign.shapes.world:layout_regions"

PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
    (120, 60, 160),
]


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    path: str,
    xlabel: str,
    ylabel: str,
    width: int = 800,
    height: int = 440,
) -> None:
    """A line chart with PIL, one line per series of `(x, y)` points, axes from the data's range; saved to `path`."""
    from PIL import Image, ImageDraw

    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("line_chart needs at least one point.")
    x_lo, x_hi = min(x for x, _ in points), max(x for x, _ in points)
    y_lo, y_hi = min(y for _, y in points), max(y for _, y in points)
    x_hi, y_hi = max(x_hi, x_lo + 1e-9), max(y_hi, y_lo + 1e-9)
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 280, 20, height - 50

    def xy(x, y):
        return left + (right - left) * (x - x_lo) / (x_hi - x_lo), bottom - (bottom - top) * (y - y_lo) / (y_hi - y_lo)

    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for k in range(6):
        y = bottom - (bottom - top) * k / 5
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((4, y - 6), f"{y_lo + (y_hi - y_lo) * k / 5:.3g}", fill="black")
        x = left + (right - left) * k / 5
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - 10, bottom + 8), f"{x_lo + (x_hi - x_lo) * k / 5:.3g}", fill="black")
    draw.text(((left + right) // 2 - 40, height - 22), xlabel, fill="black")
    draw.text((left + 6, 2), ylabel, fill="black")

    def marker(x, y, shape, color, r=3):  # past the palette's length, series differ by marker: o, square, triangle
        box = [x - r, y - r, x + r, y + r]
        if shape == 0:
            draw.ellipse(box, fill=color)
        elif shape == 1:
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=color)

    for i, (label, values) in enumerate(series.items()):
        color, shape = PALETTE[i % len(PALETTE)], (i // len(PALETTE)) % 3
        coords = [xy(x, y) for x, y in sorted(values)]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        if len(coords) <= 40:
            for x, y in coords:
                marker(x, y, shape, color)
        marker(right + 26, top + 20 * i + 10, shape, color, r=5)
        draw.text((right + 38, top + 20 * i + 4), label, fill="black")
    save_image(image, path)
