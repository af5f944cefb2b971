"""Attend-and-Excite on joint attention (SD3, FLUX): time and peak memory of the call with the method against the
plain call of the same pipeline.

Components in SD3-medium's layout (`ttalign.testing.get_tiny_sd3_components(layout="sd3")`: 24 joint blocks, 2x2
patches, an 8x VAE, 16 latent channels) or FLUX.1's (`get_tiny_flux_components(layout="flux")`: 19 double- and 38
single-stream blocks, packed 2x2 latents, the dev guidance embedding), each at a tiny width. No A&E port exists for
SD3 or FLUX (REFERENCES.md), so the comparison is against the plain call: what the method costs. The stock
processors use SDPA; a layer takes the explicit path (counted) only while A&E records maps (the conditional forward
of each altered step) and every other call keeps SDPA. The maps are the image queries' attention over the text keys,
with the softmax over all joint keys.

Each side runs in a fresh process (peak memory: `torch.cuda.max_memory_allocated` on CUDA, else the growth of the
process's peak resident memory over the loaded pipeline, taken in a second run with glibc's mmap threshold fixed:
`common.run_sides`).
Sides: the plain call; A&E as it ships (lean capture, checkpointed loss passes); without the checkpointing; and on the
explicit path (the whole joint score matrix, no checkpointing: the path before the lean capture).
Writes `benchmarks/results/<name>.json` and `.md`.

    python benchmarks/attend_excite_flow.py --family sd3 --size 512 --steps 4 --prompts 2
    python benchmarks/attend_excite_flow.py --family flux --size 512 --steps 4 --prompts 2
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
LAYOUTS = {"sd3": "SD3-medium", "flux": "FLUX.1"}


def _peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(side: str, args, out_path: str) -> dict:
    from ttalign.methods import AttendAndExcite
    from ttalign.pipelines.joint_attention import JointControlProcessor
    from ttalign.testing import get_tiny_flux_pipeline, get_tiny_sd3_pipeline

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.family == "sd3":
        pipe = get_tiny_sd3_pipeline(layout="sd3", shift=3.0)
        call = {"guidance_scale": 7.0}
    else:
        pipe = get_tiny_flux_pipeline(layout="flux", guidance_embeds=True)
        call = {"guidance_scale": 3.5}
    pipe = pipe.to(args.device, dtype)
    prompts = PROMPTS[: args.prompts]
    subjects = dict(zip(prompts, SUBJECTS))
    method = AttendAndExcite(
        tokens=lambda p: subjects[p],
        max_iter_to_alter=max(1, args.steps // 2),
        thresholds={0: 0.05, max(1, args.steps // 4): 0.5},
    )
    explicit = collections.Counter()
    original = JointControlProcessor._attend

    def counting(self, query, *rest):
        explicit[self.part] += 1
        return original(self, query, *rest)

    JointControlProcessor._attend = counting
    call.update(
        num_inference_steps=args.steps,
        height=args.size,
        width=args.size,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _peak(args.device) if args.device != "cuda" else torch.cuda.memory_allocated() / 2**20
    start = time.perf_counter()
    # `explicit`: the path before the lean capture (the whole joint score matrix, no checkpointing)
    method.gradient_checkpointing = side == "attend_and_excite"
    JointControlProcessor.lean = side != "attend_and_excite_explicit"
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
        (grid,) = pipe.family.cross_attention_resolutions(*pipe.family.latent_grid(args.size, args.size))
        row["maps"] = f"{grid[0]}x{grid[1]}"
        row["image_tokens"] = grid[0] * grid[1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(LAYOUTS), default="sd3")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--name", default=None, help="default: attend_excite_<family>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args, args.one[1])))
        return
    sides = ("plain", "attend_and_excite", "attend_and_excite_kept", "attend_and_excite_explicit")
    rows, images = run_sides(__file__, sides, sys.argv[1:])
    plain, ae, kept, explicit = rows
    same = float(np.abs(images["attend_and_excite"] - images["attend_and_excite_kept"]).max())
    same_explicit = float(np.abs(images["attend_and_excite"] - images["attend_and_excite_explicit"]).max())
    change = float(np.abs(images["plain"] - images["attend_and_excite"]).max())
    command = "python benchmarks/attend_excite_flow.py " + " ".join(sys.argv[1:])
    env = environment()
    layers = ", ".join(f"{k}: {v}" for k, v in sorted(ae["explicit_layer_calls"].items()))
    name = {"sd3": "Stable Diffusion 3", "flux": "FLUX"}[args.family]
    markdown = (
        f"# Attend-and-Excite on {name}'s joint attention\n\n`{command}`\n\n"
        f"Components in {LAYOUTS[args.family]}'s layout at a tiny width, {args.prompts} prompts, "
        f"{args.size}x{args.size} images ({ae['image_tokens']} image tokens), {args.steps} flow-matching Euler steps, "
        f"{args.dtype}, {env['device']}; A&E with its defaults scaled to {args.steps} steps (alter "
        f"{max(1, args.steps // 2)}), maps at {ae['maps']}.\n\n"
        "| call | time (s) | peak memory added (MB) | NFE |\n|---|---|---|---|\n"
        f"| plain call | {plain['seconds']:.1f} | {plain['peak_added_mb']:.0f} | {plain['nfe']} |\n"
        f"| with `AttendAndExcite` | {ae['seconds']:.1f} | {ae['peak_added_mb']:.0f} | {ae['nfe']} |\n"
        f"| with `AttendAndExcite(gradient_checkpointing=False)` | {kept['seconds']:.1f} | "
        f"{kept['peak_added_mb']:.0f} | {kept['nfe']} |\n"
        f"| the same on the explicit path (whole joint score matrix) | {explicit['seconds']:.1f} | "
        f"{explicit['peak_added_mb']:.0f} | {explicit['nfe']} |\n\n"
        f"A&E costs **{ae['seconds'] / plain['seconds']:.2f}x** the time and "
        f"**{ae['peak_added_mb'] / max(plain['peak_added_mb'], 1e-6):.2f}x** the peak memory of the plain call. "
        f"Layer calls on the explicit path (block kind: calls): {layers}; every other call kept SDPA. "
        f"A&E loss per image at the first step {[round(v, 3) for v in ae['loss_first_step']]}, at the last altered "
        f"step {[round(v, 3) for v in ae['loss_last_altered_step']]}; largest change of the images {change:.1e}. "
        f"Without the loss passes' gradient checkpointing: {kept['seconds'] / plain['seconds']:.2f}x the time and "
        f"{kept['peak_added_mb'] / max(plain['peak_added_mb'], 1e-6):.2f}x the memory, images within {same:.1e} of "
        f"the checkpointed ones. On the explicit path, as before the lean capture: "
        f"{explicit['seconds'] / plain['seconds']:.2f}x the time and "
        f"{explicit['peak_added_mb'] / max(plain['peak_added_mb'], 1e-6):.2f}x the memory, images within "
        f"{same_explicit:.1e}; the default's time is **{ae['seconds'] / explicit['seconds']:.2f}x** the explicit "
        "path's.\n"
    )
    write_results(
        args.name or f"attend_excite_{args.family}",
        {
            "benchmark": "attend_excite_flow",
            "command": command,
            "rows": rows,
            "max_abs_image_change": change,
            "checkpointing_image_difference": same,
            "explicit_image_difference": same_explicit,
            "environment": env,
        },
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
