"""Multiplies a saved LoRA's up projections by `--scale`. A LoRA trained with `lora_alpha` other than its rank and
saved before `LoRATrainer.save_lora` wrote the scale alpha / rank into the file was saved at 1 / scale of its trained
strength (diffusers loads a LoRA file at alpha = rank); `--scale alpha/rank` gives the model it trained.

    python benchmarks/rescale_lora.py --lora ttalign/shapes/tuned/flow --scale 2 --out benchmarks/.cache/rescaled/flow
"""

from __future__ import annotations

import argparse
import os

from common import recorded_trained_by
from safetensors import safe_open
from safetensors.torch import save_file

from ttalign.training.trainer import LORA_UP_KEYS as UP
from ttalign.training.trainer import LORA_WEIGHTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lora", required=True, help=f"a folder holding {LORA_WEIGHTS}")
    parser.add_argument("--scale", type=float, required=True, help="alpha / rank of the training run")
    parser.add_argument("--out", required=True, help="the folder to write the rescaled LoRA to")
    args = parser.parse_args()
    source = os.path.join(args.lora, LORA_WEIGHTS)
    if not os.path.isfile(source):
        raise SystemExit(f"--lora {args.lora!r} holds no {LORA_WEIGHTS}")
    if not args.scale > 0:
        raise SystemExit(f"--scale must be > 0, got {args.scale}")
    refuse_rescaled(args.lora)
    rescale(args.lora, args.scale, args.out)


def refuse_rescaled(folder: str) -> None:
    """Stops when the record beside the LoRA in `folder` says it was rescaled already: a scale chosen for the LoRA it
    came from would apply twice."""
    if "rescale" in recorded_trained_by(folder):
        raise SystemExit(f"the LoRA in {folder!r} was rescaled already (its training.json says so)")


def rescale(folder: str, scale: float, out: str) -> None:
    """Writes the LoRA in `folder` with its up projections times `scale` to `out` (written whole, then moved in)."""
    source = os.path.join(folder, LORA_WEIGHTS)
    with safe_open(source, "pt") as f:
        state = {k: f.get_tensor(k) * scale if k.endswith(UP) else f.get_tensor(k) for k in f.keys()}
    if not any(k.endswith(UP) for k in state):
        raise SystemExit(f"{source!r} has no up projections ({' or '.join(UP)})")
    os.makedirs(out, exist_ok=True)
    target = os.path.join(out, LORA_WEIGHTS)
    save_file(state, target + ".tmp", metadata={"format": "pt"})
    os.replace(target + ".tmp", target)
    print(f"wrote {target}: {sum(k.endswith(UP) for k in state)} up projections x {scale:g}")


if __name__ == "__main__":
    main()
