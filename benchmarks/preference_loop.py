"""The preference loop on the shapes world, with the exact verifier standing in for people on the same code path
(items in a `JudgmentStore`, judgments recorded through it, `RewardTrainer` on the store's records).

1. Samples 2 images per training caption (`--captions`, disjoint from the evaluation set) with the SD shapes model,
   as labelling items of the system "sd"; the verifier judges each pair (one passes: it wins; both pass: tie; both
   fail: both bad) through `JudgmentStore.record`. At most `--pairs` pairs.
2. Fits a reward on the store's pairs with `RewardTrainer` from the shapes CLIP (`--minutes` at most), prompts held
   out whole.
3. Held-out pairwise accuracy (pairs with a winner) of the trained reward, the shapes CLIP and the soft verifier, on
   the same held-out pairs, with Wilson intervals and exact sign tests between the trained reward and each other.
4. Best-of-`--n` with the trained reward and with the shapes CLIP, each picking among the same candidates on the
   evaluation set (`--per-category` x `--seeds` groups of `--n`, sampled once and kept in `benchmarks/.cache/`),
   and particle steering with the trained reward (`--particle-per-category` x `--particle-seeds`); verified success
   per category.

Writes `<name>.json` and `<name>.md`; the trained reward stays in a temporary folder unless `--keep DIR`.

    python benchmarks/preference_loop.py --pairs 2000 --minutes 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, shapes_candidates, write_results  # noqa: E402
from train_shapes import training_captions  # noqa: E402

from ttalign.methods import method_from_spec  # noqa: E402
from ttalign.preferences import JudgmentStore  # noqa: E402
from ttalign.preferences.reward_training import RewardTrainer, RewardTrainingConfig, wilson  # noqa: E402
from ttalign.rewards import load_reward  # noqa: E402
from ttalign.shapes import CATEGORIES, evaluation_prompts, load_pipeline, sampling_defaults, verify  # noqa: E402
from ttalign.shapes.clip import CLIP_DIR  # noqa: E402
from ttalign.shapes.evaluate import evaluate, select_best, sign_test, wilson_interval  # noqa: E402


def collect(pipe, store: JudgmentStore, folder: str, captions: list[str], max_pairs: int, seed: int) -> int:
    """Samples two images per caption, adds each pair as an item and records the verifier's judgment."""
    pairs = 0
    for start in range(0, len(captions), 32):
        chunk = captions[start : start + 32]
        images = pipe(
            chunk, num_images_per_prompt=2, output_type="pt", generator=torch.Generator().manual_seed(seed + start)
        ).images
        passed = verify(images, [c for c in chunk for _ in range(2)]).passed
        for k, caption in enumerate(chunk):
            names = []
            for side in range(2):
                names.append(f"{start + k:05d}_{side}.png")
                array = (images[2 * k + side].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(array).save(os.path.join(folder, names[-1]))
            item = store.add_item(caption, names, systems=["sd", "sd"], source="shapes")
            a, b = passed[2 * k], passed[2 * k + 1]
            choice = "left" if a and not b else "right" if b and not a else "tie" if a else "both_bad"
            store.record(item, "verifier", choice=choice)
            pairs += 1
            if pairs >= max_pairs:
                return pairs
    return pairs


def held_out_accuracy(reward, pairs) -> tuple[list[float], dict]:
    """Per decided pair, 1 / 0.5 / 0 as the reward prefers the winner, ties or the loser; and the summary."""
    hits = []
    for start in range(0, len(pairs), 64):
        chunk = pairs[start : start + 64]
        prompts = [p.prompt for p in chunk]

        def tensor(images):
            return torch.stack(
                [torch.from_numpy(np.asarray(i, dtype=np.float32) / 255).permute(2, 0, 1) for i in images]
            )

        with torch.no_grad():
            first = reward(tensor([p.image_0 for p in chunk]), prompts)
            second = reward(tensor([p.image_1 for p in chunk]), prompts)
        for p, s0, s1 in zip(chunk, first.tolist(), second.tolist()):
            winner, loser = (s0, s1) if p.label == 0 else (s1, s0)
            hits.append(1.0 if winner > loser else 0.5 if winner == loser else 0.0)
    n = len(hits)
    return hits, {"accuracy": sum(hits) / n, "interval": wilson(sum(hits), n), "pairs": n}


def summarize(passed: np.ndarray, categories: np.ndarray) -> dict:
    """Success per category and overall of per-group verdicts `passed` `[G]` (categories `[G]`)."""
    return {
        "category_accuracy": {c: float(passed[categories == c].mean()) for c in CATEGORIES},
        "overall": float(passed.mean()),
        "intervals": {
            **{c: wilson_interval(int(passed[categories == c].sum()), int(sum(categories == c))) for c in CATEGORIES},
            "overall": wilson_interval(int(passed.sum()), len(passed)),
        },
        "images": int(len(passed)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=1200)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--per-category", type=int, default=40, help="best-of-n: prompts per category")
    parser.add_argument("--seeds", type=int, default=4, help="best-of-n: groups of n candidates per prompt")
    parser.add_argument(
        "--particle-per-category", type=int, default=20, help="particle steering: prompts per category"
    )
    parser.add_argument("--particle-seeds", type=int, default=2, help="particles: images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="a folder to keep the trained reward in")
    parser.add_argument("--name", default="preference_loop")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    held = {p for per in (20, 40) for p, _ in evaluation_prompts(per)}
    captions = training_captions(args.captions, seed=11, exclude=held)
    pipe = load_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(tmp, "images")
        os.makedirs(images)
        store = JudgmentStore(f"sqlite:///{os.path.join(tmp, 'labels.db')}")
        start = time.perf_counter()
        n_pairs = collect(pipe, store, images, captions, args.pairs, args.seed)
        collect_s = time.perf_counter() - start
        pairs, _ = store.training_records(images)
        config = RewardTrainingConfig(
            output_dir=os.path.join(tmp, "reward-run"),
            learning_rate=args.lr,
            weight_decay=0.0,
            warmup_steps=50,
            max_steps=args.steps,
            batch_size=32,
            held_out=args.held_out,
            checkpointing_steps=500,
            seed=args.seed,
        )
        trainer = RewardTrainer(CLIP_DIR, config, pairs)
        budget = time.perf_counter() + 60 * args.minutes
        step = trainer.loss

        def timed(records, weights):  # stops after `--minutes`: this step is the last
            if time.perf_counter() > budget:
                trainer.config.max_steps = trainer.step + 1
            return step(records, weights)

        trainer.loss = timed
        start = time.perf_counter()
        report = trainer.train()
        train_s = time.perf_counter() - start
        folder = trainer.save(args.keep, report=report)
        decided = [p for p in trainer.held_out if p.label in (0.0, 1.0)]
        rewards = {"trained": load_reward(folder), "shapes_clip": load_reward("shapes_clip")}
        rewards["shapes_soft"] = load_reward("shapes_soft")
        accuracy, hits = {}, {}
        for name, reward in rewards.items():
            hits[name], accuracy[name] = held_out_accuracy(reward, decided)
        for other in ("shapes_clip", "shapes_soft"):
            wins = sum(a > b for a, b in zip(hits["trained"], hits[other]))
            losses = sum(a < b for a, b in zip(hits["trained"], hits[other]))
            accuracy[other]["vs_trained"] = {
                "trained_better": wins,
                "other_better": losses,
                "p": sign_test(wins, losses),
            }
        # Best-of-n with each reward picks among the same candidates (sampled once, kept in benchmarks/.cache/).
        candidates = shapes_candidates("sd", args.per_category, args.seeds, args.n)
        samples, cand_prompts = candidates["samples"], candidates["prompts"]
        groups = len(cand_prompts) // args.n
        passed = candidates["passed"].reshape(groups, args.n)
        categories = np.array(candidates["categories"])
        runs = {}
        for name in ("trained", "shapes_clip"):
            with torch.no_grad():
                scores = torch.cat(
                    [
                        rewards[name](samples[i : i + 128].float() / 255, cand_prompts[i : i + 128]).float()
                        for i in range(0, len(cand_prompts), 128)
                    ]
                ).reshape(groups, args.n)
            best = passed[torch.arange(groups), select_best(scores, args.n)].numpy()
            runs[f"best_of_{args.n}_{name}"] = summarize(best, categories)
        runs["first candidate (no selection)"] = summarize(passed[:, 0].numpy(), categories)
        prompts = evaluation_prompts(args.particle_per_category)
        spec = f"particle_steering:particles=4,reward={folder}"
        result = evaluate(
            pipe,
            prompts,
            [method_from_spec(spec)],
            name="particles",
            seeds=args.particle_seeds,
            **sampling_defaults(pipe),
        )
        runs["particle_steering_4_trained"] = {k: v for k, v in result.summary().items() if k != "verdicts"}
        for name, run in runs.items():
            print(name, run["overall"], flush=True)
    lines = [
        "| reward | held-out pairwise accuracy (95% interval) | vs trained: trained better / other better, p |",
        "|---|---|---|",
    ]
    for name, a in accuracy.items():
        vs = a.get("vs_trained")
        low, high = a["interval"]
        vs_text = f"{vs['trained_better']} / {vs['other_better']}, {vs['p']:.3g}" if vs else "-"
        lines.append(f"| {name} | {100 * a['accuracy']:.1f} ({100 * low:.0f}-{100 * high:.0f}) | {vs_text} |")
    lines += ["", "| run | " + " | ".join(CATEGORIES) + " | overall |", "|" + "---|" * (len(CATEGORIES) + 2)]
    for name, r in runs.items():
        cats = " | ".join(f"{100 * r['category_accuracy'][c]:.1f}" for c in CATEGORIES)
        lines.append(f"| {name} | {cats} | **{100 * r['overall']:.1f}** |")
    command = "python benchmarks/preference_loop.py " + " ".join(sys.argv[1:])
    markdown = (
        f"The preference loop on the SD shapes model (`{command}`): {n_pairs} pairs judged by the exact verifier "
        f"through the judgment store ({collect_s:.0f} s), a reward fitted from the shapes CLIP in {train_s:.0f} s "
        f"({trainer.step} steps), {len(decided)} held-out pairs with a winner (prompts held out whole). Best-of-"
        f"{args.n}: {groups} groups ({args.per_category} evaluation prompts per category x {args.seeds}), each reward "
        f"picking among the same {args.n} candidates; particle steering: {len(prompts)} prompts x "
        f"{args.particle_seeds} images.\n\n" + "\n".join(lines) + "\n"
    )
    data = {
        "benchmark": "preference_loop",
        "command": command,
        "pairs": n_pairs,
        "collect_s": collect_s,
        "train_s": train_s,
        "steps": trainer.step,
        "report": report,
        "accuracy": accuracy,
        "runs": runs,
        "environment": environment(),
    }
    write_results(args.name, data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
