"""Command line: `ttalign generate | demo`.

Examples:

```
ttalign generate "a red circle" --model tiny --align best_of_n:n=4,reward=jpeg_incompressibility --seed 0 --out out.png
ttalign demo --out outputs/demo.png
```
"""

from __future__ import annotations

import argparse
import os
import sys

TINY_MODEL = "tiny"


def load_pipeline(model: str, dtype: str = "float32", device: str | None = None):
    """Loads an :class:`~ttalign.AlignedStableDiffusionPipeline` from a folder or hub id, or `"tiny"`."""
    import torch

    from ttalign import AlignedStableDiffusionPipeline

    if model == TINY_MODEL:
        from ttalign.testing import get_tiny_components

        pipe = AlignedStableDiffusionPipeline(**get_tiny_components())
    else:
        try:
            pipe = AlignedStableDiffusionPipeline.from_pretrained(model, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as err:
            raise SystemExit(f"ttalign: error: could not load model {model!r}: {str(err).splitlines()[0]}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def _save(image, path: str) -> None:
    """Writes an image atomically: a failed write leaves no half-written file behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    try:
        image.save(tmp, format=os.path.splitext(path)[1].lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _generator(seed: int | None):
    import torch

    return None if seed is None else torch.Generator(device="cpu").manual_seed(seed)


def cmd_generate(args) -> int:
    from ttalign.methods import method_from_spec

    methods = [method_from_spec(spec) for spec in args.align]  # fails before any model is loaded
    pipe = load_pipeline(args.model, args.dtype, args.device)
    out = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        generator=_generator(args.seed),
        alignment=methods,
    )
    _save(out.images[0], args.out)
    print(f"wrote {args.out}")
    if out.rewards is not None:
        print(f"reward: {out.rewards[0].item():.4f}")
    compute = out.traces["compute"]
    print(f"denoiser calls: {compute['denoiser_calls']}, nfe: {compute['nfe']}, time: {compute['wall_time_s']:.2f}s")
    return 0


def cmd_demo(args) -> int:
    """The main job: generate with and without an alignment method, side by side."""
    from PIL import Image

    from ttalign.methods import BestOfN
    from ttalign.rewards import JpegIncompressibility

    print("ttalign demo: no trained default model is shipped yet; running on the tiny random components.")
    pipe = load_pipeline(TINY_MODEL, device=args.device)
    prompt = "a red circle left of a blue square"
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5)
    base = pipe(prompt, generator=_generator(args.seed), **common)
    reward = JpegIncompressibility()
    aligned = pipe(prompt, generator=_generator(args.seed), alignment=[BestOfN(reward=reward, n=4)], **common)
    import numpy as np
    import torch

    base_score = reward(torch.from_numpy(np.asarray(base.images[0], dtype=np.float32) / 255).permute(2, 0, 1)[None])
    w, h = base.images[0].size
    canvas = Image.new("RGB", (2 * w, h))
    canvas.paste(base.images[0], (0, 0))
    canvas.paste(aligned.images[0], (w, 0))
    _save(canvas, args.out)
    print(f"prompt: {prompt!r}")
    print(f"baseline   JPEG-incompressibility reward: {base_score.item():.3f}")
    print(f"best-of-4  JPEG-incompressibility reward: {aligned.rewards[0].item():.3f}")
    print(f"wrote {args.out} (left: baseline, right: best-of-4)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttalign", description="Inference-time alignment for diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one image with alignment methods")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=TINY_MODEL, help="folder or hub id of a Stable Diffusion pipeline, or 'tiny'")
    gen.add_argument(
        "--align",
        action="append",
        default=[],
        metavar="NAME[:key=value,...]",
        help="alignment method, repeatable, e.g. best_of_n:n=4,reward=jpeg_incompressibility",
    )
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--out", default="out.png")
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--device", default=None)
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="the main job: baseline against an aligned generation, side by side")
    demo.add_argument("--out", default="outputs/demo.png")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--device", default=None)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"ttalign: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
