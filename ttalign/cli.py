"""Command line: `ttalign generate | serve | demo | eval-reward | label-items | train-reward`.

Examples:

```
ttalign generate "a red circle left of a blue square" --align best_of_n:n=4,reward=shapes_soft --seed 0 --out out.png
ttalign generate --prompts prompts.txt --out images/          # under torchrun / accelerate launch: sharded
ttalign serve --allow best_of_n --port 8000
ttalign demo --out outputs/demo.png
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ttalign.loading import SHAPES_MODEL, SHAPES_MODELS, TINY_MODEL, load_pipeline


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


def _call_settings(args) -> dict:
    """Steps, guidance and size of a generate call, checked against the same limits the server applies."""
    steps, guidance_scale = args.steps, args.guidance_scale  # left out: the model's own sampling defaults
    if steps is not None and not 1 <= steps <= 1000:
        raise ValueError(f"--steps must be between 1 and 1000, got {steps}.")
    if guidance_scale is not None and not (guidance_scale >= 0 and guidance_scale == guidance_scale):
        raise ValueError(f"--guidance-scale must be >= 0, got {guidance_scale}.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8, got {value}.")
    settings = {
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "height": args.height,
        "width": args.width,
        "negative_prompt": args.negative_prompt,
    }
    return {k: v for k, v in settings.items() if v is not None}


def _check_size(pipe, settings: dict):
    """The model's own constraint on the size (SD3, FLUX: multiples of 16)."""
    multiple = pipe.family.size_multiple
    for name in ("height", "width"):
        if name in settings and settings[name] % multiple:
            raise ValueError(
                f"--{name} must be a multiple of {multiple} for {type(pipe).__name__}, got {settings[name]}."
            )
    return pipe


def cmd_generate(args) -> int:
    from ttalign.methods import method_from_spec

    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("Give one prompt, or a prompt file with --prompts FILE (and --out DIR).")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("The prompt is empty.")
    settings = _call_settings(args)
    methods = [method_from_spec(spec) for spec in args.align]  # fails before any model is loaded
    if args.prompts is not None:
        from ttalign.batch import generate_batch, read_prompts

        prompts = read_prompts(args.prompts)
        pipe = _check_size(load_pipeline(args.model, args.dtype, args.device), settings)
        result = generate_batch(
            pipe, prompts, args.out, methods, seed=args.seed or 0, batch_size=args.batch_size, call_kwargs=settings
        )
        print(
            f"wrote {result['written']} images to {args.out} ({result['skipped']} already there); "
            f"manifest: {result['manifest']}"
        )
        return 0
    pipe = _check_size(load_pipeline(args.model, args.dtype, args.device), settings)
    out = pipe(args.prompt, generator=_generator(args.seed), alignment=methods, **settings)
    _save(out.images[0], args.out)
    print(f"wrote {args.out}")
    if out.rewards is not None:
        print(f"reward: {out.rewards[0].item():.4f}")
    compute = out.traces["compute"]
    print(f"denoiser calls: {compute['denoiser_calls']}, nfe: {compute['nfe']}, time: {compute['wall_time_s']:.2f}s")
    return 0


def _read_config(path: str) -> dict:
    """A server configuration file: JSON, or TOML on Python >= 3.11; its keys are `ttalign serve`'s options."""
    if not os.path.isfile(path):
        raise ValueError(f"No configuration file at {path!r}.")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:
                raise ValueError("A TOML configuration needs Python >= 3.11; write it as JSON.") from None
            config = tomllib.loads(raw.decode("utf-8"))
        else:
            config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'} ({err}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the configuration must be an object of option names.")
    return config


def _apply_config(args, parser) -> None:
    """Fills the options not given on the command line from `--config FILE` (the command line wins)."""
    if args.config is None:
        return
    for key, value in _read_config(args.config).items():
        dest = str(key).replace("-", "_")
        if dest in ("config", "func") or dest not in vars(args):
            raise ValueError(f"{args.config}: unknown option {key!r}; the keys are `ttalign serve`'s options.")
        default = parser.get_default(dest)
        if isinstance(default, list) and not isinstance(value, list):
            raise ValueError(f"{args.config}: {key!r} must be a list.")
        if getattr(args, dest) == default:
            setattr(args, dest, value)


