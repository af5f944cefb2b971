"""Overhead of the aligned pipeline with no methods against its diffusers parent.

Both pipelines share the same tiny components and run interleaved in one process (parent, aligned, parent, ...),
so machine noise hits both alike. Reports the ratio of median wall times (target <= 1.02) and checks that the
images are identical.

    python benchmarks/overhead.py [--rounds 40] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from diffusers import StableDiffusionPipeline

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, write_results  # noqa: E402

from ttalign import AlignedStableDiffusionPipeline  # noqa: E402
from ttalign.testing import get_tiny_components  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)

    parent = StableDiffusionPipeline(**get_tiny_components())
    aligned = AlignedStableDiffusionPipeline.from_pipe(parent)
    pipes = {"diffusers": parent, "ttalign": aligned}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)

    def run(pipe):
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        images = pipe("a red circle left of a blue square", num_inference_steps=args.steps, output_type="pt",
                      generator=generator).images  # fmt: skip
        return time.perf_counter() - start, images

    for pipe in pipes.values():  # warm-up
        run(pipe)
    times = {name: [] for name in pipes}
    max_diff = 0.0
    for i in range(args.rounds):
        order = list(pipes) if i % 2 == 0 else list(reversed(pipes))
        images = {}
        for name in order:
            elapsed, images[name] = run(pipes[name])
            times[name].append(elapsed)
        max_diff = max(max_diff, (images["diffusers"] - images["ttalign"]).abs().max().item())

    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["ttalign"] / medians["diffusers"]
    data = {
        "benchmark": "overhead",
        "command": f"python benchmarks/overhead.py --rounds {args.rounds} --steps {args.steps}",
        "components": "ttalign.testing.get_tiny_components() (64x64 images, 32x32 latents)",
        "rounds": args.rounds,
        "steps": args.steps,
        "median_s": medians,
        "ratio": ratio,
        "target_ratio": 1.02,
        "max_abs_image_diff": max_diff,
        "environment": environment(),
    }
    markdown = (
        "# Overhead of the aligned pipeline without methods\n\n"
        f"`{data['command']}`: tiny components, {args.steps} steps, {args.rounds} interleaved rounds, CPU.\n\n"
        "| pipeline | median time (s) |\n|---|---|\n"
        f"| diffusers `StableDiffusionPipeline` | {medians['diffusers']:.4f} |\n"
        f"| ttalign `AlignedStableDiffusionPipeline` | {medians['ttalign']:.4f} |\n\n"
        f"Time ratio ttalign / diffusers: **{ratio:.3f}** (target <= 1.02). "
        f"Largest image difference: {max_diff:.1e}.\n"
    )
    write_results("overhead", data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
