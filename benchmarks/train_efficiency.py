"""Trainer efficiency on a shapes model: the online trainers side by side at equal training wall time, on the same
captions and reward, with verified success measured along the way against training time and images sampled.

For each trainer of `--trainers` (`grpo`, `rwr`, `raft`, `awm`, `nft`, `d3po`, `spo`; `ddpo` on the SD model; AWM and
DiffusionNFT on the flow model only):

1. trains a LoRA (rank 16) on `--prompts` captions disjoint from the evaluation set, with `--reward`, sampling at the
   model's own settings, for `--minutes` of training wall time (the evaluations are not counted);
2. every `--eval-every` minutes of training, and at the end, evaluates the LoRA at 1x NFE on the evaluation prompts
   (`--per-category` per category x `--seeds`, the exact verifier), with the images sampled so far.

Writes `<name>.json`, `<name>.md` (final verified success, the paired sign test against the base model, the images
sampled to first reach +10 points and their ratio to Flow-GRPO's) and `<name>.png` (success against training minutes
and against images sampled).

    python benchmarks/train_efficiency.py --model flow --reward shapes_soft --minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, environment, line_chart, write_results  # noqa: E402
from train_shapes import training_captions  # noqa: E402

from ttalign import training as T  # noqa: E402
from ttalign.rewards import load_reward  # noqa: E402
from ttalign.shapes import CATEGORIES, evaluation_prompts, load_pipeline, sampling_defaults  # noqa: E402
from ttalign.shapes.evaluate import evaluate, paired  # noqa: E402

NAMES = {
    "grpo": "GRPO",
    "ddpo": "DDPO (PPO)",
    "rwr": "RWR",
    "raft": "RAFT",
    "awm": "AWM",
    "nft": "DiffusionNFT",
    "d3po": "D3PO",
    "spo": "SPO",
}


def make_trainer(kind: str, pipe, args, reward, captions, out_dir: str, defaults: dict):
    """The trainer `kind` at the suite's shared settings: `--batch` images per sampling call (groups of
    `--group-size` where the method groups), the model's own sampling steps and guidance."""
    common = dict(
        max_steps=10**9,
        learning_rate=args.lr,
        lora_rank=16,
        lora_alpha=32,
        train_batch_size=args.batch,
        checkpointing_steps=10**9,
        output_dir=out_dir,
        seed=args.seed,
        encode_options={k: v for k, v in defaults.items() if k == "max_sequence_length"},
    )
    steps, guidance = defaults["num_inference_steps"], defaults["guidance_scale"]
    grouped = dict(group_size=args.group_size, num_inference_steps=steps, guidance_scale=guidance)
    if kind == "grpo":
        config = T.GRPOConfig(
            noise_level=args.noise_level, kl_weight=0.0, sde_window=args.sde_window, **grouped, **common
        )
        return T.GRPOTrainer(pipe, config, reward, captions)
    if kind == "ddpo":
        config = T.DDPOConfig(num_inference_steps=steps, guidance_scale=guidance, **common)
        return T.DDPOTrainer(pipe, config, reward, captions)
    if kind in ("rwr", "raft", "awm", "nft"):
        trainer_cls, config_cls = {
            "rwr": (T.RWRTrainer, T.RWRConfig),
            "raft": (T.RAFTTrainer, T.RAFTConfig),
            "awm": (T.AWMTrainer, T.AWMConfig),
            "nft": (T.DiffusionNFTTrainer, T.DiffusionNFTConfig),
        }[kind]
        extra = {"min_reward": args.raft_min_reward} if kind == "raft" else {}
        if args.kl_weight is not None:
            extra["kl_weight"] = args.kl_weight
        return trainer_cls(pipe, config_cls(**grouped, **extra, **common), reward, captions)
    if kind == "d3po":
        config = T.D3POConfig(
            noise_level=args.noise_level, num_inference_steps=steps, guidance_scale=guidance, **common
        )
        return T.D3POTrainer(pipe, config, reward, captions)
    if kind == "spo":
        config = T.SPOConfig(
            num_inference_steps=steps, guidance_scale=guidance, start_step=min(4, steps - 2), **common
        )
        return T.SPOTrainer(pipe, config, reward, captions)
    raise SystemExit(f"unknown trainer {kind!r}; expected one of {', '.join(NAMES)}")


class Counter:
    """Counts the images a trainer samples (its sampling calls' batches)."""

    def __init__(self, trainer):
        self.images = 0
        sample = trainer.sample

        def counted(generator):
            self.images += trainer.config.train_batch_size
            return sample(generator)

        trainer.sample = counted