def serve_config(args):
    """The server's configuration from `ttalign serve`'s arguments (after `--config`)."""
    from ttalign.serve import Limits, ServeConfig, WorkerConfig, read_api_key

    api_key = read_api_key(args.api_key_env)
    limits = Limits(
        max_prompt_chars=args.max_prompt_chars,
        max_n=args.max_n,
        max_size_factor=args.max_size_factor,
        max_steps=args.max_steps,
        max_candidates=args.max_candidates,
        max_image_steps=args.max_image_steps,
    )
    worker = WorkerConfig(
        queue_size=args.queue_size,
        batch_window_s=args.batch_window,
        max_batch_images=args.max_batch_images,
        stuck_after_s=args.stuck_after,
    )
    name = args.model_name or (
        args.model if args.model in (*SHAPES_MODELS, TINY_MODEL) else os.path.basename(os.path.normpath(args.model))
    )
    hosts = list(args.allowed_host)
    if args.host not in ("0.0.0.0", "::", ""):  # a wildcard bind names no host; the operator adds names
        hosts.append(args.host)
    return ServeConfig(
        model_name=name,
        alignment=list(args.align),
        allow=list(args.allow),
        rewards=list(args.reward),
        api_key=api_key,
        limits=limits,
        worker=worker,
        request_timeout_s=args.request_timeout,
        body_timeout_s=args.body_timeout,
        allowed_hosts=hosts,
        cors_origins=list(args.cors_origin),
        label_db=args.label_db,
        label_images=args.label_images,
        label_items=args.label_items,
    )


def cmd_serve(args) -> int:
    """The OpenAI-compatible image server (FastAPI + uvicorn), or its Ray Serve deployment with `--ray`."""
    from ttalign.serve import check_bind

    _apply_config(args, args.parser)
    config = serve_config(args)
    check_bind(args.host, config.api_key, args.api_key_env)
    if args.ray:
        from ttalign.serve.ray_serve import run_ray

        return run_ray(args, config)
    from ttalign.serve import create_app
    from ttalign.serve.http import run

    pipe = load_pipeline(args.model, args.dtype, args.device)
    pipe.set_progress_bar_config(disable=True)
    app = create_app(pipe, config)
    hosts = ", ".join(sorted({"localhost", "127.0.0.1", "::1", *config.allowed_hosts}))
    print(
        f"serving {config.model_name} on http://{args.host}:{args.port} (API key "
        f"{'required' if config.api_key else 'not required'}; methods allowed in requests: "
        f"{', '.join(sorted(app.state.policy.allow)) or 'none'}; rewards: "
        f"{', '.join(sorted(app.state.policy.rewards)) or 'none'}; Host names: {hosts})",
        flush=True,
    )
    run(app, args.host, args.port, args.log_level, args.header_timeout, args.max_connections)
    return 0


DEMO_PROMPTS = (
    "a red circle left of a blue square",
    "a yellow triangle and a green circle",
    "three blue squares",
    "a green square above a red triangle",
    "a blue circle right of a yellow square",
    "a red square and a green triangle",
    "a triangle below a circle",
    "a yellow circle and a blue triangle",
)


