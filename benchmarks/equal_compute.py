"""Verified success against compute (NFE per image) for the method runs of the `methods` suite.

Reads `benchmarks/results/shapes_methods_*.json` (written by `shapes_eval.py`), groups them into series by method,
and writes `shapes_equal_compute.md` (a table per category), `.json` and `.png` (overall verified success against
NFE per image, one line per method). With `--model flow`, the runs of the `methods_flow` suite
(`shapes_flow_methods_*` -> `shapes_flow_equal_compute`); with `--set headline`, the whole-set runs of
the `headline` suite (`shapes_headline_*` -> `shapes_headline`), whose names end in the optimized reward.

    python benchmarks/equal_compute.py
    python benchmarks/equal_compute.py --model flow
    python benchmarks/equal_compute.py --set headline
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, save_image, write_results  # noqa: E402

from ttalign.shapes.evaluate import paired  # noqa: E402

SERIES = {  # run-name prefix -> series label
    "baseline": "baseline",
    "best_of": "best-of-N",
    "particle_steering": "particle steering (FK)",
    "noise_optimization": "noise optimization",
    "seed_search": "seed search",
    "reward_guidance": "reward guidance",
    "attend_and_excite": "Attend-and-Excite",
    "region_reweight": "region re-weighting (layout from the prompt)",
}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
CATEGORIES = ("single_object", "colors", "counting", "two_objects", "position", "color_attribution")


def load_runs(prefix: str = "shapes_methods_") -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(RESULTS, f"{prefix}*.json"))):
        with open(path) as f:
            data = json.load(f)
        key = os.path.basename(path)[len(prefix) : -len(".json")]
        series = next((label for prefix, label in SERIES.items() if key.startswith(prefix)), key)
        reward = next((f"shapes_{r}" for r in ("soft", "clip") if key.endswith(f"_{r}")), None)
        runs.append({"run": key, "series": series + (f" [{reward}]" if reward else ""), "method": series, **data})
    return runs


def plot(runs: list[dict], path: str, width: int = 720, height: int = 440) -> None:
    """A line chart with PIL: overall verified success (%) against NFE per image, one line per series."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 200, 20, height - 50
    max_nfe = max(r["nfe_per_image"] for r in runs) * 1.05
    lo = min(r["overall"] for r in runs) * 100 - 5
    hi = max(r["overall"] for r in runs) * 100 + 5

    def xy(nfe, overall):
        return (left + (right - left) * nfe / max_nfe, bottom - (bottom - top) * (overall * 100 - lo) / (hi - lo))

    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for k in range(6):
        value = lo + (hi - lo) * k / 5
        y = bottom - (bottom - top) * k / 5
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((8, y - 6), f"{value:.0f}%", fill="black")
        nfe = max_nfe * k / 5
        x = left + (right - left) * k / 5
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - 10, bottom + 8), f"{nfe:.0f}", fill="black")
    draw.text(((left + right) // 2 - 60, height - 22), "NFE per image", fill="black")
    baseline = next((r for r in runs if r["series"] == "baseline"), None)
    labels = [s for s in dict.fromkeys(r["series"] for r in runs)]
    for i, label in enumerate(labels):
        color = COLORS[i % len(COLORS)]
        points = sorted((r for r in runs if r["series"] == label), key=lambda r: r["nfe_per_image"])
        if baseline is not None and points[0]["method"] in ("best-of-N", "particle steering (FK)"):
            points = [baseline] + points  # N = 1 is the plain model
        coords = [xy(r["nfe_per_image"], r["overall"]) for r in points]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for x, y in coords:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        draw.rectangle([right + 20, top + 20 * i + 4, right + 32, top + 20 * i + 16], fill=color)
        draw.text((right + 38, top + 20 * i + 4), label, fill="black")
    save_image(image, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd", "flow"), default="sd")
    parser.add_argument("--set", choices=("methods", "headline"), default="methods")
    args = parser.parse_args()
    flow = args.model == "flow"
    headline = args.set == "headline"
    if headline and flow:
        parser.error("--set headline is a run of the SD shapes model (the headline suite)")
    stem, suite = ("shapes_flow_", "methods_flow") if flow else ("shapes_", "methods")
    if headline:
        suite = "headline"
    runs = load_runs(f"{stem}{args.set}_")
    if not runs:
        raise SystemExit(f"No {stem}{args.set}_*.json results: run `python benchmarks/run.py {suite}` first.")
    header = (
        "| run | NFE / image | " + " | ".join(CATEGORIES) + " | overall (95% interval) | vs baseline: "
        "fail->pass / pass->fail, sign test p | soft reward | CLIP reward | diversity: CLIP distance / "
        "position spread | wall / image (s) |"
    )
    lines = [header, "|" + "---|" * (len(CATEGORIES) + 8)]
    base = next((r for r in runs if r["series"] == "baseline"), None)
    order = list(SERIES.values())
    for r in sorted(
        runs,
        key=lambda r: (
            order.index(r["method"]) if r["method"] in order else len(order),
            r["series"],
            r["nfe_per_image"],
        ),
    ):
        cats = " | ".join(f"{100 * r['category_accuracy'][c]:.1f}" for c in CATEGORIES)
        vs = "-"
        if base is not None and r is not base and "verdicts" in base and "verdicts" in r:  # paired image by image
            r["paired"] = paired(base["verdicts"], r["verdicts"])
            wins, losses = r["paired"]["wins"], r["paired"]["losses"]
            vs = f"{wins} / {losses}, {r['paired']['p_value']:.3g}"
        low, high = r.get("intervals", {}).get("overall", (None, None))
        interval = f" ({100 * low:.0f}-{100 * high:.0f})" if low is not None else ""
        div = r.get("diversity")
        spread = f"{div['clip_distance']:.3f} / {div['position_spread']:.1f}" if div else "-"
        clip = f"{r['clip_reward']:.1f}" if "clip_reward" in r else "-"
        wall = r["wall_time_s"] / r["images"]
        lines.append(
            f"| {r['run']} | {r['nfe_per_image']:.0f} | {cats} | **{100 * r['overall']:.1f}**{interval} | "
            f"{vs} | {r['soft_reward']:.3f} | {clip} | {spread} | {wall:.2f} |"
        )
    name = f"{stem}headline" if headline else f"{stem}equal_compute"
    plot(runs, os.path.join(RESULTS, f"{name}.png"))
    first = runs[0]
    sampling = "20 flow-matching Euler steps" if flow else "25 DDIM steps"
    title = "the whole evaluation set, both rewards" if headline else "methods at equal compute"
    option = " --set headline" if headline else " --model flow" if flow else ""
    reward = (
        "the run name's reward optimized (soft: the verifier's differentiable copy; clip: the learned shapes "
        "CLIP, not the judge)"
        if headline
        else "soft verifier as the reward"
    )
    markdown = (
        f"# Shapes world{' (flow model)' if flow else ''}: {title}\n\n`python benchmarks/run.py {suite}` "
        f"(its last step: `python benchmarks/equal_compute.py{option}`)\n\n"
        f"{first['images']} images per run ({first['command'].split('--per-category ')[-1].split()[0]} prompts per "
        f"category, see each run's command in its JSON), {sampling}, guidance 3.0, {reward}. "
        "NFE counts denoiser forward passes per returned image (a CFG pair counts once; backward passes of the "
        "gradient methods are not counted, their cost shows in the wall time). Each run is paired with the baseline "
        "image by image (the same prompts, seeds and noise streams): the images it turns from failed to passed and "
        "back, and the two-sided exact sign test. Intervals are 95% Wilson intervals on the pooled images; diversity "
        "is the mean pairwise shapes-CLIP distance and the spread of object positions (pixels) among a prompt's "
        "images (`-` where the run predates it).\n\n" + "\n".join(lines) + "\n\n"
        f"![verified success against NFE]({name}.png)\n"
    )
    data = {
        "benchmark": "equal_compute",
        "runs": [
            {
                k: r[k]
                for k in (
                    "run",
                    "series",
                    "nfe_per_image",
                    "overall",
                    "category_accuracy",
                    "soft_reward",
                    "wall_time_s",
                    "command",
                )
            }
            | {"paired": r.get("paired")}
            for r in runs
        ],
    }
    write_results(name, data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
