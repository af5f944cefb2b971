"""Trains the shapes-world text-to-image model from scratch, on the CPU, and saves it in diffusers' layout.

```
python -m ttalign.shapes.train --out ttalign/shapes/model --vae-steps 400 --steps 5000 --seed 0
```

Stages: (1) a small `AutoencoderKL` (32 px -> 16x16x4 latents) trained on renders with an L1 + MSE loss and a
tiny KL term; its latent scale goes into `scaling_factor`; (2) a `CLIPTextModel` and a `UNet2DConditionModel`
trained jointly with the epsilon-prediction loss (min-SNR-5 weighting), 10% caption dropout for classifier-free
guidance, and EMA weights. Captions are drawn uniformly over the six categories of :mod:`ttalign.shapes.world`.
Everything is seeded; on the same machine and thread count the run is reproducible. The settings and the log are
written next to the weights (`training_args.json`, `training_log.txt`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

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


class Logger:
    def __init__(self, path: str):
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115
        self.start = time.time()

    def __call__(self, message: str) -> None:
        line = f"[{time.time() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


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
    log = Logger(os.path.join(workdir, "training_log.txt"))
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
    staging = os.path.join(workdir, "model")
    pipe.save_pretrained(staging, safe_serialization=True)
    with open(os.path.join(staging, "training_args.json"), "w", encoding="utf-8") as f:
        json.dump(vars(args), f, indent=2)
    log(f"done: saved to {args.out}")
    log.file.close()
    shutil.copy(os.path.join(workdir, "training_log.txt"), os.path.join(staging, "training_log.txt"))
    # replace the output folder only once everything is written: no half-written model is ever left behind
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    shutil.move(staging, args.out)
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (diffusers layout)")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
