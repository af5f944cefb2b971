"""Training the flow shapes model: Flow-GRPO on a shapes reward (`--reward`: the soft verifier, the exact verifier's
share of clauses, or the shapes CLIP) and Flow-DPO on verifier-labelled pairs of the model's own samples, each LoRA
evaluated at 1x NFE like the inference-time methods, against reward guidance at the same generation cost ("train vs
guide" on the flow model).

1. Draws `--prompts` training captions from the shapes grammar (their own seed, not the evaluation set's).
2. Flow-GRPO: `FlowGRPOTrainer`, groups of `--group-size` images per caption, `--grpo-steps` sampling steps on
   Flow-GRPO's SDE (noise level 0.7; only a window of `--sde-window` high-noise steps with Flow-GRPO-Fast), PPO-clip
   1e-4, KL weight `--kl-weight`, for at most `--minutes` of training.
3. Flow-DPO: 4 base-model samples per caption, one (passed, failed) pair per caption the exact verifier splits;
   `FlowDPOTrainer` (beta 100) for at most `--minutes`.
4. Evaluates the base model and each LoRA on the method benchmark's prompts and seeds (20 prompts per category x 2
   images, 20 steps, guidance 3.0), with the paired sign test against the base model.
5. Over-optimization monitor: a checkpoint every `--monitor-every` steps, each evaluated like the final LoRA; the
   optimized reward along training (GRPO's batch mean) and verified success at the checkpoints, plotted.

Writes `benchmarks/results/<name>.json`, `.md` and `<name>_monitor.png`.

    python benchmarks/train_shapes_flow.py --minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, environment, line_chart, suite_results, write_results  # noqa: E402
from train_shapes import training_captions, write_verified_pairs  # noqa: E402

from ttalign.rewards import load_reward  # noqa: E402
from ttalign.shapes import FLOW_SAMPLING_DEFAULTS, evaluation_prompts, load_pipeline  # noqa: E402
from ttalign.shapes.evaluate import evaluate, paired  # noqa: E402
from ttalign.training import FlowDPOConfig, FlowDPOTrainer, FlowGRPOConfig, FlowGRPOTrainer  # noqa: E402

CATEGORIES = ("single_object", "colors", "counting", "two_objects", "position", "color_attribution")
ENCODE = {"max_sequence_length": FLOW_SAMPLING_DEFAULTS["max_sequence_length"]}


class TimeBudget:
    """Stops a trainer's loop once `seconds` have passed (checked between optimizer steps)."""

    def __init__(self, trainer, seconds: float):
        self.trainer, self.deadline = trainer, time.perf_counter() + seconds
        step = trainer.training_step

        def timed(generator):
            if time.perf_counter() > self.deadline:
                trainer.config.max_steps = trainer.step + 1  # this step is the last
            return step(generator)

        trainer.training_step = timed


