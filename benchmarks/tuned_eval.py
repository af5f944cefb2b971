"""The tuned shapes LoRAs on the whole evaluation set: verified success of the base model and of the base model with a
trained LoRA (240 prompts x 4 seeds, the exact verifier, 1x NFE, the same initial noise), per category, with the
paired sign test; with `--install`, the LoRA and its record go to `ttalign/shapes/tuned/<model>/`, where
`ttalign.shapes.load_pipeline("<model>-tuned")` loads them, unless the LoRA is worse than the base model overall or
no better than the LoRA installed there (its record's figure on the same evaluation; a record of another
evaluation is not compared, and nothing is installed).

    python benchmarks/tuned_eval.py --model sd --lora benchmarks/.cache/tuned/sd/raft \\
        --trained-by "python benchmarks/run.py tuned_loras --only sd" --install
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, recorded_trained_by, write_results  # noqa: E402

from ttalign.shapes import CATEGORIES, evaluation_prompts, load_pipeline, sampling_defaults  # noqa: E402
from ttalign.shapes.evaluate import evaluate, paired  # noqa: E402
from ttalign.shapes.models import TUNED_DIR, fuse_lora  # noqa: E402

LORA_FILE = "pytorch_lora_weights.safetensors"


def installed_record(folder: str) -> dict | None:
    """The evaluation record of the LoRA installed in `folder` (`base` and `tuned` summaries; None when there is
    none)."""
    try:
        with open(os.path.join(folder, "training.json")) as f:
            record = json.load(f)
        float(record["tuned"]["overall"]), record["base"]["category_accuracy"]
        return record
    except (OSError, KeyError, TypeError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd", "flow"), required=True)
    parser.add_argument("--lora", required=True, help=f"a folder holding {LORA_FILE}")
    parser.add_argument(
        "--trained-by",
        default="",
        help="the command that trained the LoRA, kept in its record (default: the `trained_by` of the folder's "
        "training.json)",
    )
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument(
        "--install",
        action="store_true",
        help=f"copy the LoRA to {TUNED_DIR}/<model>/ (unless worse than the base or than the one installed)",
    )
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.lora, LORA_FILE)):
        raise SystemExit(f"--lora {args.lora!r} holds no {LORA_FILE}")
    args.trained_by = args.trained_by or recorded_trained_by(args.lora)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    os.environ.setdefault("TTALIGN_QUIET", "1")
    prompts = evaluation_prompts(args.per_category)
    base = load_pipeline(args.model)
    base.set_progress_bar_config(disable=True)
    defaults = sampling_defaults(base)
    base_eval = evaluate(base, prompts, [], name="base", seeds=args.seeds, **defaults).summary()
    tuned = load_pipeline(args.model)
    tuned.set_progress_bar_config(disable=True)
    fuse_lora(tuned, args.lora)
    tuned_eval = evaluate(tuned, prompts, [], name="tuned", seeds=args.seeds, **defaults).summary()
    test = paired(base_eval["verdicts"], tuned_eval["verdicts"])
    rows = [("base model", base_eval), ("with the tuned LoRA", tuned_eval)]
    lines = [
        "| model | " + " | ".join(CATEGORIES) + " | overall |",
        "|" + "---|" * (len(CATEGORIES) + 2),
    ] + [
        f"| {label} | "
        + " | ".join(f"{100 * s['category_accuracy'][c]:.1f}" for c in CATEGORIES)
        + f" | **{100 * s['overall']:.1f}** |"
        for label, s in rows
    ]
    below = [c for c in CATEGORIES if tuned_eval["category_accuracy"][c] < base_eval["category_accuracy"][c]]
    command = shlex.join(["python", "benchmarks/tuned_eval.py", *sys.argv[1:]])
    markdown = (
        f"# The tuned {args.model} shapes LoRA on the evaluation set\n\n`{command}`\n\n"
        f"Trained by `{args.trained_by or 'not recorded'}`. Evaluation: {len(prompts)} prompts x {args.seeds} seeds, "
        "1x NFE, the exact verifier, the same initial noise for both rows.\n\n"
        + "\n".join(lines)
        + f"\n\nPaired: {test['wins']} images fail -> pass, {test['losses']} pass -> fail, sign test "
        f"p = {test['p_value']:.3g}. Categories below the base: {', '.join(below) or 'none'}.\n"
    )
    name = args.name or f"tuned_{args.model}_eval"
    record = {
        "benchmark": "tuned_eval",
        "command": command,
        "trained_by": args.trained_by,
        "base": {k: v for k, v in base_eval.items() if k != "verdicts"},
        "tuned": {k: v for k, v in tuned_eval.items() if k != "verdicts"},
        "paired": test,
        "categories_below_base": below,
        "environment": environment(),
    }
    write_results(name, record, markdown)
    target = os.path.join(TUNED_DIR, args.model)
    installed = installed_record(target)
    # the base model's figures are a deterministic function of the evaluation (prompts, seeds, noise, verifier): equal
    # figures and image counts mean the installed LoRA was evaluated as this one was
    same_evaluation = installed is not None and all(
        installed["base"].get(k) == record["base"][k] for k in ("category_accuracy", "images")
    )
    if args.install and tuned_eval["overall"] < base_eval["overall"]:
        print(
            f"not installed: the LoRA is worse than the base model ({100 * tuned_eval['overall']:.1f} < "
            f"{100 * base_eval['overall']:.1f})"
        )
    elif args.install and installed is not None and not same_evaluation:
        print(
            f"not installed: the LoRA installed in {target} was evaluated on another set (its base model's figures "
            "differ); evaluate with the settings of its record or remove it"
        )
    elif args.install and installed is not None and tuned_eval["overall"] <= installed["tuned"]["overall"]:
        print(
            f"not installed: the installed LoRA scores as well or better on the same evaluation "
            f"({100 * installed['tuned']['overall']:.1f} >= {100 * tuned_eval['overall']:.1f})"
        )
    elif args.install:
        os.makedirs(TUNED_DIR, exist_ok=True)
        staged = tempfile.mkdtemp(dir=TUNED_DIR, prefix=".staging-")  # written whole, then moved in place
        try:
            shutil.copy(os.path.join(args.lora, LORA_FILE), os.path.join(staged, LORA_FILE))
            with open(os.path.join(staged, "training.json"), "w") as f:
                json.dump({k: record[k] for k in ("trained_by", "base", "tuned", "paired")}, f, indent=1)
            for entry in os.listdir(staged):
                os.chmod(os.path.join(staged, entry), 0o644)
            os.chmod(staged, 0o755)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.rename(staged, target)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        print(f"installed {target}")
    print(markdown)


if __name__ == "__main__":
    main()
