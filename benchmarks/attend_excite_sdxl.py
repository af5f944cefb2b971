"""Attend-and-Excite on SDXL's layout: time and peak memory of the call with the method against the plain SDXL call.

Components in SDXL's UNet layout at a tiny width (`ttalign.testing.get_tiny_sdxl_components(layout="sdxl")`: three
levels, cross-attention at the second and third with 1, 2 and 10 transformer layers per block, so 10 cross-attention
layers at 64x64 and 60 at 32x32 for 1024 px images; an 8x VAE). There is no reference implementation of A&E for SDXL
in diffusers, so the comparison is against the plain call of the same pipeline: what the method costs. The maps'
resolution is the family's choice (32x32 at 1024 px); only the cross-attention layers at that resolution take the
explicit path (counted), every other layer keeps SDPA.

Each side runs in a fresh process (peak memory: `torch.cuda.max_memory_allocated` on CUDA, else the growth of the
process's peak resident memory over the loaded pipeline, taken in a second run with glibc's mmap threshold fixed:
`common.run_sides`).
Writes `benchmarks/results/<name>.json` and `.md`.

    python benchmarks/attend_excite_sdxl.py --size 1024 --steps 4 --prompts 2
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, run_sides, write_results  # noqa: E402

PROMPTS = ["a cat and a dog", "a red car and a tree", "a bird and a house", "a horse and a boat"]
SUBJECTS = [["cat", "dog"], ["car", "tree"], ["bird", "house"], ["horse", "boat"]]


def _peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(side: str, args, out_path: str) -> dict:
    from ttalign.methods import AttendAndExcite
    from ttalign.pipelines.stable_diffusion import ControlProcessor
    from ttalign.testing import get_tiny_sdxl_pipeline

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pipe = get_tiny_sdxl_pipeline("ddim", layout=args.layout).to(args.device, dtype)
    prompts = PROMPTS[: args.prompts]
    subjects = dict(zip(prompts, SUBJECTS))
    method = AttendAndExcite(
        tokens=lambda p: subjects[p],
        max_iter_to_alter=max(1, args.steps // 2),
        thresholds={0: 0.05, max(1, args.steps // 4): 0.5},
    )
    explicit = collections.Counter()
    original = ControlProcessor.explicit

    def counting(attn, hidden_states, *rest):
        explicit[int(hidden_states.shape[1] ** 0.5)] += 1
        return original(attn, hidden_states, *rest)

    ControlProcessor.explicit = staticmethod(counting)
    call = {
        "num_inference_steps": args.steps,
        "guidance_scale": 5.0,
        "height": args.size,
        "width": args.size,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(0),
    }
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _peak(args.device) if args.device != "cuda" else torch.cuda.memory_allocated() / 2**20
    start = time.perf_counter()
    method.gradient_checkpointing = side != "attend_and_excite_kept"
    out = pipe(prompts, alignment=[] if side == "plain" else [method], **call)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    np.save(out_path, out.images)
    row = {
        "side": side,
        "seconds": seconds,
        "peak_added_mb": _peak(args.device) - before,
        "nfe": out.traces["compute"]["nfe"],
        "explicit_layer_calls": dict(explicit),
    }
    if side != "plain":
        trace = out.traces["attend_and_excite"]
        row["loss_first_step"] = [float(v) for v in trace["losses"][0]]
        row["loss_last_altered_step"] = [float(v) for v in trace["losses"][-1]]
        row["maps"] = f"{args.size // 32}x{args.size // 32}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=("tiny", "sdxl"), default="sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--name", default="attend_excite_sdxl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args, args.one[1])))
        return
    rows, images = run_sides(__file__, ("plain", "attend_and_excite", "attend_and_excite_kept"), sys.argv[1:])
    plain, ae, kept = rows
    same = float(np.abs(images["attend_and_excite"] - images["attend_and_excite_kept"]).max())
    change = float(np.abs(images["plain"] - images["attend_and_excite"]).max())
    command = "python benchmarks/attend_excite_sdxl.py " + " ".join(sys.argv[1:])
    env = environment()
    layers = ", ".join(f"{k}x{k}: {v}" for k, v in sorted(ae["explicit_layer_calls"].items()))
    markdown = (
        f"# Attend-and-Excite on SDXL's layout\n\n`{command}`\n\n"
        f"Components in SDXL's layout at a tiny width ({args.layout}), {args.prompts} prompts, "
        f"{args.size}x{args.size} images, {args.steps} DDIM steps, guidance 5.0, {args.dtype}, {env['device']}; "
        f"A&E with its defaults scaled to {args.steps} steps (alter {max(1, args.steps // 2)}), "
        f"maps at {ae['maps']} chosen from the UNet.\n\n"
        "| call | time (s) | peak memory added (MB) | NFE |\n|---|---|---|---|\n"
        f"| plain SDXL call | {plain['seconds']:.1f} | {plain['peak_added_mb']:.0f} | {plain['nfe']} |\n"
        f"| with `AttendAndExcite` | {ae['seconds']:.1f} | {ae['peak_added_mb']:.0f} | {ae['nfe']} |\n"
        f"| with `AttendAndExcite(gradient_checkpointing=False)` | {kept['seconds']:.1f} | "
        f"{kept['peak_added_mb']:.0f} | {kept['nfe']} |\n\n"
        f"A&E costs **{ae['seconds'] / plain['seconds']:.2f}x** the time and "
        f"**{ae['peak_added_mb'] / max(plain['peak_added_mb'], 1e-6):.2f}x** the peak memory of the plain call. "
        f"Layer calls on the explicit path (map side: calls): {layers}; no other layer left SDPA. "
        f"A&E loss per image at the first step {[round(v, 3) for v in ae['loss_first_step']]}, at the last altered "
        f"step {[round(v, 3) for v in ae['loss_last_altered_step']]}; largest change of the images {change:.1e}. "
        f"Without the loss passes' gradient checkpointing: {kept['seconds'] / plain['seconds']:.2f}x the time and "
        f"{kept['peak_added_mb'] / max(plain['peak_added_mb'], 1e-6):.2f}x the memory, images within {same:.1e} of "
        "the checkpointed ones.\n"
    )
    write_results(
        args.name,
        {
            "benchmark": "attend_excite_sdxl",
            "command": command,
            "rows": rows,
            "max_abs_image_change": change,
            "checkpointing_image_difference": same,
            "environment": env,
        },
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