def run_eval(pipe, name: str) -> dict:
    result = evaluate(pipe, evaluation_prompts(20), [], name=name, seeds=2, **FLOW_SAMPLING_DEFAULTS)
    return result.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget of each trainer")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--trainers", default="grpo,dpo", help="comma-separated: grpo, dpo")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--groups", type=int, default=4, help="prompts per GRPO step")
    parser.add_argument("--grpo-steps", type=int, default=10, help="sampling steps of the GRPO trajectories")
    parser.add_argument("--grpo-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=0.04)
    parser.add_argument(
        "--reward", default="shapes_soft", help="GRPO's reward: shapes_soft, shapes_exact, shapes_clip"
    )
    parser.add_argument("--sde-window", type=int, default=None, help="Flow-GRPO-Fast's window of trained steps")
    parser.add_argument("--monitor-every", type=int, default=50, help="steps between monitored checkpoints")
    parser.add_argument("--dpo-lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=100.0)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--name", default="training_flow")
    parser.add_argument(
        "--captions",
        choices=("disjoint", "any"),
        default="disjoint",
        help="training captions: none of the evaluation set's (default), or any of the grammar's",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    held_out = {p for per in (20, 40) for p, _ in evaluation_prompts(per)}  # training never sees an evaluated caption
    captions = training_captions(args.prompts, exclude=held_out if args.captions == "disjoint" else frozenset())
    base = load_pipeline("flow")
    base.set_progress_bar_config(disable=True)
    rows = [{"run": "base model", **run_eval(base, "base"), "train_s": 0.0, "steps": 0}]
    n_pairs = None
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.trainers.split(","):
            pipe = load_pipeline("flow")
            pipe.set_progress_bar_config(disable=True)
            out_dir = os.path.join(tmp, kind)
            common = dict(
                max_steps=args.max_steps,
                learning_rate=args.grpo_lr if kind == "grpo" else args.dpo_lr,
                lora_rank=args.lora_rank,
                lora_alpha=2 * args.lora_rank,
                checkpointing_steps=args.monitor_every,
                checkpoints_total_limit=10**6,
                output_dir=out_dir,
                encode_options=ENCODE,
            )
            if kind == "grpo":
                config = FlowGRPOConfig(
                    group_size=args.group_size,
                    train_batch_size=args.group_size * args.groups,
                    num_inference_steps=args.grpo_steps,
                    guidance_scale=3.0,
                    noise_level=0.7,
                    kl_weight=args.kl_weight,
                    sde_window=args.sde_window,
                    **common,
                )
                trainer = FlowGRPOTrainer(pipe, config, load_reward(args.reward), captions)
            elif kind == "dpo":
                pairs = os.path.join(tmp, "pairs")
                os.makedirs(pairs)
                n_pairs = write_verified_pairs(base, pairs, captions, **FLOW_SAMPLING_DEFAULTS)
                config = FlowDPOConfig(beta=args.beta, train_batch_size=8, **common)
                trainer = FlowDPOTrainer(pipe, config, train_dataset=pairs)
            else:
                raise SystemExit(f"unknown trainer {kind!r}; expected grpo or dpo")
            TimeBudget(trainer, 60 * args.minutes)
            start = time.perf_counter()
            metrics = trainer.train()
            seconds = time.perf_counter() - start
            label = {"grpo": "Flow-GRPO", "dpo": "Flow-DPO"}[kind] + f" LoRA ({trainer.step} steps)"
            with open(os.path.join(out_dir, "logs", "metrics.jsonl")) as f:
                history = [json.loads(line) for line in f]
            monitor = []
            for path in trainer.checkpoints():  # oldest first; the last one is the final state
                trainer.load_checkpoint(path)
                summary = run_eval(pipe, f"{kind}-{trainer.step}")
                monitor.append(
                    {
                        "step": trainer.step,
                        "overall": summary["overall"],
                        "category_accuracy": summary["category_accuracy"],
                    }
                )
            row = {
                "run": label,
                **summary,
                "train_s": seconds,
                "steps": trainer.step,
                "last_metrics": metrics,
                "monitor": monitor,
                "history": history,
            }
            row["paired"] = paired(rows[0]["verdicts"], row["verdicts"])
            rows.append(row)
            print(label, row["overall"], flush=True)

    guide = {}
    for name in ("reward_guidance", "best_of_4", "particle_steering_4"):
        path = os.path.join(suite_results("methods_flow"), f"shapes_flow_methods_{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                guide[name] = json.load(f)
    lines = [
        "| run | NFE / image | " + " | ".join(CATEGORIES) + " | overall | vs base: fail->pass / pass->fail, p "
        "| training (s) |",
        "|" + "---|" * (len(CATEGORIES) + 5),
    ]
    for r in rows:
        cats = " | ".join(f"{100 * r['category_accuracy'][c]:.1f}" for c in CATEGORIES)
        p = r.get("paired")
        vs = f"{p['wins']} / {p['losses']}, {p['p_value']:.3g}" if p else "-"
        lines.append(
            f"| {r['run']} | {FLOW_SAMPLING_DEFAULTS['num_inference_steps']} | {cats} | "
            f"**{100 * r['overall']:.1f}** | {vs} | {r['train_s']:.0f} |"
        )
    for name, r in guide.items():
        cats = " | ".join(f"{100 * r['category_accuracy'][c]:.1f}" for c in CATEGORIES)
        # the same prompts, seeds and noise streams as the base model's evaluation
        p = paired(rows[0]["verdicts"], r["verdicts"])
        vs = f"{p['wins']} / {p['losses']}, {p['p_value']:.3g}"
        lines.append(
            f"| guide: {name} (shapes_flow_methods_{name}) | {r['nfe_per_image']:.0f} | {cats} | "
            f"**{100 * r['overall']:.1f}** | {vs} | 0 |"
        )
    command = "python benchmarks/train_shapes_flow.py " + " ".join(sys.argv[1:])
    env = environment()
    trainers = args.trainers.split(",")
    described = []
    if "grpo" in trainers:
        window = f", trained on a window of {args.sde_window}" if args.sde_window else ""
        described.append(
            f"Flow-GRPO on `{args.reward}`: {args.groups} captions x {args.group_size} images per step, "
            f"{args.grpo_steps} SDE steps (a = 0.7){window}, KL weight {args.kl_weight}, lr "
            f"{args.grpo_lr}"
        )
    if "dpo" in trainers:
        described.append(
            f"Flow-DPO: beta {args.beta}, batch 8, lr {args.dpo_lr}, on {n_pairs} verifier-labelled "
            "pairs of the base model's own samples"
        )
    series, monitor_lines = {}, []
    for r in rows[1:]:
        kind = r["run"].split(" ")[0]
        base_point = [(0, 100 * rows[0]["overall"])]
        series[f"{kind}: verified success (%)"] = base_point + [(m["step"], 100 * m["overall"]) for m in r["monitor"]]
        rewards = [(h["step"], h["reward"]) for h in r["history"] if "reward" in h]
        if rewards:  # the batch mean of the optimized reward, averaged over 10 steps
            smooth = [
                (x, 100 * float(np.mean([y for _, y in rewards[max(0, i - 9) : i + 1]])))
                for i, (x, _) in enumerate(rewards)
            ]
            series[f"{kind}: reward x 100 (10-step mean)"] = smooth
        steps = ", ".join(f"{m['step']}: {100 * m['overall']:.1f}" for m in r["monitor"])
        monitor_lines.append(
            f"- {r['run']}, verified success at the checkpoints (step: %): 0: {100 * rows[0]['overall']:.1f}, {steps}"
        )
    markdown = (
        f"# Shapes world (flow model): train vs guide\n\n`{command}`\n\n" + "; ".join(described) + f"; on "
        f"{args.prompts} captions drawn with their own seed, LoRA rank {args.lora_rank}, at most {args.minutes:g} "
        f"minutes of training each, {env['device']}. Evaluated on the method benchmark's 120 prompts x 2 images (20 "
        "steps, guidance 3.0) with the paired sign test against the base model; the guided rows are the "
        "inference-time methods on the same prompts and seeds (the `methods_flow` suite).\n\n"
        + "\n".join(lines)
        + f"\n\nOver-optimization monitor (`{args.name}_monitor.png`):\n\n"
        + "\n".join(monitor_lines)
        + "\n"
    )
    if series:
        line_chart(series, os.path.join(RESULTS, f"{args.name}_monitor.png"), "training step", "%")
    data = {"benchmark": "training_flow", "command": command, "pairs": n_pairs, "rows": rows, "environment": env}
    write_results(args.name, json.loads(json.dumps(data, default=str)), markdown)
    print(markdown)


if __name__ == "__main__":
    main()
