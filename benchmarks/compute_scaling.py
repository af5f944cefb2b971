"""Compute scaling on a shapes model: verified success on the composite categories against NFE per returned image
(1x to 16x the plain model's), for best-of-N, seed search, particle steering, noise optimization and reward guidance,
and compositions with region re-weighting, each with the soft verifier (the judge's differentiable copy) and with the
shapes CLIP (a learned reward that is not the judge) as the optimized signal; wall time beside NFE.

1. Candidates: `--candidates` images per prompt and seed, plain and with region re-weighting, scored by both rewards
   and judged by the exact verifier. Best-of-n is the highest-rewarded of the first n (what `BestOfN(n)` returns on
   these noises; its time is n candidates' share of the run, rewards included). pass@n, the verifier picking, is the
   ceiling of any selection among n samples: how often the model draws a right image at all.
2. Particle steering (`--particles`), seed search (one round around the best of its initial noises) and reward
   guidance, run through the harness on the same prompts and seeds as the plain run (paired sign test against it).
3. Noise optimization, from `overoptimization.py`'s per-image record (run it first, with `--batch-prompts 16`, the
   same prompts and seeds): `NoiseOptimization(steps=k)` returns the best-rewarded of its first k iterates, at
   (k + 1)x NFE.

The shapes CLIP is 100 x cosine, a hundred times the soft verifier's scale: with it, reward guidance's scale and
particle steering's lambda are divided by 100.

Writes `benchmarks/results/compute_scaling_<model>.json`, `.md` and `.png`.

    python benchmarks/overoptimization.py --reward shapes_soft --iterations 15 --batch-prompts 16 \\
        --categories counting,two_objects,position,color_attribution
    python benchmarks/overoptimization.py --reward shapes_clip --iterations 15 --batch-prompts 16 \\
        --categories counting,two_objects,position,color_attribution
    python benchmarks/compute_scaling.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REGIONS, RESULTS, environment, line_chart, write_results  # noqa: E402

from ttalign.methods import method_from_spec  # noqa: E402
from ttalign.rewards import load_reward  # noqa: E402
from ttalign.shapes import evaluation_prompts, load_pipeline, sampling_defaults, verify  # noqa: E402
from ttalign.shapes.clip import ShapesCLIPScore  # noqa: E402
from ttalign.shapes.evaluate import diversity, evaluate, paired, select_best, wilson_interval  # noqa: E402

COMPOSITE = ("counting", "two_objects", "position", "color_attribution")
REWARDS = ("shapes_soft", "shapes_clip")
SCALE = {"shapes_soft": 1.0, "shapes_clip": 0.01}  # the rewards' scales: soft in (0, 1], CLIP 100 x cosine
SEED_SEARCH = ((2, 1), (4, 3))  # (initial noises, neighbours in one round): 4x and 8x NFE


def score(images: torch.Tensor, texts: list[str], reward) -> tuple[torch.Tensor, float]:
    """The reward of every image `[N]`, and the seconds it took."""
    start = time.perf_counter()
    with torch.no_grad():
        values = torch.cat(
            [reward(images[i : i + 256], texts[i : i + 256]).float().cpu() for i in range(0, len(texts), 256)]
        )
    return values, time.perf_counter() - start


def point(method: str, reward: str, nfe: float, wall: float, verdicts: list, reference: list | None, div=None) -> dict:
    """One point of the curves: verified success per category and overall (pooled, 95% Wilson interval) of
    `verdicts` (`[category, passed]` per image), the paired sign test against `reference`."""
    categories = [c for c in COMPOSITE if any(v[0] == c for v in verdicts)]
    accuracy = {c: sum(p for k, p in verdicts if k == c) / sum(k == c for k, _ in verdicts) for c in categories}
    passed = sum(p for _, p in verdicts)
    row = {
        "method": method,
        "reward": reward,
        "nfe": nfe,
        "wall_s": wall,
        "category_accuracy": accuracy,
        "overall": passed / len(verdicts),
        "interval": wilson_interval(passed, len(verdicts)),
        "images": len(verdicts),
        "verdicts": verdicts,
        "diversity": div,
    }
    if reference is not None:
        row["paired"] = paired(reference, verdicts)
    print(f"{method} [{reward}] {nfe:.0f} NFE: {100 * row['overall']:.1f}", flush=True)
    return row


def selection_diversity(images: torch.Tensor, texts: list[str], seeds: int, embedder) -> dict:
    """:func:`diversity` of the selected images (`seeds` consecutive ones per prompt)."""
    with torch.no_grad():
        embeds = torch.cat([embedder.image_embeds(images[i : i + 256]) for i in range(0, len(texts), 256)])
    return diversity(embeds, verify(images, texts), seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd", "flow"), default="sd")
    parser.add_argument("--per-category", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per prompt and seed (best-of-N)")
    parser.add_argument("--particles", default="2,4,8")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    settings = sampling_defaults(pipe)
    steps = settings["num_inference_steps"]
    prompts = [(p, c) for p, c in evaluation_prompts(args.per_category) if c in COMPOSITE]
    rewards = {name: load_reward(name) for name in REWARDS}
    embedder = ShapesCLIPScore().embedder
    points = []

    # 1. the plain run (the paired reference of the harness runs), then the candidates
    plain = evaluate(pipe, prompts, [], name="plain", seeds=args.seeds, **settings)
    reference = plain.summary()["verdicts"]
    base_nfe, base_wall = plain.nfe_per_image, plain.wall_time_s / plain.images
    texts = plain.prompts
    k = args.candidates
    budgets = [n for n in (1, 2, 4, 8, 16, 32) if n <= k]
    for arm, methods in (("", []), (" + region re-weighting", [method_from_spec(REGIONS)])):
        run = evaluate(
            pipe, prompts, methods, name="candidates" + arm, seeds=args.seeds * k, batch_prompts=4, **settings
        )
        rows = len(texts)  # one row of k candidates per prompt and seed, in the plain run's order
        images = run.samples.view(rows, k, *run.samples.shape[1:])  # [rows, k, 3, H, W]
        passed = torch.tensor(run.verification.passed).view(rows, k)
        categories = [v.category for v in run.verification.verdicts][::k]
        per_candidate = run.wall_time_s / run.images
        pickers = {name: score(run.samples, run.prompts, r) for name, r in rewards.items()}
        pickers["pass@n (verifier)"] = (passed.float().flatten(), 0.0)
        for name, (values, seconds) in pickers.items():
            values = values.view(rows, k)
            for n in budgets:
                picked = select_best(values, n)  # [rows]
                verdicts = [[c, bool(p)] for c, p in zip(categories, passed.gather(1, picked[:, None])[:, 0])]
                chosen = images[torch.arange(rows), picked]
                div = selection_diversity(chosen, texts, args.seeds, embedder)
                method = ("pass@n" if name.startswith("pass") else "best-of-n") + arm
                wall = n * (per_candidate + seconds / run.images)
                points.append(
                    point(
                        method,
                        "verifier" if name.startswith("pass") else name,
                        n * run.nfe_per_image,
                        wall,
                        verdicts,
                        None,
                        div,
                    )
                )

    # 2. particle steering and reward guidance through the harness
    specs = []
    for reward in REWARDS:
        for n in [int(x) for x in args.particles.split(",")]:
            spec = f"particle_steering:particles={n},reward={reward},lmbda={10 * SCALE[reward]:g}"
            specs.append(("particle steering", reward, [spec]))
        specs.append(("reward guidance", reward, [f"reward_guidance:reward={reward},scale={5 * SCALE[reward]:g}"]))
        for n, neighbors in SEED_SEARCH:  # n + neighbors candidates and the final render
            spec = f"seed_search:n={n},rounds=1,neighbors={neighbors},reward={reward}"
            specs.append(("seed search", reward, [spec]))
    specs.append(
        (
            "particle steering + region re-weighting",
            "shapes_soft",
            ["particle_steering:particles=4,reward=shapes_soft", REGIONS],
        )
    )
    n, neighbors = SEED_SEARCH[-1]  # at 8x
    specs.append(
        (
            "seed search + region re-weighting",
            "shapes_soft",
            [f"seed_search:n={n},rounds=1,neighbors={neighbors},reward=shapes_soft", REGIONS],
        )
    )
    for method, reward, spec in specs:
        run = evaluate(pipe, prompts, [method_from_spec(s) for s in spec], name=method, seeds=args.seeds, **settings)
        points.append(
            point(
                method,
                reward,
                run.nfe_per_image,
                run.wall_time_s / run.images,
                run.summary()["verdicts"],
                reference,
                run.diversity,
            )
        )

    # 3. noise optimization, from the over-optimization monitor's record
    categories = [c for c, _ in reference]
    for reward in REWARDS:
        path = os.path.join(RESULTS, f"overoptimization_{args.model}_{reward}.json")
        if not os.path.isfile(path):
            print(f"no {path}: noise optimization on {reward} left out", flush=True)
            continue
        with open(path) as f:
            record = json.load(f)
        if record.get("categories") != categories:
            print(f"{path} was made on other prompts or seeds: left out", flush=True)
            continue
        values = torch.tensor(record["optimized_rewards"])  # [N, iterations]
        passed = torch.tensor(record["passed"])
        iterations = values.shape[1]
        per_iteration = record["wall_s"] / len(categories) / iterations
        for n in [n for n in (1, 3, 7, 15, 31) if n <= iterations]:
            picked = select_best(values, n)
            verdicts = [[c, bool(p)] for c, p in zip(categories, passed.gather(1, picked[:, None])[:, 0])]
            # n iterates (forward and backward) and the final render: (n + 1)x NFE
            points.append(
                point(
                    "noise optimization",
                    reward,
                    (n + 1) * base_nfe,
                    n * per_iteration + base_wall,
                    verdicts,
                    reference,
                )
            )

    # the table, the plot, the record
    command = "python benchmarks/compute_scaling.py " + " ".join(sys.argv[1:])
    head = [
        "method",
        "optimized reward",
        "NFE / image (x plain)",
        "wall / image (s)",
        *COMPOSITE,
        "overall (95% interval)",
        "vs plain run: won / lost, p",
        "CLIP distance / position spread",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(points, key=lambda r: (r["method"], r["reward"], r["nfe"]))
    for r in order:
        if r["nfe"] == base_nfe and r["method"].startswith("best-of-n"):
            continue  # one candidate: the plain sample, the pass@n row's
        low, high = r["interval"]
        p = r.get("paired")
        div = r["diversity"]
        cells = [
            r["method"],
            r["reward"],
            f"{r['nfe']:.0f} ({r['nfe'] / base_nfe:.0f}x)",
            f"{r['wall_s']:.2f}",
            *[f"{100 * r['category_accuracy'][c]:.1f}" for c in COMPOSITE],
            f"**{100 * r['overall']:.1f}** ({100 * low:.0f}-{100 * high:.0f})",
            f"{p['wins']} / {p['losses']}, {p['p_value']:.2g}" if p else "-",
            f"{div['clip_distance']:.3f} / {div['position_spread']:.1f}" if div else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    series = {}
    for r in order:
        label = f"{r['method']} [{r['reward'].replace('shapes_', '')}]"
        series.setdefault(label, []).append((math.log2(r["nfe"] / base_nfe), 100 * r["overall"]))
    line_chart(
        series,
        os.path.join(RESULTS, f"compute_scaling_{args.model}.png"),
        "log2(NFE / plain NFE)",
        "verified success, composite categories (%)",
        width=1000,
    )
    markdown = (
        f"# Compute scaling ({args.model} shapes model)\n\n`{command}`\n\n{len(texts)} images per point "
        f"({args.per_category} prompts per composite category x {args.seeds}), {steps} steps, guidance "
        f"{settings['guidance_scale']}, {environment()['device']}; plain run: {base_nfe:.0f} NFE and "
        f"{base_wall:.2f} s per image. Best-of-n and pass@n are picked from {k} candidates per prompt and seed "
        "(their sign test would compare other noises, so it is left out); the harness runs are paired with the plain "
        "run image by image. NFE counts forward passes; the backward passes of noise optimization and reward "
        "guidance show in the wall time.\n\n"
        + "\n".join(lines)
        + f"\n\n![scaling](compute_scaling_{args.model}.png)\n"
    )
    data = {
        "benchmark": "compute_scaling",
        "command": command,
        "points": points,
        "base_nfe": base_nfe,
        "base_wall_s": base_wall,
        "environment": environment(),
    }
    write_results(f"compute_scaling_{args.model}", data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
