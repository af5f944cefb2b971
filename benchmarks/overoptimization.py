"""Over-optimization monitor of noise optimization: the optimized reward, the other shapes reward and the exact
verifier's success at every iteration, on the same images.

Noise optimization (ReNO-style, `NoiseOptimization(keep_images=True)`) runs `--iterations` steps of gradient ascent on
`--reward` (`shapes_soft`, the differentiable copy of the judge, or `shapes_clip`, a learned reward that is not the
judge) from the evaluation set's initial noises; every iteration's images are scored by both rewards and judged by
the exact verifier. A reward that keeps rising while verified success stalls or falls is being over-optimized.

Writes `benchmarks/results/overoptimization_<model>_<reward>.json` (with every image's reward and verdict at every
iteration, from which `compute_scaling.py` reads noise optimization's curve: `NoiseOptimization(steps=k)` returns the
best-rewarded of the first `k` iterates), `.md` and `.png`.

    python benchmarks/overoptimization.py --reward shapes_clip --iterations 15 \
        --categories counting,two_objects,position,color_attribution
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, environment, line_chart, write_results  # noqa: E402

from ttalign.methods import NoiseOptimization  # noqa: E402
from ttalign.rewards import load_reward  # noqa: E402
from ttalign.shapes import evaluation_prompts, load_pipeline, sampling_defaults, verify  # noqa: E402
from ttalign.shapes.evaluate import wilson_interval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd", "flow"), default="sd")
    parser.add_argument("--reward", choices=("shapes_soft", "shapes_clip"), default="shapes_clip")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--per-category", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch-prompts", type=int, default=12)
    parser.add_argument("--categories", default=None, help="comma-separated categories (default: all six)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    settings = sampling_defaults(pipe)
    rewards = {name: load_reward(name) for name in ("shapes_soft", "shapes_clip")}
    method = NoiseOptimization(
        reward=rewards[args.reward],
        steps=args.iterations,
        optimizer="adamw",
        lr=args.lr,
        grad_clip=10.0,
        keep_images=True,
    )
    prompts = evaluation_prompts(args.per_category)
    if args.categories:
        wanted = args.categories.split(",")
        unknown = sorted(set(wanted) - {c for _, c in prompts})
        if unknown:
            parser.error(f"unknown categories {unknown}; expected some of {sorted({c for _, c in prompts})}")
        prompts = [(p, c) for p, c in prompts if c in wanted]
    images, texts, optimized = [], [], []  # per batch: images [iterations, N, 3, H, W], rewards [iterations, N]
    start = time.perf_counter()
    for b, first in enumerate(range(0, len(prompts), args.batch_prompts)):
        chunk = [p for p, _ in prompts[first : first + args.batch_prompts]]
        out = pipe(
            chunk,
            num_images_per_prompt=args.seeds,
            generator=torch.Generator().manual_seed(b),
            output_type="pt",
            alignment=[method],
            **settings,
        )
        images.append(out.traces["noise_optimization"]["images"])
        optimized.append(out.traces["noise_optimization"]["rewards"])
        texts += [p for p in chunk for _ in range(args.seeds)]
        print(f"batch {b}: {len(texts)} images", flush=True)
    wall = time.perf_counter() - start
    images, optimized = torch.cat(images, dim=1), torch.cat(optimized, dim=1)
    rows, verdicts = [], []
    for k in range(args.iterations):
        with torch.no_grad():
            scores = {name: float(r(images[k], texts).mean()) for name, r in rewards.items()}
        verification = verify(images[k], texts)
        passed = sum(verification.passed)
        verdicts.append([bool(v) for v in verification.passed])
        rows.append(
            {
                "iteration": k,
                "overall": verification.overall,
                "category_accuracy": verification.category_accuracy,
                "interval": wilson_interval(passed, len(texts)),
                **scores,
            }
        )
    series = {
        "verified success (%)": [(r["iteration"], 100 * r["overall"]) for r in rows],
        "shapes_soft x 100": [(r["iteration"], 100 * r["shapes_soft"]) for r in rows],
        "shapes_clip": [(r["iteration"], r["shapes_clip"]) for r in rows],
    }
    name = f"overoptimization_{args.model}_{args.reward}"
    line_chart(series, os.path.join(RESULTS, f"{name}.png"), "noise-optimization iteration", "%, reward")
    command = "python benchmarks/overoptimization.py " + " ".join(sys.argv[1:])
    lines = ["| iteration | verified success (%, 95% interval) | shapes_soft | shapes_clip |", "|---|---|---|---|"]
    for r in rows:
        low, high = r["interval"]
        cells = [
            f"**{r[key]:.3f}**" if key == args.reward else f"{r[key]:.3f}" for key in ("shapes_soft", "shapes_clip")
        ]
        lines.append(
            f"| {r['iteration']} | {100 * r['overall']:.1f} ({100 * low:.0f}-{100 * high:.0f}) | "
            + " | ".join(cells)
            + " |"
        )
    best = max(rows, key=lambda r: r["overall"])
    markdown = (
        f"# Over-optimization monitor: noise optimization on `{args.reward}` ({args.model} model)\n\n`{command}`\n\n"
        f"{len(texts)} images ({len(prompts)} prompts{' of ' + args.categories if args.categories else ''} x "
        f"{args.seeds}), AdamW lr {args.lr}, gradient clip 10, "
        f"{settings['num_inference_steps']} sampling steps, guidance {settings['guidance_scale']}; every iteration's "
        f"images scored by both rewards (the optimized one in bold) and judged by the exact verifier; iteration 0 is "
        f"the plain model's images. Verified success peaks at iteration {best['iteration']} "
        f"({100 * best['overall']:.1f}%). Scale: shapes_soft in (0, 1], shapes_clip 100 x cosine.\n\n"
        + "\n".join(lines)
        + f"\n\n![monitor]({name}.png)\n"
    )
    data = {
        "benchmark": "overoptimization",
        "command": command,
        "rows": rows,
        "images": len(texts),
        "environment": environment(),
        "final_gain": rows[-1]["overall"] - rows[0]["overall"],
        "reward_gain": rows[-1][args.reward] - rows[0][args.reward],
        "wall_s": wall,
        "categories": [c for _p, c in prompts for _k in range(args.seeds)],
        # per image (generation order), at every iteration: the reward the optimizer saw, and the verdict
        "optimized_rewards": optimized.T.tolist(),
        "passed": torch.tensor(verdicts).T.tolist(),
    }
    write_results(name, data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
