"""The attention-control table: each run of the `attention` suite against the baseline, image by image.

Reads `benchmarks/results/shapes_<prefix>_*.json` (same prompts and seeds in every run) and writes
`shapes_<prefix>.md` and `.json`: verified success per category, the change over the baseline, the images each run
turns from failed to passed and back, and the two-sided sign-test p-value on those discordant images; for position
captions, where each run drew the objects against their layout.

    python benchmarks/attention_table.py                    # the runs of the attention suite
    python benchmarks/attention_table.py --prefix confirm   # the runs of the region_confirm suite
    python benchmarks/attention_table.py --prefix flow_attention   # the flow model's, the attention_flow suite
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, write_results  # noqa: E402

from ttalign.shapes.evaluate import sign_test  # noqa: E402


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def compare(base: dict, run: dict, category: str | None = None) -> dict:
    """Paired comparison of two runs over the images of `category` (all images when `None`)."""
    if [c for c, _ in base["verdicts"]] != [c for c, _ in run["verdicts"]]:
        raise ValueError(f"runs {base['name']!r} and {run['name']!r} were not made on the same prompts")
    pairs = [(b, r) for (c, b), (_, r) in zip(base["verdicts"], run["verdicts"]) if category in (None, c)]
    wins = sum(r and not b for b, r in pairs)
    losses = sum(b and not r for b, r in pairs)
    return {"images": len(pairs), "wins": wins, "losses": losses, "p_value": sign_test(wins, losses)}


def placement(base: dict, run: dict) -> dict:
    """Where position captions' objects were drawn (each phrase against the half of the image its relation names):
    the share of phrases whose object was drawn, the share of drawn objects inside their half, and, paired over the
    objects both runs drew, those the run moved into their half and out of it, with the sign test."""
    flat = {name: [p for image in data["placements"] for p in image] for name, data in (("base", base), ("run", run))}
    drawn = [p for p in flat["run"] if p is not None]
    both = [(b, r) for b, r in zip(flat["base"], flat["run"]) if b is not None and r is not None]
    moved_in, moved_out = sum(r and not b for b, r in both), sum(b and not r for b, r in both)
    return {
        "phrases": len(flat["run"]),
        "drawn": len(drawn) / max(len(flat["run"]), 1),
        "in_region": sum(drawn) / max(len(drawn), 1),
        "moved_in": moved_in,
        "moved_out": moved_out,
        "p_value": sign_test(moved_in, moved_out),
    }


#: The suite (`benchmarks/run.py SUITE`) whose runs each prefix names.
SUITES = {"attention": "attention", "confirm": "region_confirm", "flow_attention": "attention_flow"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default="attention", choices=sorted(SUITES), help="which set of runs")
    prefix = parser.parse_args().prefix
    runs = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, f"shapes_{prefix}_*.json"))):
        with open(path) as f:
            data = json.load(f)
        data["name"] = os.path.basename(path)[len("shapes_") : -len(".json")]  # the flow model's carry "flow_"
        runs[data["name"]] = data
    if f"{prefix}_baseline" not in runs:
        raise SystemExit(f"no shapes_{prefix}_baseline.json: run `python benchmarks/run.py {SUITES[prefix]}` first")
    base = runs.pop(f"{prefix}_baseline")
    categories = list(base["category_accuracy"])
    seeds = base["settings"]["seeds"]
    prompts_each = base["images"] // (len(categories) * seeds)
    head = ["run", *categories, "mean", "fail -> pass", "pass -> fail", "sign test p"]
    if "position" in categories:  # the category region re-weighting addresses, tested on its own
        head.append("position only: fail -> pass / pass -> fail, p")
    head += ["NFE / image", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    place_head = [
        "run",
        "objects drawn (%)",
        "drawn objects in their half (%)",
        "moved in",
        "moved out",
        "sign test p",
    ]
    place_lines = ["| " + " | ".join(place_head) + " |", "|" + "---|" * len(place_head)]
    for run in [base, *runs.values()]:
        paired = compare(base, run)
        placed = placement(base, run)
        cells = [
            run["name"].removeprefix(f"{prefix}_"),
            f"{100 * placed['drawn']:.1f}",
            f"{100 * placed['in_region']:.1f}",
        ]
        cells += (
            ["", "", "-"]
            if run is base
            else [str(placed["moved_in"]), str(placed["moved_out"]), _p(placed["p_value"])]
        )
        place_lines.append("| " + " | ".join(cells) + " |")
        per_category = {c: compare(base, run, c) for c in categories}
        cells = [run["name"].removeprefix(f"{prefix}_")]
        for c in categories:
            acc, delta = (
                100 * run["category_accuracy"][c],
                100 * (run["category_accuracy"][c] - base["category_accuracy"][c]),
            )
            cells.append(f"{acc:.1f}" if run is base else f"{acc:.1f} ({delta:+.1f})")
        mean, base_mean = 100 * run["overall"], 100 * base["overall"]
        cells.append(f"{mean:.1f}" if run is base else f"{mean:.1f} ({mean - base_mean:+.1f})")
        cells += [str(paired["wins"]), str(paired["losses"]), _p(paired["p_value"]) if run is not base else "-"]
        if "position" in categories:
            pos = per_category["position"]
            cells.append("-" if run is base else f"{pos['wins']} / {pos['losses']}, {_p(pos['p_value'])}")
        cells += [f"{run['nfe_per_image']:.0f}", f"{run['wall_time_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(
            {
                "name": run["name"],
                "category_accuracy": run["category_accuracy"],
                "overall": run["overall"],
                "paired": paired,
                "paired_per_category": per_category,
                "placement": placed,
                "command": run["command"],
                "nfe_per_image": run["nfe_per_image"],
                "wall_time_s": run["wall_time_s"],
            }
        )
    flow = prefix.startswith("flow_")
    settings = base["settings"]
    sampling = f"{settings.get('num_inference_steps', 25)} {'flow-matching Euler' if flow else 'DDIM'} steps"
    title = "Shapes world (flow model)" if flow else "Shapes world"
    markdown = (
        f"# {title}: attention control\n\n`python benchmarks/run.py {SUITES[prefix]}`\n\n"
        f"{base['images']} images per run ({len(categories)} categor{'y' if len(categories) == 1 else 'ies'} x "
        f"{prompts_each} prompts x {seeds} seeds, "
        f"the same for every run), {sampling}, guidance {settings.get('guidance_scale', 3.0)}. "
        "Verified success (%), in brackets the change over the "
        "baseline; mean = mean over the categories. Paired on the same prompt and seed: images a run turns from "
        "failed to passed and back, and the two-sided exact sign test on them (over all the run's images, and over "
        "the position captions alone).\n\n" + "\n".join(lines) + "\n\n"
        "Position captions, object by object (`ttalign.shapes.verifier.placement`): the share of phrases whose object "
        "was drawn, the share of drawn objects whose centre lies in the half of the image the relation gives them "
        "(the layout region re-weighting is given), and, over the objects drawn in both runs, those moved into "
        "their half and out of it, with the sign test.\n\n" + "\n".join(place_lines) + "\n"
    )
    write_results(f"shapes_{prefix}", {"benchmark": "attention_table", "runs": rows}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
