"""Trains the shapes-world text-to-image models from scratch, on the CPU, and saves them in diffusers' layout.

```
python -m ttalign.shapes.train --out ttalign/shapes/model --vae-steps 400 --steps 5000 --seed 0
python -m ttalign.shapes.train --family flow --out ttalign/shapes/flow_model --seed 0
```

`--family sd` (the default) trains the Stable Diffusion 1.x-style model. Stages: (1) a small `AutoencoderKL`
(32 px -> 16x16x4 latents) trained on renders with an L1 + MSE loss and a tiny KL term; its latent scale goes into
`scaling_factor`; (2) a `CLIPTextModel` and a `UNet2DConditionModel` trained jointly with the epsilon-prediction
loss (min-SNR-5 weighting), 10% caption dropout for classifier-free guidance, and EMA weights. Captions are drawn
uniformly over the six categories of :mod:`ttalign.shapes.world`.

`--family flow` trains the flow-matching model on SD3's layout (:func:`train_flow`): an `SD3Transformer2DModel`
with 2x2 patches (an 8x8 grid of image tokens) and RMS-normalised queries and keys, two small CLIP text encoders
with projection and a small T5 encoder, each with a tokenizer built locally from the grammar's words, the first
model's autoencoder (with the latent shift and scale SD3's pipeline applies), and a `FlowMatchEulerDiscreteScheduler`.
Loss: the rectified-flow velocity `eps - x0` at `x_t = (1 - sigma) x0 + sigma eps`, sigma drawn logit-normal (SD3's
training distribution), 10% caption dropout, EMA weights.

Everything is seeded; on the same machine and thread count the run is reproducible. The settings and the log are
written next to the weights (`training_args.json`, `training_log.txt`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from ttalign.shapes.runs import TrainingLog, publish
from ttalign.shapes.world import VOCABULARY, sample_batch

DEFAULTS = dict(
    seed=0,
    vae_steps=400,
    vae_lr=1e-3,
    steps=5000,
    batch_size=64,
    lr=5e-4,
    warmup=200,
    ema_decay=0.999,
    caption_dropout=0.1,
    min_snr_gamma=5.0,
    dataset_size=50000,
    threads=2,
)


def build_tokenizer():
    from ttalign.testing import get_tiny_tokenizer

    return get_tiny_tokenizer(VOCABULARY, model_max_length=16)


def build_models(vocab_size: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=32,
        mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=64,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    return vae, text_encoder, unet


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def train_vae(vae, images: torch.Tensor, args, log) -> float:
    """Trains the autoencoder; returns the latent scaling factor (1 / std of the latents)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(1, args.vae_steps + 1):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x = images[idx] * 2 - 1  # [B, 3, 32, 32] in [-1, 1]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            log(f"vae step {step}/{args.vae_steps} loss {loss.item():.4f} mse {F.mse_loss(recon, x).item():.5f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, min(2048, len(images)), 256)]
        )
    return float(1.0 / latents.std())


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 512):
        posterior = vae.encode(images[i : i + 512] * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train(args) -> None:
    from ttalign.pipelines import AlignedStableDiffusionPipeline

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    workdir = tempfile.mkdtemp(prefix="shapes-train-")
    log = TrainingLog(os.path.join(workdir, "training_log.txt"))
    log(f"settings {json.dumps(vars(args))}")

    rng = np.random.default_rng(args.seed)
    images_np, captions = sample_batch(rng, args.dataset_size)
    images = torch.from_numpy(images_np)
    log(f"rendered {len(captions)} scenes")

    tokenizer = build_tokenizer()
    vae, text_encoder, unet = build_models(len(tokenizer))
    for name, module in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        log(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters")

    scaling = train_vae(vae, images, args, log)
    vae.register_to_config(scaling_factor=scaling)
    log(f"vae scaling_factor {scaling:.4f}")
    lat_mean, lat_std = encode_dataset(vae, images)  # [N, 4, 16, 16] each
    ids = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=16, return_tensors="pt").input_ids

    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod  # [1000]
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))
    )
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in list(ema_unet.parameters()) + list(ema_text.parameters()):
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed + 2)
    unet.train()
    text_encoder.train()
    running = None
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(captions), (args.batch_size,), generator=gen)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        batch_ids = ids[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        batch_ids[drop] = empty_ids[0]
        t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        cond = text_encoder(batch_ids)[0]  # [B, 16, 64]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        weight = torch.clamp(snr[t], max=args.min_snr_gamma) / snr[t]  # min-SNR-gamma for epsilon prediction
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == 1:
            log(f"step {step}/{args.steps} loss {loss.item():.4f} avg {running:.4f} lr {sched.get_last_lr()[0]:.2e}")

    pipe = AlignedStableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=ema_text,
        tokenizer=tokenizer,
        unet=ema_unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    _save(pipe, args, workdir, log, {"num_inference_steps": 25, "guidance_scale": 3.0})


# --- the flow-matching model (SD3's layout) --------------------------------------------------------------------

#: Text length of the flow model's tokenizers: the start token, the longest caption of the grammar (8 words) and the
#: end token. Pass it as `max_sequence_length` (the T5 length) when sampling: :data:`FLOW_SAMPLING_DEFAULTS` does.
FLOW_TEXT_LENGTH = 10

FLOW_DEFAULTS = dict(
    seed=0,
    vae_from="embedded",  # the embedded SD model's autoencoder (ttalign/shapes/model/vae), or a folder
    steps=4000,
    batch_size=64,
    lr=5e-4,
    warmup=200,
    ema_decay=0.999,
    caption_dropout=0.1,
    logit_mean=0.0,
    logit_std=1.0,
    layers=6,
    dataset_size=50000,
    threads=2,
)


def build_flow_tokenizers() -> dict:
    from ttalign.testing import get_tiny_t5_tokenizer, get_tiny_tokenizer

    return {
        "tokenizer": get_tiny_tokenizer(VOCABULARY, model_max_length=FLOW_TEXT_LENGTH),
        "tokenizer_2": get_tiny_tokenizer(VOCABULARY, model_max_length=FLOW_TEXT_LENGTH, pad_token="!"),
        "tokenizer_3": get_tiny_t5_tokenizer(VOCABULARY, model_max_length=FLOW_TEXT_LENGTH),
    }


def build_flow_models(tokenizers: dict, layers: int) -> dict:
    """The flow model's text encoders and transformer, randomly initialised (the seed is set by the caller)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(tokenizer):
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=2,
                max_position_embeddings=FLOW_TEXT_LENGTH,
                projection_dim=32,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=tokenizer.pad_token_id,
                hidden_act="gelu",
            )
        )

    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizers["tokenizer_3"]),
            d_model=128,
            d_kv=32,
            d_ff=256,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=128,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )
    return {
        "text_encoder": clip(tokenizers["tokenizer"]),
        "text_encoder_2": clip(tokenizers["tokenizer_2"]),
        "text_encoder_3": t5,
        "transformer": transformer,
    }


def build_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def encode_flow_text(models: dict, ids: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's prompt encoding on token ids (as `StableDiffusion3Pipeline.encode_prompt` computes it): both CLIPs'
    penultimate states side by side, zero-padded to the T5 width, followed along the sequence by the T5 states; the
    pooled embedding is both CLIPs' projections side by side. Returns `([B, 2 L, 128], [B, 64])`."""
    out_1 = models["text_encoder"](ids["tokenizer"], output_hidden_states=True)
    out_2 = models["text_encoder_2"](ids["tokenizer_2"], output_hidden_states=True)
    clip_states = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # [B, L, 64]
    t5_states = models["text_encoder_3"](ids["tokenizer_3"])[0]  # [B, L, 128]
    clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))  # [B, L, 128]
    pooled = torch.cat([out_1[0], out_2[0]], dim=-1)  # [B, 64]
    return torch.cat([clip_states, t5_states], dim=-2), pooled


