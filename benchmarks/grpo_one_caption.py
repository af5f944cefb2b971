"""Flow-GRPO's learning signal on the flow shapes model, on one caption: the batch-mean reward of each step for a few
learning rates, from the same start. A trainer that cannot raise the reward of a single caption within the budget
cannot raise a whole evaluation set's; this measures how many samples the signal needs on this machine.

    python benchmarks/grpo_one_caption.py --lrs 1e-3,5e-3 --steps 40

Writes `benchmarks/results/training_flow/grpo_one_caption.json`, `.md` and `.png`.
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
from common import RESULTS, environment, line_chart, write_results  # noqa: E402

from ttalign.rewards import load_reward  # noqa: E402
from ttalign.shapes import FLOW_SAMPLING_DEFAULTS, load_pipeline  # noqa: E402
from ttalign.training import FlowGRPOConfig, FlowGRPOTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--caption", default="a green circle left of a blue triangle")
    parser.add_argument("--lrs", default="1e-3,5e-3")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--group-size", type=int, default=16, help="images of the caption per step")
    parser.add_argument("--sde-window", type=int, default=3)
    parser.add_argument("--reward", default="shapes_exact")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        pipe = load_pipeline("flow")
        pipe.set_progress_bar_config(disable=True)
        with tempfile.TemporaryDirectory() as tmp:
            config = FlowGRPOConfig(
                group_size=args.group_size,
                train_batch_size=args.group_size,
                num_inference_steps=10,
                guidance_scale=3.0,
                noise_level=0.7,
                kl_weight=0.0,
                sde_window=args.sde_window,
                max_steps=args.steps,
                learning_rate=lr,
                lora_rank=16,
                lora_alpha=32,
                output_dir=tmp,
                checkpointing_steps=10**6,
                encode_options={"max_sequence_length": FLOW_SAMPLING_DEFAULTS["max_sequence_length"]},
            )
            trainer = FlowGRPOTrainer(pipe, config, load_reward(args.reward), [args.caption])
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            with open(os.path.join(tmp, "logs", "metrics.jsonl")) as f:
                rewards = [json.loads(line)["reward"] for line in f]
        quarter = max(1, len(rewards) // 4)
        runs.append(
            {
                "lr": lr,
                "rewards": rewards,
                "seconds": seconds,
                "first_quarter": float(np.mean(rewards[:quarter])),
                "last_quarter": float(np.mean(rewards[-quarter:])),
            }
        )
        print(runs[-1], flush=True)
    command = "python benchmarks/grpo_one_caption.py " + " ".join(sys.argv[1:])
    lines = [
        "| lr | steps | images | mean reward, first quarter | mean reward, last quarter | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['lr']:g} | {len(r['rewards'])} | {len(r['rewards']) * args.group_size} | "
            f"{r['first_quarter']:.3f} | {r['last_quarter']:.3f} | {r['seconds']:.0f} |"
        )
    markdown = (
        f'# Flow-GRPO on one caption (flow shapes model)\n\n`{command}`\n\nCaption "{args.caption}", reward '
        f"`{args.reward}`, {args.group_size} images per step (one group), 10 SDE steps (a = 0.7), window of "
        f"{args.sde_window}, no KL, LoRA rank 16; {environment()['device']}.\n\n" + "\n".join(lines) + "\n"
    )
    series = {f"lr {r['lr']:g}": list(enumerate(r["rewards"], 1)) for r in runs}
    line_chart(series, os.path.join(RESULTS, "grpo_one_caption.png"), "training step", "batch-mean reward")
    write_results(
        "grpo_one_caption",
        {"benchmark": "grpo_one_caption", "command": command, "runs": runs, "environment": environment()},
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
