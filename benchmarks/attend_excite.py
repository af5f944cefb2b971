"""Attend-and-Excite: ttalign's batched method against diffusers' deprecated `StableDiffusionAttendAndExcitePipeline`
on the same components, seed and settings: time, peak memory, and the largest difference between their images; and
what ttalign's A&E costs over the plain call of the same pipeline.

Each side runs in a fresh process (peak memory: `torch.cuda.max_memory_allocated` on CUDA, else the growth of the
process's peak resident memory over the loaded pipeline, taken in a second run with glibc's mmap threshold fixed:
`common.run_sides`).
Writes `benchmarks/results/<name>.json` and `.md`.

`--layout tiny` uses diffusers' test sizes (one attention resolution); `--layout sd` uses Stable Diffusion 1.x's UNet
and VAE layout at a tiny width (attention at four resolutions, 512 px images, A&E on the 16x16 maps as in SD), where
recording maps only at the needed resolution matters.

    python benchmarks/attend_excite.py --size 128 --steps 8 --prompts 4
    python benchmarks/attend_excite.py --layout sd --size 512 --steps 8 --prompts 2 --name attend_excite_sd
"""

from __future__ import annotations

import argparse
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
INDICES = [[2, 5], [3, 6], [2, 5], [2, 5]]


def _describe(args) -> str:
    if args.layout == "tiny":
        return "Tiny components (diffusers' test sizes, one attention resolution)"
    latent = args.size // 8
    sides = ", ".join(str(latent // 2**k) for k in range(3))
    return f"Components in Stable Diffusion 1.x's layout at a tiny width (attention at {sides} and {latent // 8} px)"


def _peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _attn_res(args) -> int:
    """The side of the maps A&E uses: the tiny UNet's one attention level (latents / 2), SD's 16x16 (latents / 4)."""
    return args.size // 4 if args.layout == "tiny" else args.size // 32


def run_one(side: str, args, out_path: str) -> dict:
    from ttalign import AlignedStableDiffusionPipeline
    from ttalign.methods import AttendAndExcite
    from ttalign.testing import get_tiny_components

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    components = {k: v for k, v in get_tiny_components(layout=args.layout).items() if k != "image_encoder"}
    if side == "reference":
        from diffusers import StableDiffusionAttendAndExcitePipeline

        pipe = StableDiffusionAttendAndExcitePipeline(**components)
    else:
        pipe = AlignedStableDiffusionPipeline(**components, image_encoder=None)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts, indices = PROMPTS[: args.prompts], INDICES[: args.prompts]
    settings = {
        "max_iter_to_alter": args.steps // 2,
        "thresholds": {0: 0.05, args.steps // 4: 0.5},
        "scale_factor": 20,
        "attn_res": (_attn_res(args), _attn_res(args)),
    }
    call = {
        "num_inference_steps": args.steps,
        "guidance_scale": 7.5,
        "height": args.size,
        "width": args.size,
        "output_type": "np",
        "generator": torch.Generator(args.device).manual_seed(0),
    }
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _peak(args.device) if args.device != "cuda" else torch.cuda.memory_allocated() / 2**20
    start = time.perf_counter()
    if side == "reference":
        images = pipe(prompts, token_indices=indices, **call, **settings).images
    elif side == "plain":
        images = pipe(prompts, **call).images
    else:
        method = AttendAndExcite(token_indices=indices, gradient_checkpointing=side != "ttalign_kept", **settings)
        images = pipe(prompts, alignment=[method], **call).images
    seconds = time.perf_counter() - start
    np.save(out_path, images)
    return {"side": side, "seconds": seconds, "peak_added_mb": _peak(args.device) - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=("tiny", "sd"), default="tiny", help="component layout (see above)")
    parser.add_argument("--size", type=int, default=128, help="image size (VAE: 2x for tiny, 8x for sd)")
    parser.add_argument("--name", default="attend_excite", help="results file name")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every side; the table quotes their medians")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--kept", action="store_true", help="also ttalign's A&E without the loss passes' gradient checkpointing"
    )
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args, args.one[1])))
        return
    argv = sys.argv[1:]
    if "--repeat" in argv:  # each side runs once per repeat
        at = argv.index("--repeat")
        argv = argv[:at] + argv[at + 2 :]
    runs, diff, kept_diff = [], 0.0, 0.0
    sides = ("reference", "ttalign", "plain") + (("ttalign_kept",) if args.kept else ())
    for _ in range(args.repeat):  # each repeat runs every side, each in a fresh process
        rows, images = run_sides(__file__, sides, argv)
        diff = max(diff, float(np.abs(images["reference"] - images["ttalign"]).max()))
        ref, ours, plain = rows[:3]
        run = {
            "rows": rows,
            "speedup": ref["seconds"] / ours["seconds"],
            "memory_ratio": ref["peak_added_mb"] / max(ours["peak_added_mb"], 1e-6),
            "time_vs_plain": ours["seconds"] / plain["seconds"],
            "memory_vs_plain": ours["peak_added_mb"] / max(plain["peak_added_mb"], 1e-6),
        }
        if args.kept:
            kept_diff = max(kept_diff, float(np.abs(images["ttalign_kept"] - images["ttalign"]).max()))
            run["kept_time_vs_plain"] = rows[3]["seconds"] / plain["seconds"]
            run["kept_memory_vs_plain"] = rows[3]["peak_added_mb"] / max(plain["peak_added_mb"], 1e-6)
        runs.append(run)
    keys = ("speedup", "memory_ratio", "time_vs_plain", "memory_vs_plain")
    keys += ("kept_time_vs_plain", "kept_memory_vs_plain") if args.kept else ()
    median = {key: float(np.median([r[key] for r in runs])) for key in keys}
    ref_s, ours_s, plain_s = (float(np.median([r["rows"][k]["seconds"] for r in runs])) for k in (0, 1, 2))
    ref_mb, ours_mb, plain_mb = (float(np.median([r["rows"][k]["peak_added_mb"] for r in runs])) for k in (0, 1, 2))
    kept_row, kept_text = "", ""
    if args.kept:
        kept_s, kept_mb = (float(np.median([r["rows"][3][key] for r in runs])) for key in ("seconds", "peak_added_mb"))
        kept_row = f"| ttalign `AttendAndExcite(gradient_checkpointing=False)` | {kept_s:.1f} | {kept_mb:.0f} |\n"
        kept_text = (
            f" Without the loss passes' gradient checkpointing: {median['kept_time_vs_plain']:.2f}x the time and "
            f"{median['kept_memory_vs_plain']:.2f}x the memory of the plain call, images within {kept_diff:.1e} of "
            "the checkpointed ones."
        )
    command = "python benchmarks/attend_excite.py " + " ".join(sys.argv[1:])
    env = environment()
    each = ", ".join(f"{r['speedup']:.2f}x / {r['memory_ratio']:.2f}x" for r in runs)
    markdown = (
        f"# Attend-and-Excite against diffusers' deprecated pipeline\n\n`{command}`\n\n"
        f"{_describe(args)}, {args.prompts} prompts, {args.size}x{args.size} images, "
        f"{args.steps} DDIM steps, guidance 7.5, A&E on the {_attn_res(args)}x{_attn_res(args)} cross-attention maps, "
        f"refinement at steps 0 and {args.steps // 4}, {env['device']}; {args.repeat} run(s) of each side.\n\n"
        "| pipeline | time (s) | peak memory added (MB) |\n|---|---|---|\n"
        f"| diffusers `StableDiffusionAttendAndExcitePipeline` | {ref_s:.1f} | {ref_mb:.0f} |\n"
        f"| ttalign `AttendAndExcite` | {ours_s:.1f} | {ours_mb:.0f} |\n"
        f"{kept_row}"
        f"| the plain call (no A&E) | {plain_s:.1f} | {plain_mb:.0f} |\n\n"
        f"Speed-up **{median['speedup']:.2f}x**, memory **{median['memory_ratio']:.2f}x** less (medians of the "
        f"per-run ratios; each run, time / memory: {each}); largest image difference {diff:.1e} (same images). "
        f"ttalign's A&E costs **{median['time_vs_plain']:.2f}x** the time and **{median['memory_vs_plain']:.2f}x** "
        f"the peak memory of the plain call (medians).{kept_text}\n"
    )
    data = {
        "benchmark": "attend_excite",
        "command": command,
        "layout": args.layout,
        "runs": runs,
        "median_speedup": median["speedup"],
        "median_memory_ratio": median["memory_ratio"],
        "median_time_vs_plain": median["time_vs_plain"],
        "median_memory_vs_plain": median["memory_vs_plain"],
        "max_abs_diff": diff,
        **(
            {"median_kept_time_vs_plain": median["kept_time_vs_plain"], "kept_max_abs_diff": kept_diff}
            if args.kept
            else {}
        ),
        **({"median_kept_memory_vs_plain": median["kept_memory_vs_plain"]} if args.kept else {}),
        "environment": env,
    }
    write_results(args.name, data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
