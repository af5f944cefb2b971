"""Training on the shapes world: Diffusion-DPO on verifier-labelled pairs of the model's own samples, and DRaFT-1
reward backpropagation on the soft verifier; each LoRA evaluated like the inference-time methods ("train vs guide").

1. Draws `--prompts` training captions from the shapes grammar (their own seed; none of the evaluation set's unless
   `--captions any`), samples
   4 images per caption with the base model, and keeps one (passed, failed) pair per caption the exact verifier
   splits.
2. Trains a LoRA with `DiffusionDPOTrainer`, and another with `RewardBackpropTrainer` (mode "draft", k=1); with
   `--trainers dpo_guided`, DPO on pairs whose winners are drawn with a test-time method (`--guide`, by default region
   re-weighting) and kept when the verifier passes them: test-time alignment distilled into a LoRA.
   With `--start sd-tuned`, one more round of on-policy training: the pairs are drawn from the installed tuned model,
   which is also the DPO reference, and the round's LoRA is saved stacked on the installed one (`stack_loras`).
3. Evaluates the base model and each LoRA on the method benchmark's prompts and seeds (`shapes_eval` harness), or on
   the whole evaluation set with `--eval-per-category 40 --eval-seeds 4`; paired sign tests against the base model.

Writes `benchmarks/results/<--name, default training>.json` and `.md`; with `--save-lora DIR`, each trainer's LoRA goes
to `DIR/<trainer>` (diffusers' format, for `tuned_eval.py`).

    python benchmarks/train_shapes.py --prompts 200 --dpo-steps 200 --draft-steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REGIONS, environment, suite_results, write_results  # noqa: E402

from ttalign.methods import method_from_spec  # noqa: E402
from ttalign.shapes import ShapesSoftVerifier, evaluation_prompts, load_pipeline, verify  # noqa: E402
from ttalign.shapes.evaluate import evaluate, paired  # noqa: E402
from ttalign.shapes.models import TUNED_DIR  # noqa: E402
from ttalign.shapes.world import sample_scene  # noqa: E402
from ttalign.training import (  # noqa: E402
    DDPOConfig,
    DDPOTrainer,
    DiffusionDPOTrainer,
    DPOConfig,
    RewardBackpropConfig,
    RewardBackpropTrainer,
    stack_loras,
)

TRAINER_NAMES = {"dpo": "DPO", "dpo_guided": "DPO on guided winners", "draft": "DRaFT-1", "ddpo": "DDPO"}
CATEGORIES = ("single_object", "colors", "counting", "two_objects", "position", "color_attribution")


def training_captions(n: int, seed: int = 7, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """`n` captions from the shapes grammar (their own seed), none of them in `exclude` (the evaluation set)."""
    rng = np.random.default_rng(seed)
    captions = []
    while len(captions) < n:
        caption = sample_scene(rng)[1]
        if caption not in exclude:
            captions.append(caption)
    return captions


def make_model_pairs(pipe, out: str, captions: list[str], seed: int = 7) -> tuple[str, int]:
    """Samples 4 images per training caption and writes one verifier-labelled (passed, failed) pair per caption."""
    return out, write_verified_pairs(pipe, out, captions, seed, num_inference_steps=25, guidance_scale=3.0)


def save_pair(out: str, index: int, caption: str, winner: torch.Tensor, loser: torch.Tensor) -> str:
    """Writes pair `index` (images `[3, H, W]` in `[0, 1]`) as two PNGs in `out`; returns its `pairs.jsonl` line."""
    names = []
    for side, image in enumerate((winner, loser)):
        names.append(f"{index:05d}_{side}.png")
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(os.path.join(out, names[-1]))
    return json.dumps({"prompt": caption, "image_0": names[0], "image_1": names[1], "label": 0})


def write_verified_pairs(pipe, out: str, captions: list[str], seed: int = 7, **sampling) -> int:
    """4 samples per caption (`sampling`: the call's settings); one (passed, failed) pair per caption the exact
    verifier splits, written to `out` as `pairs.jsonl` and PNGs. Returns the number of pairs."""
    lines = []
    for start in range(0, len(captions), 32):
        chunk = captions[start : start + 32]
        images = pipe(
            chunk,
            num_images_per_prompt=4,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed + start),
            **sampling,
        ).images
        passed = verify(images, [c for c in chunk for _ in range(4)]).passed
        for k, caption in enumerate(chunk):
            group = passed[4 * k : 4 * k + 4]
            if True in group and False in group:
                winner, loser = images[4 * k + group.index(True)], images[4 * k + group.index(False)]
                lines.append(save_pair(out, len(lines), caption, winner, loser))
    with open(os.path.join(out, "pairs.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


def write_guided_pairs(pipe, out: str, captions: list[str], methods: list, seed: int = 7, **sampling) -> int:
    """Pairs whose winners come from test-time alignment: per caption, 2 images generated with `methods` and 4 plain
    samples; the winner is a guided image the exact verifier passes (a plain one where no guided image passes), the
    loser a plain sample it fails. Written to `out` like :func:`write_verified_pairs`; returns the number of pairs."""
    lines = []
    for start in range(0, len(captions), 16):
        chunk = captions[start : start + 16]
        generator = torch.Generator().manual_seed(seed + start)
        guided = pipe(
            chunk, num_images_per_prompt=2, output_type="pt", generator=generator, alignment=methods, **sampling
        ).images
        plain = pipe(chunk, num_images_per_prompt=4, output_type="pt", generator=generator, **sampling).images
        guided_passed = verify(guided, [c for c in chunk for _ in range(2)]).passed
        plain_passed = verify(plain, [c for c in chunk for _ in range(4)]).passed
        for k, caption in enumerate(chunk):
            winners = [guided[2 * k + i] for i in range(2) if guided_passed[2 * k + i]]
            winners += [plain[4 * k + i] for i in range(4) if plain_passed[4 * k + i]]
            losers = [plain[4 * k + i] for i in range(4) if not plain_passed[4 * k + i]]
            if winners and losers:
                lines.append(save_pair(out, len(lines), caption, winners[0], losers[0]))
        print(f"guided pairs: {len(lines)} from {start + len(chunk)} captions", flush=True)
    with open(os.path.join(out, "pairs.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


def run_eval(pipe, name: str, per_category: int = 20, seeds: int = 2) -> dict:
    """Verified success at 1x NFE; by default the method benchmark's set (20 prompts per category x 2 images), the
    whole evaluation set with `per_category=40, seeds=4`."""
    prompts = evaluation_prompts(per_category)
    result = evaluate(pipe, prompts, [], name=name, seeds=seeds, num_inference_steps=25, guidance_scale=3.0)
    return result.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--dpo-steps", type=int, default=200)
    parser.add_argument("--draft-steps", type=int, default=100)
    parser.add_argument("--ddpo-steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--trainers", default="dpo,draft", help="comma-separated: dpo, dpo_guided, draft, ddpo")
    parser.add_argument("--guide", default=REGIONS, help="dpo_guided: the method spec that draws the winners")
    parser.add_argument("--eval-per-category", type=int, default=20)
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--name", default="training", help="results file name")
    parser.add_argument(
        "--captions",
        choices=("disjoint", "any"),
        default="disjoint",
        help="training captions: none of the evaluation set's (default), or any of the grammar's",
    )
    parser.add_argument("--save-lora", default=None, help="a folder; each trainer's LoRA goes to <folder>/<trainer>")
    parser.add_argument(
        "--start",
        choices=("sd", "sd-tuned"),
        default="sd",
        help="the model to train from: the base, or the installed tuned model (one more round; the saved LoRA is the "
        "installed one and this round's stacked, for the base model)",
    )
    args = parser.parse_args()
    kinds = args.trainers.split(",")
    unknown = set(kinds) - TRAINER_NAMES.keys()
    if unknown:
        parser.error(f"unknown trainers {sorted(unknown)}; choose from {sorted(TRAINER_NAMES)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows = []
    base = load_pipeline(args.start)
    base.set_progress_bar_config(disable=True)
    evaluation = {"per_category": args.eval_per_category, "seeds": args.eval_seeds}
    start_label = "base model" if args.start == "sd" else f"start model (`{args.start}`)"
    start_record = {}
    if args.start != "sd":
        with open(os.path.join(TUNED_DIR, "sd", "training.json")) as f:
            start_record = json.load(f)
    rows.append({"run": start_label, **run_eval(base, "base", **evaluation), "train_s": 0.0})
    reference = rows[0]["verdicts"]
    held_out = {p for per in (args.eval_per_category, 40) for p, _ in evaluation_prompts(per)}
    captions = training_captions(args.prompts, exclude=held_out if args.captions == "disjoint" else frozenset())
    with tempfile.TemporaryDirectory() as tmp:
        pairs, n_pairs, train_prompts = tmp, 0, []
        if set(kinds) - {"dpo_guided"}:
            pairs, n_pairs = make_model_pairs(base, tmp, captions)
            train_prompts = [json.loads(line)["prompt"] for line in open(os.path.join(pairs, "pairs.jsonl"))]
        n_guided = 0
        if "dpo_guided" in kinds:
            # the winners drawn with the guide; its time counts as training time
            start = time.perf_counter()
            guided_pairs = os.path.join(tmp, "guided_pairs")
            os.makedirs(guided_pairs)
            n_guided = write_guided_pairs(
                base,
                guided_pairs,
                captions,
                [method_from_spec(args.guide)],
                num_inference_steps=25,
                guidance_scale=3.0,
            )
            guide_s = time.perf_counter() - start

        for kind in kinds:
            pipe = load_pipeline(args.start)
            pipe.set_progress_bar_config(disable=True)
            out_dir = os.path.join(tmp, kind)
            start = time.perf_counter()
            if kind in ("dpo", "dpo_guided"):
                config = DPOConfig(
                    max_steps=args.dpo_steps,
                    train_batch_size=8,
                    learning_rate=args.lr,
                    checkpointing_steps=args.dpo_steps,
                    output_dir=out_dir,
                )
                dataset = pairs if kind == "dpo" else guided_pairs
                trainer = DiffusionDPOTrainer(pipe, config, train_dataset=dataset)
            elif kind == "ddpo":
                config = DDPOConfig(
                    num_inference_steps=25,
                    guidance_scale=3.0,
                    max_steps=args.ddpo_steps,
                    train_batch_size=8,
                    learning_rate=args.lr,
                    clip_range=1e-4,
                    checkpointing_steps=args.ddpo_steps,
                    output_dir=out_dir,
                )
                trainer = DDPOTrainer(pipe, config, ShapesSoftVerifier(), train_prompts)
            else:
                config = RewardBackpropConfig(
                    mode="draft",
                    k=1,
                    num_inference_steps=25,
                    guidance_scale=3.0,
                    max_steps=args.draft_steps,
                    train_batch_size=8,
                    learning_rate=args.lr,
                    checkpointing_steps=args.draft_steps,
                    output_dir=out_dir,
                )
                trainer = RewardBackpropTrainer(pipe, config, ShapesSoftVerifier(), train_prompts)
            metrics = trainer.train()
            seconds = time.perf_counter() - start + (guide_s if kind == "dpo_guided" else 0.0)
            if args.save_lora and args.start == "sd":
                trainer.save_lora(os.path.join(args.save_lora, kind))
            elif args.save_lora:
                # this round adapts the tuned model's fused weights: stacked on the installed LoRA, it is one LoRA
                # of the base model
                folder = os.path.join(args.save_lora, kind)
                trainer.save_lora(os.path.join(folder, "round"))
                stack_loras([os.path.join(TUNED_DIR, "sd"), os.path.join(folder, "round")], folder)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            steps = {"draft": args.draft_steps, "ddpo": args.ddpo_steps}.get(kind, args.dpo_steps)
            label = f"{TRAINER_NAMES[kind]} LoRA ({steps} steps)"
            summary = run_eval(pipe, kind, **evaluation)
            rows.append(
                {
                    "run": label,
                    **summary,
                    "train_s": seconds,
                    "train_peak_rss_mb": peak,
                    "last_metrics": metrics,
                    "paired": paired(reference, summary["verdicts"]),
                }
            )
            print(rows[-1]["run"], rows[-1]["overall"], flush=True)

    guide = {}
    default_set = (args.eval_per_category, args.eval_seeds) == (20, 2)  # the method benchmark's prompts and seeds
    for name in ("reward_guidance", "best_of_4", "particle_steering_4") if default_set else ():
        path = os.path.join(suite_results("methods"), f"shapes_methods_{name}.json")
        if os.path.isfile(path):
            guide[name] = json.load(open(path))
    lines = [
        "| run | NFE / image | "
        + " | ".join(CATEGORIES)
        + " | overall (95% interval) | vs "
        + ("base" if args.start == "sd" else "start")
        + ": won / lost, p | training (s) |",
        "|" + "---|" * (len(CATEGORIES) + 5),
    ]
    for r in rows:
        cats = " | ".join(f"{100 * r['category_accuracy'][c]:.1f}" for c in CATEGORIES)
        low, high = r["intervals"]["overall"]
        p = r.get("paired")
        versus = f"{p['wins']} / {p['losses']}, {p['p_value']:.2g}" if p else "-"
        lines.append(
            f"| {r['run']} | 25 | {cats} | **{100 * r['overall']:.1f}** ({100 * low:.0f}-{100 * high:.0f}) | "
            f"{versus} | {r['train_s']:.0f} |"
        )
    for name, r in guide.items():
        cats = " | ".join(f"{100 * r['category_accuracy'][c]:.1f}" for c in CATEGORIES)
        lines.append(
            f"| guide: {name} (from shapes_methods_{name}) | {r['nfe_per_image']:.0f} | {cats} | "
            f"**{100 * r['overall']:.1f}** | - | 0 |"
        )
    command = "python benchmarks/train_shapes.py " + " ".join(sys.argv[1:])
    env = environment()
    markdown = (
        f"# Shapes world: train vs guide\n\n`{command}`\n\n"
        + (
            ""
            if args.start == "sd"
            else f"One more round from `{args.start}` (its LoRA trained by `{start_record.get('trained_by', '?')}`): "
            "pairs drawn from it, which is also the DPO reference. "
        )
        + f"Trainers {args.trainers}: "
        + (
            f"DPO on {n_pairs} verifier-labelled pairs of the base model's own samples (captions drawn with their "
            "own seed; the sampling time not counted); "
            if "dpo" in kinds
            else ""
        )
        + (
            "DRaFT-1 and DDPO (PPO, DDIM eta 1) on the soft verifier over the same captions; "
            if {"draft", "ddpo"} & set(kinds)
            else ""
        )
        + (
            f"DPO on guided winners: {n_guided} pairs whose winner is a verifier-passed image drawn with "
            f"`{args.guide}` (a plain one where none passed) and whose loser is a failed plain sample, its sampling "
            "time counted in its training time; "
            if n_guided
            else ""
        )
        + f"LoRA rank 8, batch 8, lr {args.lr}, {env['device']}. Evaluated at 1x NFE on "
        f"{6 * args.eval_per_category} prompts x {args.eval_seeds} images (25 DDIM steps, guidance 3.0), paired with "
        f"the {'base' if args.start == 'sd' else 'start'} model image by image (sign test)"
        + ("; the guide rows are the inference-time methods on the same prompts and seeds" if guide else "")
        + (
            ". Training captions are disjoint from the evaluation set (the grammar's single-object, colour and "
            "two-object captions all lie in it, so training sees counting, position and colour-attribution captions "
            "only)"
            if args.captions == "disjoint"
            else ". The shapes grammar is small: training captions repeat evaluation captions, with other noises"
        )
        + ".\n\n"
        + "\n".join(lines)
        + "\n"
    )
    data = {
        "benchmark": "training",
        "command": command,
        "captions": args.captions,
        "start": args.start,
        **({"start_trained_by": start_record.get("trained_by")} if start_record else {}),
        "captions_in_evaluation_set": sum(c in held_out for c in captions),
        "pairs": n_pairs,
        "guided_pairs": n_guided,
        "rows": rows,
        "environment": env,
    }
    write_results(args.name, json.loads(json.dumps(data, default=str)), markdown)
    print(markdown)


if __name__ == "__main__":
    main()
