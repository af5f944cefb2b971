"""Costs at real model widths: every method's time and peak memory against the plain call, on Stable Diffusion 1.5,
SDXL, SD3.5-Medium and FLUX.1-dev built from their published configurations with random weights, in the precision
people run them.

Each family's denoiser, VAE and text encoders have the widths and layouts of the published checkpoints'
`config.json` files (written out below). Where this machine cannot hold or run a whole model, the depth is reduced and
the report says so: by default on CPU, FLUX.1 keeps `--flux-double` double-stream and `--flux-single` single-stream
blocks of its 19 + 38 (at full width), and the T5-XXL encoder of SD3.5 and FLUX keeps `--t5-layers` of its 24 layers
(text encoding happens once per call, for the plain call and the methods alike). `--full` builds everything at full
depth (a GPU). The tokenizers are built locally (`ttalign.testing`); the weights are random, so the images mean
nothing, only the costs do.

The methods are those of the runtime-feature matrix (`ttalign.compat`) with a cheap differentiable reward (the red
channel's mean, so the reward's own cost is nil), at settings scaled to `--steps`: best-of-2, particle steering with 2
particles resampled at every step, reward guidance, noise optimization with one iteration (`blocks`: with
`gradient_checkpointing="blocks"`, the denoiser's blocks checkpointed inside each step), Attend-and-Excite on the
subject words (altering the first half of the steps, thresholds at step 0 and at a quarter of the steps, at most
`--refinements` refinement iterations; `attend and excite kept`: the same without the loss passes' gradient
checkpointing), and region re-weighting.

Each family runs in its own process: the pipeline is built once, warmed with a one-step call, then each method is
called once on `--prompts` prompts. Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the memory allocated
before the call; on CPU the highest resident set size seen by a thread polling `/proc/self/statm` every 2 ms, over
the size before the call (the process runs with glibc's `MALLOC_MMAP_THRESHOLD_=65536`, so that every tensor freed
goes back to the system and the resident size follows the live tensors). Writes
`benchmarks/results/<name>.json` and `.md`.

    python benchmarks/real_width.py --size 256 --steps 4    # CPU: reduced resolution, FLUX.1 and T5 reduced in depth
    python benchmarks/real_width.py --full --device cuda    # GPU: every model whole, at its native resolution
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_results  # noqa: E402

FAMILIES = {
    "sd15": "Stable Diffusion 1.5",
    "sdxl": "Stable Diffusion XL",
    "sd3": "Stable Diffusion 3.5 Medium",
    "flux": "FLUX.1-dev",
}
METHODS = (
    "plain",
    "best_of_n",
    "particle_steering",
    "reward_guidance",
    "noise_optimization",
    "noise_optimization_blocks",
    "attend_and_excite",
    "attend_and_excite_kept",
    "region_reweight",
)
NATIVE = {"sd15": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
#: The precision each family is published and run in on a GPU (fp16 for the UNets, bf16 for the transformers); on a
#: CPU everything runs in bf16, which CPUs compute natively.
GPU_DTYPE = {"sd15": "float16", "sdxl": "float16", "sd3": "bfloat16", "flux": "bfloat16"}
PROMPTS = ["a photo of a cat and a dog", "a red car and a dog", "a bird and a dog", "a horse and a dog"]

# --- the published configurations --------------------------------------------------------------------------------

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_G = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu")


def _vae(latent_channels: int, flow: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        sample_size=1024 if flow else 512,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    )


def _clip(config: dict, projection: bool, act: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act=act, **config)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5(layers: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, **{**T5_XXL, "num_layers": layers}))


def build(family: str, args):
    """The family's pipeline at real width with random weights (depth reduced as `args` say), in `args`' dtype."""
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    from ttalign import pipelines as P
    from ttalign.testing import get_tiny_t5_tokenizer, get_tiny_tokenizer

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # weights are made in the run's precision (half the memory, faster init)
    try:
        ddim = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
        if family == "sd15":
            pipe = P.AlignedStableDiffusionPipeline(
                unet=UNet2DConditionModel(**SD15_UNET),
                vae=_vae(4, flow=False),
                text_encoder=_clip(CLIP_L, False, "quick_gelu"),
                tokenizer=get_tiny_tokenizer(),
                scheduler=DDIMScheduler(**ddim, set_alpha_to_one=False, steps_offset=1),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        elif family == "sdxl":
            pipe = P.AlignedStableDiffusionXLPipeline(
                unet=UNet2DConditionModel(**SDXL_UNET),
                vae=_vae(4, flow=False),
                text_encoder=_clip(CLIP_L, False, "quick_gelu"),
                tokenizer=get_tiny_tokenizer(),
                text_encoder_2=_clip(CLIP_G, True, "gelu"),
                tokenizer_2=get_tiny_tokenizer(pad_token="!"),
                scheduler=DDIMScheduler(**ddim, steps_offset=1),
                add_watermarker=False,
            )
        elif family == "sd3":
            pipe = P.AlignedStableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**SD35_MEDIUM),
                vae=_vae(16, flow=True),
                text_encoder=_clip(CLIP_L, True, "quick_gelu"),
                tokenizer=get_tiny_tokenizer(),
                text_encoder_2=_clip(CLIP_G, True, "gelu"),
                tokenizer_2=get_tiny_tokenizer(pad_token="!"),
                text_encoder_3=_t5(args.t5_layers),
                tokenizer_3=get_tiny_t5_tokenizer(),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            )
        else:
            config = {**FLUX_DEV, "num_layers": args.flux_double, "num_single_layers": args.flux_single}
            pipe = P.AlignedFluxPipeline(
                transformer=FluxTransformer2DModel(**config),
                vae=_vae(16, flow=True),
                text_encoder=_clip(CLIP_L, False, "quick_gelu"),
                tokenizer=get_tiny_tokenizer(),
                text_encoder_2=_t5(args.t5_layers),
                tokenizer_2=get_tiny_t5_tokenizer(),
                scheduler=FlowMatchEulerDiscreteScheduler(
                    shift=3.0,
                    use_dynamic_shifting=True,
                    base_shift=0.5,
                    max_shift=1.15,
                    base_image_seq_len=256,
                    max_image_seq_len=4096,
                ),
            )
    finally:
        torch.set_default_dtype(torch.float32)
    if family in ("sd3", "flux"):
        factors = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}[family]
        pipe.vae.register_to_config(scaling_factor=factors[0], shift_factor=factors[1])
    elif family == "sdxl":
        pipe.vae.register_to_config(scaling_factor=0.13025)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


def method_list(name: str, steps: int, refinements: int) -> list:
    """The runtime matrix's methods and settings (`ttalign.compat.method_factories`), with Attend-and-Excite on each
    prompt's two subjects at the settings of the module docstring."""
    from ttalign.compat import method_factories
    from ttalign.methods import AttendAndExcite

    if name in ("attend_and_excite", "attend_and_excite_kept"):
        subjects = {p: [p.split()[-4], p.split()[-1]] for p in PROMPTS}
        method = AttendAndExcite(
            tokens=lambda p: subjects[p],
            max_iter_to_alter=max(1, steps // 2),
            thresholds={0: 0.05, max(1, steps // 4): 0.5},
            max_refinement_steps=refinements,
            # `kept`: the loss passes keep every block's activations (no checkpointing)
            gradient_checkpointing=name == "attend_and_excite",
        )
        return [method]
    if name == "noise_optimization_blocks":
        (method,) = method_factories()["noise_optimization"]()
        method.gradient_checkpointing = "blocks"
        return [method]
    return method_factories()[name]()


class PeakRSS:
    """The highest resident set size (MB) of this process while the block runs, polled every 2 ms."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE") / 2**20
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def added(self) -> float:
        return self.peak - self.start


def run_family(family: str, args) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = build(family, args)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in pipe.family.denoiser.parameters())
    size = args.size or NATIVE[family]
    call = dict(height=size, width=size, output_type="pt")
    if family in ("sd3", "flux"):
        call["max_sequence_length"] = args.max_sequence_length
    prompts = PROMPTS[: args.prompts]
    pipe(prompts[:1], num_inference_steps=1, **call)  # warm-up: one-time costs stay out of the timings
    rows = []
    for name in args.methods.split(","):
        gc.collect()
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        generator = torch.Generator().manual_seed(0)
        tic = time.perf_counter()
        with PeakRSS() as rss:
            out = pipe(
                prompts,
                num_inference_steps=args.steps,
                alignment=method_list(name, args.steps, args.refinements),
                generator=generator,
                **call,
            )
            if args.device == "cuda":
                torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if args.device == "cuda" else rss.added
        rows.append(
            {
                "method": name,
                "seconds": seconds,
                "peak_added_mb": peak,
                "nfe": out.traces["compute"]["nfe"],
                "finite": bool(torch.isfinite(out.images).all()),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del out
    return {
        "family": family,
        "denoiser_parameters": params,
        "size": size,
        "build_s": build_s,
        "weights_mb": sum(
            p.numel() * p.element_size()
            for m in pipe.components.values()
            if isinstance(m, torch.nn.Module)
            for p in m.parameters()
        )
        / 2**20,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None, help="image side; default each family's native one")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--refinements", type=int, default=5, help="A&E's max_refinement_steps")
    parser.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens (SD3, FLUX)")
    parser.add_argument("--full", action="store_true", help="every model at full depth")
    parser.add_argument("--flux-double", type=int, default=2)
    parser.add_argument("--flux-single", type=int, default=4)
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CPU, each family's own on CUDA")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--name", default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run the CPU step (`--size 256`) on this machine.")
    if args.full:
        args.flux_double, args.flux_single, args.t5_layers = FLUX_DEV["num_layers"], FLUX_DEV["num_single_layers"], 24
    if args.one:
        if args.dtype is None:
            args.dtype = GPU_DTYPE[args.one] if args.device == "cuda" else "bfloat16"
        print(json.dumps({**run_family(args.one, args), "dtype": args.dtype}))
        return
    results = []
    for family in args.families.split(","):
        if family not in FAMILIES:
            raise SystemExit(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
        cmd = [sys.executable, __file__, "--one", family, *sys.argv[1:]]
        # glibc returns every block over 64 KiB to the system when it is freed (a fixed mmap threshold), so the
        # resident size follows the live tensors and each method's peak is its own
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    command = "python benchmarks/real_width.py " + " ".join(sys.argv[1:])
    env = environment()
    methods = [r["method"] for r in results[0]["rows"]]
    lines = [
        "| model | denoiser params | size | precision | plain: s / MB | "
        + " | ".join(m.replace("_", " ") for m in methods[1:])
        + " |",
        "|" + "---|" * (4 + len(methods)),
    ]
    for r in results:
        plain = next(row for row in r["rows"] if row["method"] == "plain")
        cells = []
        for row in r["rows"]:
            if row["method"] == "plain":
                continue
            time_ratio = row["seconds"] / plain["seconds"]
            memory_ratio = row["peak_added_mb"] / max(plain["peak_added_mb"], 1e-6)
            cells.append(f"{time_ratio:.1f}x / {memory_ratio:.1f}x")
        depth = ""
        if r["family"] == "flux" and not args.full:
            depth = f" ({args.flux_double} + {args.flux_single} of 19 + 38 blocks)"
        lines.append(
            f"| {FAMILIES[r['family']]}{depth} | {r['denoiser_parameters'] / 1e9:.2f} B | {r['size']} | "
            f"{r['dtype']} | {plain['seconds']:.1f} / {plain['peak_added_mb']:.0f} | " + " | ".join(cells) + " |"
        )
    reduced = "" if args.full else f"; T5-XXL with {args.t5_layers} of its 24 layers"
    markdown = (
        f"# Costs at real widths\n\n`{command}`\n\n"
        f"Random weights in the published layouts{reduced}; {args.prompts} prompt(s), {args.steps} steps, "
        f"{env['device']}"
        + (f", {args.threads} threads. " if args.device == "cpu" else ". ")
        + "Each method cell: time / peak memory added, as multiples of the plain call's (first column).\n\n"
        + "\n".join(lines)
        + "\n"
    )
    write_results(
        args.name or ("real_width_gpu" if args.device == "cuda" else "real_width"),
        {"benchmark": "real_width", "command": command, "results": results, "environment": env},
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
