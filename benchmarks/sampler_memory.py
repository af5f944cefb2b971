"""Peak memory and time of a backward pass through the differentiable sampler, with and without per-step gradient
checkpointing, on the shapes model.

Each configuration runs in a fresh process. On CUDA the figure is `torch.cuda.max_memory_allocated`; on CPU it is
the growth of the process's peak resident memory over the loaded, warmed-up pipeline (what the backward pass
added). Writes `benchmarks/results/sampler_memory/sampler_memory.json` and `.md`.

    python benchmarks/sampler_memory.py --steps 10 25 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_results  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(steps: int, batch: int, checkpointing: bool, device: str) -> dict:
    from ttalign.sampler import DifferentiableSampler
    from ttalign.shapes import ShapesSoftVerifier, load_pipeline

    torch.set_num_threads(2)
    pipe = load_pipeline().to(device)
    reward = ShapesSoftVerifier().to(device)
    pipe.scheduler.set_timesteps(steps, device=device)
    prompts = ["two red circles left of a blue square"] * batch
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, device, 1, True)
    sampler = DifferentiableSampler(pipe, cond, uncond, guidance_scale=3.0, gradient_checkpointing=checkpointing)
    z = torch.randn(batch, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():  # warm-up: allocator pools and kernels, so that only the backward's memory is measured
        sampler.decode(sampler.sample(z))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _peak_mb()
    z.requires_grad_()
    start = time.perf_counter()
    reward(sampler.decode(sampler.sample(z)), prompts).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_mb()
    return {
        "steps": steps,
        "batch": batch,
        "checkpointing": checkpointing,
        "seconds": time.perf_counter() - start,
        "peak_added_mb": peak - before,
        "grad_norm": float(z.grad.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("STEPS", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.batch, args.one[1] == "1", args.device)))
        return

    rows = []
    for steps in args.steps:
        for checkpointing in (False, True):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                str(steps),
                str(int(checkpointing)),
                "--batch",
                str(args.batch),
                "--device",
                args.device,
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = ["| steps | checkpointing | peak memory added (MB) | forward + backward time (s) |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['steps']} | {'yes' if row['checkpointing'] else 'no'} | {row['peak_added_mb']:.0f} | "
            f"{row['seconds']:.1f} |"
        )
    ratios = []
    for steps in args.steps:
        plain, ckpt = (next(r for r in rows if r["steps"] == steps and r["checkpointing"] == c) for c in (False, True))
        ratios.append(
            f"- {steps} steps: checkpointing uses {plain['peak_added_mb'] / max(ckpt['peak_added_mb'], 1e-6):.1f}x "
            f"less memory, at {ckpt['seconds'] / plain['seconds']:.2f}x the time; same gradient "
            f"(norms {plain['grad_norm']:.4g} / {ckpt['grad_norm']:.4g})."
        )
    command = "python benchmarks/sampler_memory.py " + " ".join(sys.argv[1:])
    env = environment()
    markdown = (
        f"# Differentiable sampler: memory with and without gradient checkpointing\n\n`{command}`\n\n"
        f"Shapes model, batch {args.batch}, soft-verifier reward, one forward + backward through every step and the "
        f"VAE decode, {env['device']}. Memory: growth of the peak over the warmed-up pipeline "
        f"({'CUDA allocator' if args.device == 'cuda' else 'process peak RSS'}).\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(ratios)
        + "\n"
    )
    write_results(
        "sampler_memory",
        {"benchmark": "sampler_memory", "command": command, "rows": rows, "environment": env},
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
