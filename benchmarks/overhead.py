"""Overhead of the aligned pipeline with no methods against its diffusers parent.

Both pipelines share the same tiny components and run interleaved in one process (parent, aligned, parent, ...),
so machine noise hits both alike. Reports the ratio of median wall times (target <= 1.02) and checks that the
images are identical. `--family sdxl | sd3 | flux` compares the aligned SDXL, SD3 or FLUX pipeline with its parent on
the tiny components of that family (diffusers' own test sizes; FLUX with the guidance embedding of FLUX.1-dev).

    python benchmarks/overhead.py [--rounds 40] [--steps 10] [--family sd | sdxl | sd3 | flux]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, write_results  # noqa: E402

from ttalign import (  # noqa: E402
    AlignedFluxPipeline,
    AlignedStableDiffusion3Pipeline,
    AlignedStableDiffusionPipeline,
    AlignedStableDiffusionXLPipeline,
)
from ttalign.testing import (  # noqa: E402
    get_tiny_components,
    get_tiny_flux_components,
    get_tiny_sd3_components,
    get_tiny_sdxl_components,
)

FAMILIES = {
    "sd": (
        StableDiffusionPipeline,
        AlignedStableDiffusionPipeline,
        get_tiny_components,
        {},
        "overhead",
        "ttalign.testing.get_tiny_components() (64x64 images, 32x32 latents)",
    ),
    "sdxl": (
        StableDiffusionXLPipeline,
        AlignedStableDiffusionXLPipeline,
        get_tiny_sdxl_components,
        {"add_watermarker": False},
        "overhead_sdxl",
        "ttalign.testing.get_tiny_sdxl_components() (diffusers' SDXL test sizes; 64x64 images, 32x32 latents)",
    ),
    "sd3": (
        StableDiffusion3Pipeline,
        AlignedStableDiffusion3Pipeline,
        lambda: get_tiny_sd3_components(shift=3.0),
        {},
        "overhead_sd3",
        "ttalign.testing.get_tiny_sd3_components(shift=3.0) (diffusers' SD3 test sizes; 64x64 "
        "images, 64x64 latents, 4096 image + 333 text tokens)",
    ),
    "flux": (
        FluxPipeline,
        AlignedFluxPipeline,
        lambda: get_tiny_flux_components(guidance_embeds=True),
        {},
        "overhead_flux",
        "ttalign.testing.get_tiny_flux_components(guidance_embeds=True) (diffusers' FLUX test "
        "sizes; 64x64 images, 1024 packed image + 512 text tokens)",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd")
    args = parser.parse_args()
    torch.set_num_threads(2)

    parent_cls, aligned_cls, components, extra, results_name, described = FAMILIES[args.family]
    parent = parent_cls(**components(), **extra)
    aligned = aligned_cls.from_pipe(parent)
    pipes = {"diffusers": parent, "ttalign": aligned}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)

    def run(pipe):
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        images = pipe(
            "a red circle left of a blue square",
            num_inference_steps=args.steps,
            output_type="pt",
            height=64,
            width=64,
            generator=generator,
        ).images
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
    # paired: the ratio of the two calls of each round, whose machine state they share; its median over the rounds
    ratios = sorted(a / d for a, d in zip(times["ttalign"], times["diffusers"]))
    ratio = statistics.median(ratios)
    quartiles = (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4])
    family = "" if args.family == "sd" else f" --family {args.family}"
    data = {
        "benchmark": results_name,
        "command": f"python benchmarks/overhead.py --rounds {args.rounds} --steps {args.steps}{family}",
        "components": described,
        "rounds": args.rounds,
        "steps": args.steps,
        "median_s": medians,
        "ratio": ratio,
        "ratio_of_medians": medians["ttalign"] / medians["diffusers"],
        "ratio_quartiles": quartiles,
        "target_ratio": 1.02,
        "max_abs_image_diff": max_diff,
        "environment": environment(),
    }
    markdown = (
        "# Overhead of the aligned pipeline without methods\n\n"
        f"`{data['command']}`: {described}, {args.steps} steps, {args.rounds} interleaved rounds, "
        f"{data['environment']['device']}.\n\n"
        "| pipeline | median time (s) |\n|---|---|\n"
        f"| diffusers `{parent_cls.__name__}` | {medians['diffusers']:.4f} |\n"
        f"| ttalign `{aligned_cls.__name__}` | {medians['ttalign']:.4f} |\n\n"
        f"Time ratio ttalign / diffusers, median of the {args.rounds} paired rounds: **{ratio:.3f}** (quartiles "
        f"{quartiles[0]:.3f} to {quartiles[1]:.3f}; target <= 1.02). "
        f"Largest image difference: {max_diff:.1e}.\n"
    )
    write_results(results_name, data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