def cmd_demo(args) -> int:
    """The main job: the embedded shapes model with and without an alignment method, side by side, verified."""
    import torch
    from PIL import Image, ImageDraw

    from ttalign.methods import BestOfN
    from ttalign.shapes import SAMPLING_DEFAULTS, ShapesSoftVerifier, load_pipeline, verify

    pipe = load_pipeline(device=args.device)
    prompts = list(DEMO_PROMPTS)
    method = BestOfN(reward=ShapesSoftVerifier(), n=args.n)
    runs = {}
    for name, alignment in (("baseline", []), (f"best-of-{args.n}", [method])):
        out = pipe(
            prompts, generator=_generator(args.seed), output_type="pt", alignment=alignment, **SAMPLING_DEFAULTS
        )
        runs[name] = (out.images, verify(out.images, prompts), out.traces["compute"])

    size = 192  # the 32-px images, enlarged 6x
    canvas = Image.new("RGB", (2 * size + 300, len(prompts) * size), "white")
    draw = ImageDraw.Draw(canvas)
    for col, (name, (images, verification, compute)) in enumerate(runs.items()):
        print(f"{name} (nfe {compute['nfe']}, {compute['wall_time_s']:.1f}s):")
        for row, (image, verdict) in enumerate(zip(images, verification.verdicts)):
            array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(array).resize((size, size), Image.NEAREST), (col * size, row * size))
            mark = "PASS" if verdict.passed else "fail"
            draw.text((col * size + 4, row * size + 4), f"{name}: {mark}", fill=(0, 0, 0))
            failed = [clause for clause, ok in verdict.clauses.items() if not ok]
            print(f"  {mark}  {verdict.prompt!r}" + (f"  (failed: {', '.join(failed)})" if failed else ""))
            if col == 0:
                draw.text((2 * size + 8, row * size + size // 2), verdict.prompt, fill=(0, 0, 0))
    _save(canvas, args.out)
    base, aligned = (sum(v.passed) for _, v, _ in runs.values())
    print(f"verified: baseline {base}/{len(prompts)}, best-of-{args.n} {aligned}/{len(prompts)}")
    print(f"wrote {args.out} (left: baseline, right: best-of-{args.n} with the soft verifier)")
    return 0


def cmd_eval_reward(args) -> int:
    """Pairwise preference accuracy of a reward on a preference set."""
    from ttalign.preferences import read_preference_set
    from ttalign.rewards import load_reward
    from ttalign.rewards.evaluation import pairwise_accuracy
    from ttalign.shapes.pairs import make_shapes_preference_set

    reward = load_reward(args.reward)
    if args.make_shapes_pairs:
        make_shapes_preference_set(args.pairs, n=args.make_shapes_pairs, seed=args.seed)
        print(f"wrote {args.make_shapes_pairs} shapes-world pairs to {args.pairs}")
    if not os.path.exists(args.pairs):
        raise ValueError(f"No preference set at {args.pairs!r}.")
    pairs = read_preference_set(args.pairs, args.format, args.split, args.limit, args.pickapic)
    result = pairwise_accuracy(reward, pairs)
    print(
        f"{args.reward}: accuracy {result['accuracy']:.4f} on {result['pairs']} pairs "
        f"({result['ties_skipped']} ties skipped)"
    )
    return 0


def cmd_label_items(args) -> int:
    """Images of every prompt by each system, and the items file the labelling page imports."""
    from ttalign.batch import read_prompts
    from ttalign.methods import method_from_spec
    from ttalign.preferences.items import make_label_items

    systems = {}
    for spec in args.system:
        name, _, method = spec.partition("=")
        if name in systems:
            raise ValueError(f"System {name!r} is given twice.")
        systems[name] = [method_from_spec(method)] if method else []  # a bad spec fails before any model is loaded
    if len(systems) not in (2, 4):
        raise ValueError(f"Labelling compares two or four systems (--system), got {len(systems)}.")
    settings = _call_settings(args)
    pipe = _check_size(load_pipeline(args.model, args.dtype, args.device), settings)
    pipe.set_progress_bar_config(disable=True)
    path = make_label_items(pipe, read_prompts(args.prompts), systems, args.out, seed=args.seed or 0, **settings)
    print(f"wrote {path}: serve them with --label-images {args.out} --label-items {path}")
    return 0


def cmd_train_reward(args) -> int:
    """Fits a CLIP-style reward to preference pairs and rankings; prints and saves the held-out report."""
    from ttalign.preferences import JudgmentStore, read_preference_set
    from ttalign.preferences.reward_training import RewardTrainer, RewardTrainingConfig

    if args.format == "judgments":
        pairs, rankings = JudgmentStore(args.pairs).training_records(args.images_root)
    else:
        if not os.path.exists(args.pairs):
            raise ValueError(f"No preference set at {args.pairs!r}.")
        pairs, rankings = read_preference_set(args.pairs, args.format, args.split, args.limit, args.pickapic), []
    config = RewardTrainingConfig(
        output_dir=args.out,
        learning_rate=args.lr,
        max_steps=args.steps,
        warmup_steps=args.warmup,
        batch_size=args.batch_size,
        trainable_vision_layers=args.vision_layers,
        trainable_text_layers=args.text_layers,
        lora_rank=args.lora_rank,
        held_out=args.held_out,
        seed=args.seed,
    )
    trainer = RewardTrainer(args.base, config, pairs, rankings)
    print(f"{len(trainer.train_records)} training records, {len(trainer.held_out)} held out (by prompt)")
    report = trainer.train()
    folder = trainer.save(report=report)
    if report:
        low, high = report["interval"]
        print(
            f"held-out accuracy {report['accuracy']:.4f} ({low:.3f}-{high:.3f}) on {report['n_decided']} pairs; "
            f"tie-aware {report['tie_aware_accuracy']:.4f} on {report['n']}"
        )
    print(f"wrote {folder} (load_reward({folder!r}), ttalign serve --reward NAME={folder})")
    return 0


def _model_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        default=SHAPES_MODEL,
        help="folder or hub id of a Stable Diffusion 1.x/2.x, XL or 3 or a FLUX pipeline (the class comes from its "
        "model_index.json), 'shapes' or 'shapes-flow' (the embedded models; 'shapes-tuned', 'shapes-flow-tuned' with "
        "their tuned LoRAs) or 'tiny'",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default=None)


def build_parser() -> argparse.ArgumentParser:
    from ttalign.preferences.readers import FORMATS

    parser = argparse.ArgumentParser(prog="ttalign", description="Inference-time alignment for diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one image, or a prompt file's images, with alignment methods")
    gen.add_argument("prompt", nargs="?", help="the prompt (or give --prompts FILE)")
    gen.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="a prompt file (one per line, or JSONL with 'prompt'): writes images and "
        "manifest.jsonl to --out DIR; under `accelerate launch` or `torchrun`, sharded",
    )
    _model_arguments(gen)
    gen.add_argument(
        "--align",
        action="append",
        default=[],
        metavar="NAME[:key=value,...]",
        help="alignment method, repeatable, e.g. best_of_n:n=4,reward=shapes_soft",
    )
    gen.add_argument("--seed", type=int, default=None, help="seed (with --prompts: item i uses seed + i; default 0)")
    gen.add_argument("--out", default="out.png", help="image file, or the folder with --prompts")
    gen.add_argument(
        "--steps",
        type=int,
        default=None,
        help="default: 25 for 'shapes', 20 for 'shapes-flow', else the pipeline's (SD, SDXL: 50; SD3, FLUX: 28)",
    )
    gen.add_argument(
        "--guidance-scale", type=float, default=None, help="default: 3.0 for the shapes models, else the pipeline's"
    )
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--batch-size", type=int, default=4, help="with --prompts: images per pipeline call")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve aligned generation behind the OpenAI Images API")
    _model_arguments(srv)
    srv.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help='a JSON (or TOML) file of these options, e.g. {"allow": [...], "reward": [...]}; the command line wins',
    )
    srv.add_argument("--model-name", default=None, help="the model id the API reports (default: from --model)")
    srv.add_argument(
        "--align",
        action="append",
        default=[],
        metavar="SPEC",
        help="method applied to requests that name none, repeatable",
    )
    srv.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="NAME[:key=value,...]",
        help="a method requests may ask for, repeatable; the spec's options are the server's (URLs, "
        "models, keys' variables), a request sets only the documented ones on top",
    )
    srv.add_argument(
        "--reward",
        action="append",
        default=[],
        metavar="NAME[:key=value,...] | NAME=FOLDER",
        help="a reward to load at start-up that requests may name (by NAME), repeatable; its options are the "
        "server's, e.g. vlm_judge:model=qwen2.5-vl-7b,base_url=http://127.0.0.1:8001/v1, or a reward "
        "`ttalign train-reward` saved: my_taste=runs/reward/reward",
    )
    srv.add_argument(
        "--label-db",
        default=None,
        metavar="URL",
        help="collect judgments at /label into this database (a SQLAlchemy URL or a SQLite file)",
    )
    srv.add_argument("--label-images", default=None, metavar="DIR", help="the folder of the images to judge")
    srv.add_argument(
        "--label-items",
        default=None,
        metavar="FILE",
        help='JSON lines {"prompt", "images": [2 or 4 file names in DIR], "systems": [...]}, imported at start-up',
    )
    srv.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name served besides this machine's and --host, repeatable ('*': any)",
    )
    srv.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="an origin (scheme://host:port) whose pages may call the API, repeatable",
    )
    srv.add_argument(
        "--api-key-env",
        default="TTALIGN_API_KEY",
        help="environment variable holding the API key (required to bind beyond loopback)",
    )
    srv.add_argument("--queue-size", type=int, default=64)
    srv.add_argument("--batch-window", type=float, default=0.02, help="seconds a call waits for requests to merge")
    srv.add_argument("--max-batch-images", type=int, default=16, help="images per merged call (1: no merging)")
    srv.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds until a request is answered 504 and its call stopped",
    )
    srv.add_argument(
        "--max-image-steps",
        type=float,
        default=2000.0,
        help="a request's compute budget: denoiser evaluations of one image at the native size, "
        "counting every image, candidate, particle and optimization pass",
    )
    srv.add_argument("--max-n", type=int, default=10)
    srv.add_argument(
        "--max-size-factor",
        type=float,
        default=1.5,
        help="the largest image side, as a multiple of the model's native side",
    )
    srv.add_argument("--max-steps", type=int, default=100)
    srv.add_argument("--max-prompt-chars", type=int, default=2000)
    srv.add_argument(
        "--max-candidates",
        type=int,
        default=16,
        help="largest count option of a requested method (n, particles, refinements)",
    )
    srv.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds a connection has to send its request headers"
    )
    srv.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request has to send its body")
    srv.add_argument("--max-connections", type=int, default=256, help="concurrent connections (503 past them)")
    srv.add_argument(
        "--stuck-after",
        type=float,
        default=300.0,
        help="seconds without a denoiser step after which /health answers 503",
    )
    srv.add_argument("--log-level", default="warning")
    srv.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment")
    srv.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (one per GPU)")
    srv.add_argument("--gpus-per-replica", type=float, default=1.0, help="with --ray: 0 for CPU replicas")
    srv.add_argument("--max-queued-requests", type=int, default=64, help="with --ray: Ray Serve's queue limit")
    srv.add_argument(
        "--ray-node-ip",
        default="127.0.0.1",
        help="with --ray: the address a local Ray cluster binds (default: loopback)",
    )
    srv.set_defaults(func=cmd_serve, parser=srv)

    demo = sub.add_parser("demo", help="the main job: baseline against an aligned generation, side by side")
    demo.add_argument("--out", default="outputs/demo.png")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--n", type=int, default=4, help="candidates per image for best-of-N")
    demo.add_argument("--device", default=None)
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval-reward", help="pairwise preference accuracy of a reward (Pick-a-Pic / HPDv2 layout)")
    ev.add_argument("--reward", required=True, help="a reward's short name, e.g. shapes_soft")
    ev.add_argument("--pairs", required=True, help="folder with pairs.jsonl, or a dataset saved with save_to_disk")
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument(
        "--make-shapes-pairs",
        type=int,
        default=0,
        metavar="N",
        help="first write N verifier-labelled shapes-world pairs to --pairs",
    )
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--format", default="auto", choices=FORMATS, help="the preference set's layout")
    ev.add_argument("--split", default="test", help="HPD v2's, ImageRewardDB's and RichHF-18K's split")
    ev.add_argument("--pickapic", default=None, help="Pick-a-Pic's parquet files: RichHF-18K's images and prompts")
    ev.set_defaults(func=cmd_eval_reward)

    li = sub.add_parser("label-items", help="images of each prompt by two or four systems, for the labelling page")
    li.add_argument("--prompts", required=True, help="a prompt file, one per line")
    li.add_argument(
        "--system",
        action="append",
        default=[],
        metavar="NAME[=METHOD_SPEC]",
        help="a system to compare (repeat two or four times); no spec: the plain call",
    )
    li.add_argument("--out", required=True, help="the folder for the images and items.jsonl")
    _model_arguments(li)
    li.add_argument("--steps", type=int, default=None)
    li.add_argument("--guidance-scale", type=float, default=None)
    li.add_argument("--height", type=int, default=None)
    li.add_argument("--width", type=int, default=None)
    li.add_argument("--negative-prompt", default=None)
    li.add_argument("--seed", type=int, default=0)
    li.set_defaults(func=cmd_label_items)

    tr = sub.add_parser("train-reward", help="fit a CLIP-style reward to preferences (Bradley-Terry, Plackett-Luce)")
    tr.add_argument("--base", required=True, help="a CLIPModel folder or hub id, with tokenizer and image processor")
    tr.add_argument(
        "--pairs",
        required=True,
        help="a preference set (see --format), or with --format judgments a judgment database's URL or file",
    )
    tr.add_argument("--format", default="auto", choices=(*FORMATS, "judgments"))
    tr.add_argument("--split", default="train", help="HPD v2's, ImageRewardDB's and RichHF-18K's split")
    tr.add_argument("--pickapic", default=None, help="Pick-a-Pic's parquet files: RichHF-18K's images and prompts")
    tr.add_argument("--images-root", default=".", help="where a judgment database's image references point")
    tr.add_argument("--out", required=True, help="checkpoints, log and the saved reward (OUT/reward)")
    tr.add_argument("--steps", type=int, default=4000)
    tr.add_argument("--lr", type=float, default=3e-6)
    tr.add_argument("--warmup", type=int, default=500)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--vision-layers", type=int, default=None, help="train the last N vision blocks (default all)")
    tr.add_argument("--text-layers", type=int, default=None, help="train the last N text blocks (default all)")
    tr.add_argument("--lora-rank", type=int, default=0, help="LoRA instead of full fine-tuning (0: full)")
    tr.add_argument("--held-out", type=float, default=0.1, help="the share of prompts held out for the report")
    tr.add_argument("--limit", type=int, default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=cmd_train_reward)
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