def train_for(trainer, seconds: float, rewards: list[float] | None = None) -> float:
    """Runs the trainer's loop until `seconds` of training have passed (checked between optimizer steps); returns the
    seconds it ran. Each micro-batch's training reward (the mean reward of the images it sampled, the `reward` metric)
    is appended to `rewards`."""
    deadline = time.perf_counter() + seconds
    step = trainer.training_step

    def timed(generator):
        if time.perf_counter() > deadline:
            trainer.config.max_steps = trainer.step + 1  # this step is the last of the chunk
        loss, metrics = step(generator)
        if rewards is not None and "reward" in metrics:
            rewards.append(float(metrics["reward"]))
        return loss, metrics

    trainer.training_step = timed
    trainer.config.max_steps = 10**9
    trainer.set_progress_bar_config(total=None)  # bounded by time: the bar counts steps
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer.training_step = step
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd", "flow"), default="flow")
    parser.add_argument("--reward", default="shapes_soft", help="a reward spec (shapes_soft, shapes_vqa, ...)")
    parser.add_argument("--trainers", default="grpo,rwr,raft,awm,nft,d3po,spo")
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall time of each trainer")
    parser.add_argument("--eval-every", type=float, default=5.0, help="minutes of training between evaluations")
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16, help="images per sampling call")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--sde-window", type=int, default=3)
    parser.add_argument(
        "--raft-min-reward",
        type=float,
        default=None,
        help="RAFT keeps no image rewarded below this (0.5 with shapes_exact: only images that pass)",
    )
    parser.add_argument(
        "--kl-weight",
        type=float,
        default=None,
        help="the weighted-matching trainers' pull to the LoRA-free model (default: each trainer's own)",
    )
    parser.add_argument("--per-category", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument(
        "--save-lora",
        default=None,
        metavar="DIR",
        help="also save each trainer's final LoRA in diffusers' format under DIR/<trainer>",
    )
    parser.add_argument(
        "--merge",
        default=None,
        metavar="NAMES",
        help="write one table (--name) from earlier runs' results NAME1,NAME2,... (disjoint trainers, same settings)",
    )
    args = parser.parse_args()
    if args.merge:
        if not args.name:
            raise SystemExit("--merge needs --name for the merged table")
        merge(args.name, args.merge.split(","))
        return
    name = args.name or f"train_efficiency_{args.model}_{args.reward.split(':')[0]}"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    held_out = {p for per in (20, 40) for p, _ in evaluation_prompts(per)}
    captions = training_captions(args.prompts, exclude=held_out)
    prompts = evaluation_prompts(args.per_category)
    base = load_pipeline(args.model)
    base.set_progress_bar_config(disable=True)
    defaults = sampling_defaults(base)

    def run_eval(pipe, label):
        return evaluate(pipe, prompts, [], name=label, seeds=args.seeds, **defaults).summary()

    base_eval = run_eval(base, "base")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.trainers.split(","):
            torch.manual_seed(args.seed)
            pipe = load_pipeline(args.model)
            pipe.set_progress_bar_config(disable=True)
            trainer = make_trainer(
                kind, pipe, args, load_reward(args.reward), captions, os.path.join(tmp, kind), defaults
            )
            counter = Counter(trainer)
            curve, trained = [{"minutes": 0.0, "images": 0, "steps": 0, "overall": base_eval["overall"]}], 0.0
            while trained < 60 * args.minutes - 1:
                rewards: list[float] = []
                trained += train_for(trainer, min(60 * args.eval_every, 60 * args.minutes - trained), rewards)
                summary = run_eval(trainer.model.aligned_pipeline(), f"{kind}-{trainer.step}")
                curve.append(
                    {
                        "minutes": trained / 60,
                        "images": counter.images,
                        "steps": trainer.step,
                        "overall": summary["overall"],
                        # the optimized reward's mean over the chunk's sampled images
                        "train_reward": sum(rewards) / len(rewards) if rewards else None,
                    }
                )
                print(kind, curve[-1], flush=True)
            if args.save_lora:
                trainer.save_lora(os.path.join(args.save_lora, kind))
            reached = next((p for p in curve if p["overall"] >= base_eval["overall"] + 0.10), None)
            rows.append(
                {
                    "trainer": kind,
                    "curve": curve,
                    "final": summary,
                    "paired": paired(base_eval["verdicts"], summary["verdicts"]),
                    "images_to_plus_10": reached["images"] if reached else None,
                }
            )
    command = "python benchmarks/train_efficiency.py " + " ".join(sys.argv[1:])
    setting = (
        f"reward `{args.reward}`, {args.minutes:g} minutes of training each, {len(captions)} captions disjoint from "
        f"the evaluation set, {args.batch} images per sampling call (groups of {args.group_size}), lr {args.lr}, "
        f"noise level {args.noise_level}, SDE window {args.sde_window}, seed {args.seed}"
        + (f", RAFT's min reward {args.raft_min_reward}" if args.raft_min_reward is not None else "")
        + (f", kl weight {args.kl_weight}" if args.kl_weight is not None else "")
        + f"; evaluation: {len(prompts)} prompts x {args.seeds} seeds at 1x NFE, exact verifier"
    )
    base = {k: v for k, v in base_eval.items() if k != "verdicts"}
    rows = [{**r, "final": {k: v for k, v in r["final"].items() if k != "verdicts"}} for r in rows]
    write_table(name, args.model, setting, [command], base, rows)


def write_table(name: str, model: str, setting: str, commands: list[str], base: dict, rows: list[dict]) -> None:
    """Writes the suite's table, its two charts and its JSON for the trainers' `rows` (each with its learning curve,
    final evaluation and paired test against the `base` evaluation)."""
    grpo = next((r["images_to_plus_10"] for r in rows if r["trainer"] == "grpo"), None)
    lines = [
        "| trainer | steps | images sampled | " + " | ".join(CATEGORIES) + " | overall | vs base: fail->pass / "
        "pass->fail, p | images to +10 points | ratio to GRPO |",
        "|" + "---|" * (len(CATEGORIES) + 7),
        "| base model | 0 | 0 | "
        + " | ".join(f"{100 * base['category_accuracy'][c]:.1f}" for c in CATEGORIES)
        + f" | {100 * base['overall']:.1f} | - | - | - |",
    ]
    for r in rows:
        f, p, last = r["final"], r["paired"], r["curve"][-1]
        to10 = r["images_to_plus_10"]
        ratio = f"{grpo / to10:.2f}" if to10 and grpo else "-"
        lines.append(
            f"| {NAMES[r['trainer']]} | {last['steps']} | {last['images']} | "
            + " | ".join(f"{100 * f['category_accuracy'][c]:.1f}" for c in CATEGORIES)
            + f" | **{100 * f['overall']:.1f}** | {p['wins']} / {p['losses']}, {p['p_value']:.3g} | "
            + f"{to10 if to10 else 'not reached'} | {ratio} |"
        )
    trends = []
    for r in rows:
        values = [p["train_reward"] for p in r["curve"] if p.get("train_reward") is not None]
        if values:
            trends.append(f"{NAMES[r['trainer']]} {values[0]:.3f} -> {values[-1]:.3f}")
    markdown = (
        f"Trainer efficiency on the {model} shapes model ("
        + ", ".join(f"`{c}`" for c in commands)
        + f"): {setting}. The ratio to GRPO is GRPO's images to +10 points over the trainer's.\n\n"
        + "\n".join(lines)
        + "\n"
        + (
            "\nThe optimized reward on the images each trainer sampled, mean over its first and last evaluation "
            "interval: " + "; ".join(trends) + " (recorded in the runs since it was added).\n"
            if trends
            else ""
        )
    )
    series_time = {NAMES[r["trainer"]]: [(p["minutes"], 100 * p["overall"]) for p in r["curve"]] for r in rows}
    series_images = {NAMES[r["trainer"]]: [(p["images"], 100 * p["overall"]) for p in r["curve"]] for r in rows}
    line_chart(series_time, os.path.join(RESULTS, f"{name}.png"), "training minutes", "verified success (%)")
    line_chart(series_images, os.path.join(RESULTS, f"{name}_images.png"), "images sampled", "verified success (%)")
    write_results(
        name,
        {
            "benchmark": "train_efficiency",
            "command": "python benchmarks/train_efficiency.py " + " ".join(sys.argv[1:]),
            **({"parts": commands} if len(commands) > 1 else {}),
            "model": model,
            "setting": setting,
            "base": base,
            "rows": rows,
            "environment": environment(),
        },
        markdown,
    )
    print(markdown)


def merge(name: str, parts: list[str]) -> None:
    """One table from runs of this script on disjoint trainers at the same settings (run side by side, one thread
    each, to fit the suite in fewer hours): refuses parts whose model, settings or base evaluation differ."""
    runs = []
    for part in parts:
        path = os.path.join(RESULTS, f"{part}.json")
        if not os.path.exists(path):
            raise SystemExit(f"--merge: no results {path!r} (run that part first)")
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f))
    first = runs[0]
    for part, run in zip(parts[1:], runs[1:]):
        same = {
            "model": run["model"] == first["model"],
            "setting": run["setting"] == first["setting"],
            "base evaluation": all(run["base"][k] == first["base"][k] for k in ("category_accuracy", "settings")),
        }
        for key, ok in same.items():
            if not ok:
                raise SystemExit(f"--merge: {part!r} differs from {parts[0]!r} in its {key}; parts must match")
    trainers = [r["trainer"] for run in runs for r in run["rows"]]
    if len(set(trainers)) != len(trainers):
        raise SystemExit(f"--merge: a trainer appears in more than one part: {trainers}")
    commands = [c for run in runs for c in run.get("parts", [run["command"]])]
    write_table(
        name, first["model"], first["setting"], commands, first["base"], [r for run in runs for r in run["rows"]]
    )


if __name__ == "__main__":
    main()
