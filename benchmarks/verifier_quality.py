"""Verifier quality: how well each reward ranks a shapes model's own candidates, judged by the exact verifier.

For every prompt of the evaluation set (`--per-category` per category) and `--seeds` seeds, `--candidates` images
are sampled at the model's own settings and judged by the exact verifier; every reward scores all of them. Per
category and reward:

- ROC AUC: the probability that a passing candidate scores above a failing one (ties count one half), over all
  candidates of the category, with a 95% bootstrap interval over (prompt, seed) groups;
- best-of-K: how often the highest-scoring of a group's K candidates passes (95% Wilson interval), beside the first
  candidate (no selection) and pass@K (the verifier picking: whether any of the K passes).

    python benchmarks/verifier_quality.py --model sd --rewards shapes_clip,shapes_soft
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, shapes_candidates, write_results  # noqa: E402

from ttalign.rewards import load_reward  # noqa: E402
from ttalign.shapes import CATEGORIES  # noqa: E402
from ttalign.shapes.evaluate import select_best, wilson_interval  # noqa: E402


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + P(tie) / 2, by ranks (Mann-Whitney U); `nan` without both."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auc(scores: np.ndarray, positive: np.ndarray, rounds: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the AUC, resampling (prompt, seed) groups (rows of `[G, K]` arrays)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        rows = rng.integers(0, len(scores), len(scores))
        value = roc_auc(scores[rows].ravel(), positive[rows].ravel())
        if not np.isnan(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd", "flow"), default="sd")
    parser.add_argument("--rewards", default="shapes_clip,shapes_soft,shapes_vqa,shapes_questions")
    parser.add_argument("--per-category", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2, help="groups of candidates per prompt")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per group (best-of-K)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    name = args.name or f"verifier_quality_{args.model}"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    k = args.candidates
    candidates = shapes_candidates(args.model, args.per_category, args.seeds, k)
    samples, prompts = candidates["samples"], candidates["prompts"]
    groups = len(prompts) // k  # consecutive blocks of k candidates: one (prompt, seed) group each
    passed = candidates["passed"].numpy().reshape(groups, k)
    categories = np.array(candidates["categories"])
    rows, timings = [], {}
    for reward_name in [r for r in args.rewards.split(",") if r]:
        reward = load_reward(reward_name)
        start = time.perf_counter()
        with torch.no_grad():
            scores = torch.cat(
                [
                    reward(samples[i : i + 128].float() / 255, prompts[i : i + 128]).float().cpu()
                    for i in range(0, len(prompts), 128)
                ]
            )
        timings[reward_name] = time.perf_counter() - start
        scores = scores.numpy().reshape(groups, k)
        picked = select_best(torch.from_numpy(scores), k).numpy()
        best = passed[np.arange(groups), picked]
        row = {"reward": reward_name, "per_category": {}, "seconds": timings[reward_name]}
        for category in [*CATEGORIES, "all"]:
            mask = np.ones(groups, bool) if category == "all" else categories == category
            if not mask.any():
                continue
            auc = roc_auc(scores[mask].ravel(), passed[mask].ravel())
            interval = bootstrap_auc(scores[mask], passed[mask], args.bootstrap, seed=0)
            wins = int(best[mask].sum())
            row["per_category"][category] = {
                "auc": None if np.isnan(auc) else auc,  # None: the category's candidates all passed or all failed
                "auc_interval": None if np.isnan(interval[0]) else interval,
                "best_of_k": wins / int(mask.sum()),
                "best_of_k_interval": wilson_interval(wins, int(mask.sum())),
                "groups": int(mask.sum()),
            }
        rows.append(row)
        print(reward_name, {c: v["auc"] for c, v in row["per_category"].items()}, flush=True)
    reference = {}
    for category in [*CATEGORIES, "all"]:
        mask = np.ones(groups, bool) if category == "all" else categories == category
        if mask.any():
            reference[category] = {
                "first": float(passed[mask, 0].mean()),
                "pass_at_k": float(passed[mask].any(1).mean()),
                "candidate_pass_rate": float(passed[mask].mean()),
            }
    data = {
        "command": "python benchmarks/verifier_quality.py " + " ".join(sys.argv[1:]),
        "settings": {**vars(args), "sampling": candidates["sampling"]},
        "environment": environment(),
        "candidates": len(prompts),
        "sample_s": candidates["sample_s"],
        "reference": reference,
        "rewards": rows,
    }
    shown = [c for c in [*CATEGORIES, "all"] if c in reference]
    lines = [
        f"# Verifier quality on the {args.model} shapes model",
        "",
        f"`{data['command']}`",
        "",
        f"{args.per_category} prompts per category x {args.seeds} groups of {k} candidates "
        f"({len(prompts)} images), "
        "judged by the exact verifier. ROC AUC of each reward against the verdicts (95% bootstrap interval over "
        "groups; - where a category's candidates all passed or all failed), then the success of its best-of-K pick.",
        "",
        "| reward | " + " | ".join(f"AUC {c}" for c in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for row in rows:
        cells = []
        for c in shown:
            v = row["per_category"][c]
            if v["auc"] is None:
                cells.append("-")
            else:
                cells.append(f"{v['auc']:.3f} ({v['auc_interval'][0]:.2f}-{v['auc_interval'][1]:.2f})")
        lines.append(f"| {row['reward']} | " + " | ".join(cells) + " |")
    lines += ["", f"| best-of-{k} (%) | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    lines.append("| first candidate | " + " | ".join(f"{100 * reference[c]['first']:.1f}" for c in shown) + " |")
    for row in rows:
        lines.append(
            f"| {row['reward']} | "
            + " | ".join(f"{100 * row['per_category'][c]['best_of_k']:.1f}" for c in shown)
            + " |"
        )
    lines.append(
        f"| pass@{k} (the verifier) | " + " | ".join(f"{100 * reference[c]['pass_at_k']:.1f}" for c in shown) + " |"
    )
    write_results(name, data, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
