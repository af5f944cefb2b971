"""Chooses the strength of a tuned shapes LoRA away from the evaluation set: verified success of the model with the
LoRA fused at each of `--scales` (multiples of the update in its file; the base model as scale 0) on a selection set
of its own, with the LoRA at the best scale written to `--out` (its up projections multiplied, as `rescale_lora.py`
does, and a `training.json` whose `trained_by` adds this command to the source's) for `tuned_eval.py` to judge on the
evaluation set.

The selection set: `--per-category` captions of each category drawn from their own seeded stream, none of them in the
evaluation set where the category has captions outside it (single objects and colours have few captions, all of them
in the evaluation set: those repeat them), each image from noise the evaluation does not use (`--noise-seed`).

    python benchmarks/lora_scale.py --model flow --lora ttalign/shapes/tuned/flow --scales 0.5,1,1.25,1.5,1.75,2 \\
        --out benchmarks/.cache/scaled/flow --name lora_scale_flow
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, recorded_trained_by, write_results  # noqa: E402
from rescale_lora import refuse_rescaled, rescale  # noqa: E402

from ttalign.shapes import CATEGORIES, evaluation_prompts, load_pipeline, sample_scene, sampling_defaults  # noqa: E402
from ttalign.shapes.evaluate import evaluate, paired  # noqa: E402
from ttalign.shapes.models import fuse_lora  # noqa: E402
from ttalign.training.trainer import LORA_WEIGHTS  # noqa: E402

#: Draws per category when looking for captions outside the evaluation set.
DRAWS = 2000


def selection_prompts(per_category: int, seed: int, exclude: set[str]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """`per_category` `(caption, category)` pairs of each category from the stream seeded `seed`, captions outside
    `exclude` first; a category with fewer than that outside it (within :data:`DRAWS` draws) is filled with its
    captions in `exclude`. Returns the prompts and, per category, how many of them lie outside `exclude`."""
    rng = np.random.default_rng(seed)
    prompts, outside = [], {}
    for category in CATEGORIES:
        drawn = [sample_scene(rng, category)[1] for _ in range(DRAWS)]
        chosen = [c for c in drawn if c not in exclude][:per_category]
        outside[category] = len(chosen)
        chosen += [c for c in drawn if c in exclude][: per_category - len(chosen)]
        prompts += [(caption, category) for caption in chosen]
    return prompts, outside


def best_scale(overall: dict[float, float]) -> float:
    """The scale with the highest success; of equal ones, the one nearest the file's own (1)."""
    return max(overall, key=lambda s: (overall[s], -abs(s - 1.0)))


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"--scales must be numbers separated by commas, got {text!r}") from None
    bad = [s for s in scales if not s > 0]
    if bad or len(set(scales)) != len(scales):
        raise SystemExit(f"--scales must be distinct and > 0, got {text!r}")
    return scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd", "flow"), required=True)
    parser.add_argument("--lora", required=True, help=f"a folder holding {LORA_WEIGHTS}")
    parser.add_argument("--scales", required=True, help="comma-separated multiples of the file's update, e.g. 0.5,1,2")
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--caption-seed", type=int, default=4321, help="the selection captions' stream")
    parser.add_argument("--noise-seed", type=int, default=1000, help="the first noise seed (the evaluation's is 0)")
    parser.add_argument("--out", default=None, help="write the LoRA at the best scale to this folder")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.lora, LORA_WEIGHTS)):
        raise SystemExit(f"--lora {args.lora!r} holds no {LORA_WEIGHTS}")
    refuse_rescaled(args.lora)
    scales = parse_scales(args.scales)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    os.environ.setdefault("TTALIGN_QUIET", "1")
    held_out = {p for per in (20, 40) for p, _ in evaluation_prompts(per)}
    prompts, outside = selection_prompts(args.per_category, args.caption_seed, held_out)

    summaries = {}
    for scale in tqdm([0.0, *scales], desc="scales"):
        pipe = load_pipeline(args.model)
        pipe.set_progress_bar_config(disable=True)
        if scale:
            fuse_lora(pipe, args.lora, scale=scale)
        defaults = sampling_defaults(pipe)
        summaries[scale] = evaluate(
            pipe, prompts, [], name=f"scale {scale:g}", seeds=args.seeds, seed=args.noise_seed, **defaults
        ).summary()
    chosen = best_scale({s: summaries[s]["overall"] for s in scales})
    reference = summaries[1.0] if 1.0 in summaries else summaries[0.0]

    rows = []
    for scale, summary in summaries.items():
        test = paired(reference["verdicts"], summary["verdicts"])
        label = "base model" if scale == 0 else f"x{scale:g}" + (" (chosen)" if scale == chosen else "")
        rows.append(
            f"| {label} | "
            + " | ".join(f"{100 * summary['category_accuracy'][c]:.1f}" for c in CATEGORIES)
            + f" | **{100 * summary['overall']:.1f}** | {test['wins']} / {test['losses']}, {test['p_value']:.2g} |"
        )
    command = shlex.join(["python", "benchmarks/lora_scale.py", *sys.argv[1:]])
    against = "the file's own scale (x1)" if 1.0 in summaries else "the base model"
    markdown = (
        f"# The {args.model} shapes LoRA at other strengths, on a selection set\n\n`{command}`\n\n"
        f"Selection set: {len(prompts)} captions x {args.seeds} seeds ({len(prompts) * args.seeds} images a row), "
        f"noise seeds from {args.noise_seed}, 1x NFE, the exact verifier; captions outside the evaluation set per "
        f"category: {', '.join(f'{c} {outside[c]}' for c in CATEGORIES)} (the rest repeat evaluation captions with "
        f"other noise). Scales multiply the update in `{args.lora}`.\n\n"
        "| scale | " + " | ".join(CATEGORIES) + f" | overall | vs {against}: fail->pass / pass->fail, p |\n"
        "|" + "---|" * (len(CATEGORIES) + 3) + "\n" + "\n".join(rows) + f"\n\nChosen: x{chosen:g}.\n"
    )
    name = args.name or f"lora_scale_{args.model}"
    write_results(
        name,
        {
            "benchmark": "lora_scale",
            "command": command,
            "lora": args.lora,
            "chosen": chosen,
            "captions_outside_evaluation": outside,
            "runs": {f"{s:g}": {k: v for k, v in summaries[s].items() if k != "verdicts"} for s in summaries},
            "environment": environment(),
        },
        markdown,
    )
    if args.out:
        rescale(args.lora, chosen, args.out)
        source = recorded_trained_by(args.lora) or f"the LoRA in {args.lora}"
        record = os.path.join(args.out, "training.json")
        with open(record + ".tmp", "w") as f:
            json.dump({"trained_by": f"{source}, rescaled x{chosen:g} by {command}"}, f, indent=1)
        os.replace(record + ".tmp", record)
    print(markdown)


if __name__ == "__main__":
    main()
