"""Evaluates the shapes-world model, plain or with alignment methods, on the fixed evaluation set.

Writes per-category verified success, mean soft reward, wall time, denoiser calls (NFE) and peak memory to
`benchmarks/results/shapes_<name>.json` and `.md`, and a grid of examples with the verifier's verdicts to
`shapes_<name>.png`.

    python benchmarks/shapes_eval.py --name baseline
    python benchmarks/shapes_eval.py --name best_of_4 --align best_of_n:n=4,reward=shapes_soft
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, environment, write_results  # noqa: E402

from ttalign.methods import method_from_spec  # noqa: E402
from ttalign.shapes import SAMPLING_DEFAULTS, evaluation_prompts, load_pipeline  # noqa: E402
from ttalign.shapes.evaluate import evaluate, example_grid, markdown_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="baseline")
    parser.add_argument("--align", action="append", default=[], metavar="NAME[:key=value,...]")
    parser.add_argument("--per-category", type=int, default=40, help="prompts per category (6 categories)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=SAMPLING_DEFAULTS["num_inference_steps"])
    parser.add_argument("--guidance-scale", type=float, default=SAMPLING_DEFAULTS["guidance_scale"])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded shapes model)")
    parser.add_argument("--categories", default=None, help="comma-separated categories (default: all six)")
    parser.add_argument("--prompt-seed", type=int, default=1234, help="another seed draws another prompt set")
    args = parser.parse_args()
    torch.set_num_threads(2)

    methods = [method_from_spec(spec) for spec in args.align]
    pipe = load_pipeline(path=args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = evaluation_prompts(args.per_category, seed=args.prompt_seed)
    if args.categories:
        wanted = args.categories.split(",")
        unknown = sorted(set(wanted) - {c for _, c in prompts})
        if unknown:
            parser.error(f"unknown categories {unknown}; expected some of {sorted({c for _, c in prompts})}")
        prompts = [(p, c) for p, c in prompts if c in wanted]
    result = evaluate(pipe, prompts, methods, name=args.name, seeds=args.seeds,
                      num_inference_steps=args.steps, guidance_scale=args.guidance_scale)  # fmt: skip
    command = "python benchmarks/shapes_eval.py " + " ".join(sys.argv[1:])
    data = {"benchmark": "shapes_eval", "command": command, **result.summary(), "environment": environment()}
    markdown = (
        f"# Shapes world: {args.name}\n\n`{command}`\n\n"
        f"{len(prompts)} prompts x {args.seeds} images, {args.steps} DDIM steps, guidance {args.guidance_scale}, "
        f"{environment()['device']}. Verified success (%) per GenEval-style category; overall = mean over "
        "categories.\n\n" + markdown_table([result])
    )
    write_results(f"shapes_{args.name}", data, markdown)
    example_grid(result).save(os.path.join(RESULTS, f"shapes_{args.name}.png"))
    print(markdown)


if __name__ == "__main__":
    main()