def _tokenize_all(tokenizers: dict, captions: list[str]) -> dict:
    return {
        name: tok(
            captions, padding="max_length", max_length=FLOW_TEXT_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        for name, tok in tokenizers.items()
    }


def train_flow(args) -> None:
    """Trains the flow-matching shapes model (see the module docstring) and saves it to `args.out`."""
    from diffusers import AutoencoderKL

    from ttalign.pipelines import AlignedStableDiffusion3Pipeline

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    workdir = tempfile.mkdtemp(prefix="shapes-flow-train-")
    log = TrainingLog(os.path.join(workdir, "training_log.txt"))
    log(f"settings {json.dumps(vars(args))}")

    rng = np.random.default_rng(args.seed)
    images_np, captions = sample_batch(rng, args.dataset_size)
    images = torch.from_numpy(images_np)
    log(f"rendered {len(captions)} scenes")

    vae_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", "vae")
    vae = AutoencoderKL.from_pretrained(vae_dir if args.vae_from == "embedded" else args.vae_from).eval()
    vae.register_to_config(_name_or_path=args.vae_from)  # not the absolute path of the machine it was trained on
    lat_mean, lat_std = encode_dataset(vae, images)  # [N, 4, 16, 16] each
    shift = float(lat_mean.mean())
    scaling = float(1.0 / (lat_mean - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    log(f"vae from {args.vae_from}: shift_factor {shift:.4f} scaling_factor {scaling:.4f}")

    tokenizers = build_flow_tokenizers()
    models = build_flow_models(tokenizers, args.layers)
    for name, module in models.items():
        log(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters")
    ids = _tokenize_all(tokenizers, captions)
    empty = _tokenize_all(tokenizers, [""])

    params = [p for module in models.values() for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))
    )
    ema = {name: copy.deepcopy(module).eval().requires_grad_(False) for name, module in models.items()}
    gen = torch.Generator().manual_seed(args.seed + 2)
    for module in models.values():
        module.train()
    running = None
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(captions), (args.batch_size,), generator=gen)
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen) - shift) * scaling
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        batch_ids = {}
        for name, all_ids in ids.items():
            batch_ids[name] = all_ids[idx].clone()
            batch_ids[name][drop] = empty[name][0]
        sigma = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(args.batch_size, generator=gen))  # [B]
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise  # [B, 4, 16, 16]
        prompt_embeds, pooled = encode_flow_text(models, batch_ids)
        pred = models["transformer"](
            hidden_states=xt,
            timestep=sigma * 1000,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in models.items():
                for pe, pl in zip(ema[name].parameters(), module.parameters()):
                    pe.lerp_(pl, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == 1:
            log(f"step {step}/{args.steps} loss {loss.item():.4f} avg {running:.4f} lr {sched.get_last_lr()[0]:.2e}")

    pipe = AlignedStableDiffusion3Pipeline(
        vae=vae, scheduler=build_flow_scheduler(), image_encoder=None, feature_extractor=None, **tokenizers, **ema
    )
    # the training encoder must be the pipeline's own: one batch through both
    with torch.no_grad():
        check = ["a red circle left of a blue square", ""]
        ours = encode_flow_text(ema, _tokenize_all(tokenizers, check))
        theirs = pipe.encode_prompt(
            check, None, None, do_classifier_free_guidance=False, max_sequence_length=FLOW_TEXT_LENGTH
        )
        if not (torch.allclose(ours[0], theirs[0], atol=1e-5) and torch.allclose(ours[1], theirs[2], atol=1e-5)):
            raise RuntimeError("The training text encoding differs from StableDiffusion3Pipeline.encode_prompt.")
    _save(
        pipe,
        args,
        workdir,
        log,
        {"num_inference_steps": 20, "guidance_scale": 3.0, "max_sequence_length": FLOW_TEXT_LENGTH},
    )


def _save(pipe, args, workdir: str, log: TrainingLog, sampling: dict) -> None:
    """Saves the model with its sampling defaults (the settings it is evaluated with; its aligned pipeline loads
    them), its training arguments and log."""
    from ttalign.pipelines.base import write_sampling_defaults

    staging = os.path.join(workdir, "model")
    pipe.save_pretrained(staging, safe_serialization=True)
    write_sampling_defaults(staging, sampling)
    publish(staging, args.out, vars(args), log, workdir)


def main(argv=None) -> None:
    family = argparse.ArgumentParser(add_help=False)
    family.add_argument("--family", choices=("sd", "flow"), default="sd", help="which model to train")
    known, _ = family.parse_known_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[family])
    parser.add_argument("--out", required=True, help="output folder (diffusers layout)")
    for key, value in (FLOW_DEFAULTS if known.family == "flow" else DEFAULTS).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    (train_flow if args.family == "flow" else train)(args)


if __name__ == "__main__":
    main()
