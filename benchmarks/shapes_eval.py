"""Evaluates a shapes-world model, plain or with alignment methods, on the fixed evaluation set.

Writes per-category verified success, mean soft reward, wall time, denoiser calls (NFE) and peak memory to
`benchmarks/results/shapes_<name>.json` and `.md` (`shapes_flow_<name>` for the flow model), and a grid of examples
with the verifier's verdicts to the same name `.png`. Sampling settings default to the model's
(:func:`ttalign.shapes.sampling_defaults`).

    python benchmarks/shapes_eval.py --name baseline
    python benchmarks/shapes_eval.py --name best_of_4 --align best_of_n:n=4,reward=shapes_soft
    python benchmarks/shapes_eval.py --model flow --name baseline
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, environment, save_image, write_results  # noqa: E402

from ttalign.methods import method_from_spec  # noqa: E402
from ttalign.shapes import evaluation_prompts, load_pipeline, sampling_defaults  # noqa: E402
from ttalign.shapes.evaluate import evaluate, example_grid, markdown_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="baseline")
    parser.add_argument("--align", action="append", default=[], metavar="NAME[:key=value,...]")
    parser.add_argument("--per-category", type=int, default=40, help="prompts per category (6 categories)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's guidance")
    parser.add_argument("--model", default="sd", help="'sd' or 'flow' (the embedded models), or a model folder")
    parser.add_argument("--categories", default=None, help="comma-separated categories (default: all six)")
    parser.add_argument("--prompt-seed", type=int, default=1234, help="another seed draws another prompt set")
    parser.add_argument("--baseline", default=None, help="a run's name (same prompts and seeds): the paired sign test")
    args = parser.parse_args()
    torch.set_num_threads(2)

    methods = [method_from_spec(spec) for spec in args.align]
    embedded = args.model in ("sd", "flow")
    pipe = load_pipeline(args.model if embedded else "sd", path=None if embedded else args.model)
    pipe.set_progress_bar_config(disable=True)
    settings = sampling_defaults(pipe)
    if args.steps is not None:
        settings["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        settings["guidance_scale"] = args.guidance_scale
    flow = "max_sequence_length" in settings
    name = f"shapes_flow_{args.name}" if flow else f"shapes_{args.name}"
    prompts = evaluation_prompts(args.per_category, seed=args.prompt_seed)
    if args.categories:
        wanted = args.categories.split(",")
        unknown = sorted(set(wanted) - {c for _, c in prompts})
        if unknown:
            parser.error(f"unknown categories {unknown}; expected some of {sorted({c for _, c in prompts})}")
        prompts = [(p, c) for p, c in prompts if c in wanted]
    baseline = None
    if args.baseline:
        path = os.path.join(RESULTS, f"{'shapes_flow_' if flow else 'shapes_'}{args.baseline}.json")
        if not os.path.isfile(path):
            parser.error(f"no baseline run at {path}")
        with open(path) as f:
            baseline = json.load(f)["verdicts"]
    result = evaluate(pipe, prompts, methods, name=args.name, seeds=args.seeds, **settings)
    command = "python benchmarks/shapes_eval.py " + " ".join(sys.argv[1:])
    data = {"benchmark": "shapes_eval", "command": command, **result.summary(), "environment": environment()}
    sampler = "flow-matching Euler" if flow else "DDIM"
    markdown = (
        f"# Shapes world{' (flow model)' if flow else ''}: {args.name}\n\n`{command}`\n\n"
        f"{len(prompts)} prompts x {args.seeds} images, {settings['num_inference_steps']} {sampler} steps, "
        f"guidance {settings['guidance_scale']}, "
        f"{environment()['device']}. Verified success (%) per GenEval-style category; overall = mean over "
        "categories, with 95% Wilson intervals"
        + (f"; paired with the run `{args.baseline}` image by image" if baseline else "")
        + ".\n\n"
        + markdown_table([result], baseline=baseline)
    )
    write_results(name, data, markdown)
    save_image(example_grid(result), os.path.join(RESULTS, f"{name}.png"))
    print(markdown)


if __name__ == "__main__":
    main()
