"""Diffusion-DPO (Wallace et al. 2023, https://arxiv.org/abs/2311.12908) on preference pairs, with LoRA and accelerate.

The reference model is the same UNet with its LoRA adapters disabled (no second copy). Checkpoints (LoRA weights,
optimizer, RNG states, step) are written atomically every `checkpointing_steps`; `train()` resumes from the latest
one in `output_dir`, so a killed run continues where it stopped and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .losses import diffusion_dpo_loss, per_sample_mse


@dataclass
class DPOConfig:
    """Settings of :class:`DiffusionDPOTrainer`.

    Args:
        beta (`float`, defaults to 5000): DPO's KL weight in `-logsigmoid(-0.5 * beta * (model_diff - ref_diff))`
            (diffusers' `train_diffusion_dpo.py` `beta_dpo` is half of it).
        learning_rate (`float`, defaults to 1e-4): AdamW learning rate of the LoRA weights.
        lora_rank (`int`, defaults to 8), lora_alpha (`int`, *optional*, defaults to the rank): LoRA on the UNet's
            attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`).
        train_batch_size (`int`, defaults to 4): pairs per step and process.
        gradient_accumulation_steps (`int`, defaults to 1).
        max_steps (`int`, defaults to 100): optimizer steps.
        max_grad_norm (`float`, defaults to 1.0).
        mixed_precision (`str`, defaults to `"no"`): `"no"`, `"fp16"` or `"bf16"` (accelerate's).
        gradient_checkpointing (`bool`, defaults to `False`): UNet activation checkpointing.
        resolution (`int`, *optional*): images are resized to this square size (default: the pipeline's).
        checkpointing_steps (`int`, defaults to 50): write a checkpoint every this many optimizer steps.
        checkpoints_total_limit (`int`, defaults to 2): keep at most this many checkpoints.
        output_dir (`str`, defaults to `"dpo-output"`): checkpoints, logs (`logs/metrics.jsonl`) and the final LoRA.
        report_to (`str`, *optional*): an accelerate tracker (`"tensorboard"`), in addition to the JSONL log.
        seed (`int`, defaults to 0).
    """

    beta: float = 5000.0
    learning_rate: float = 1e-4
    lora_rank: int = 8
    lora_alpha: int | None = None
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    resolution: int | None = None
    checkpointing_steps: int = 50
    checkpoints_total_limit: int = 2
    output_dir: str = "dpo-output"
    report_to: str | None = None
    seed: int = 0

    def __post_init__(self):
        for key in ("lora_rank", "train_batch_size", "gradient_accumulation_steps", "max_steps", "checkpointing_steps",
                    "checkpoints_total_limit"):  # fmt: skip
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"DPOConfig.{key} must be an integer >= 1, got {getattr(self, key)!r}.")
        if self.beta <= 0 or self.learning_rate <= 0:
            raise ValueError(f"DPOConfig needs beta > 0 and learning_rate > 0, got {self.beta}, {self.learning_rate}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")


def _to_tensor(image, size: int) -> torch.Tensor:
    """PIL image -> float `[3, size, size]` in `[-1, 1]` (bicubic resize of the shorter side, centre crop)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


class DiffusionDPOTrainer:
    """Fine-tunes a Stable Diffusion pipeline's UNet with LoRA on preference pairs by Diffusion-DPO.

    Args:
        pipe: a Stable Diffusion pipeline (diffusers' or an aligned one); its UNet gets the LoRA adapter.
        config (:class:`DPOConfig`).
        train_dataset: a list of `ttalign.rewards.evaluation.PreferencePair` (`prompt`, `image_0`, `image_1`,
            `label`: 0 when image 0 is preferred), or a path read by `load_pairs` (a folder with `pairs.jsonl`, or a
            `datasets` dataset in the Pick-a-Pic / HPDv2 layout). Ties are skipped.

    Example:

    ```py
    >>> from ttalign.shapes import load_pipeline
    >>> from ttalign.rewards.evaluation import make_shapes_preference_set
    >>> from ttalign.training.dpo import DiffusionDPOTrainer, DPOConfig
    >>> pipe = load_pipeline()
    >>> make_shapes_preference_set("pairs", 64)
    >>> trainer = DiffusionDPOTrainer(pipe, DPOConfig(max_steps=10, output_dir="dpo"), train_dataset="pairs")
    >>> trainer.train()
    >>> trainer.save_lora("dpo/lora")  # pipe.load_lora_weights("dpo/lora") in diffusers
    ```
    """

    def __init__(self, pipe, config: DPOConfig, train_dataset):
        from accelerate import Accelerator
        from peft import LoraConfig

        from ttalign.rewards.evaluation import load_pairs

        self.pipe, self.config = pipe, config
        pairs = load_pairs(train_dataset) if isinstance(train_dataset, str) else list(train_dataset)
        self.pairs = [p for p in pairs if p.label in (0.0, 1.0)]
        if not self.pairs:
            raise ValueError("DiffusionDPOTrainer needs at least one preference pair that is not a tie.")
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=config.report_to,
            project_dir=config.output_dir,
            cpu=not torch.cuda.is_available(),
        )
        unet = pipe.unet
        for module in (unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                                    init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))  # fmt: skip
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate)
        self.unet, self.optimizer = self.accelerator.prepare(unet, self.optimizer)
        self.noise_scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.step = 0
        size = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self._data = self._encode(size)

    @torch.no_grad()
    def _encode(self, size: int):
        """VAE latents of winners and losers `[P, C, h, w]` and text embeddings `[P, L, D]`, computed once."""
        pipe, device = self.pipe, self.accelerator.device
        winners, losers, embeds = [], [], []
        for start in range(0, len(self.pairs), 16):
            chunk = self.pairs[start : start + 16]
            w = torch.stack([_to_tensor(p.image_1 if p.label else p.image_0, size) for p in chunk]).to(device)
            l_ = torch.stack([_to_tensor(p.image_0 if p.label else p.image_1, size) for p in chunk]).to(device)
            for images, out in ((w, winners), (l_, losers)):
                latents = pipe.vae.encode(images.to(pipe.vae.dtype)).latent_dist.mean
                out.append(latents * pipe.vae.config.scaling_factor)
            embeds.append(pipe.encode_prompt([p.prompt for p in chunk], device, 1, False)[0])
        return torch.cat(winners), torch.cat(losers), torch.cat(embeds)

    def compute_loss(self, generator: torch.Generator, indices: torch.Tensor):
        """The DPO loss of a batch of pairs; winner and loser share noise and timestep."""
        winners, losers, embeds = (x[indices] for x in self._data)
        n = len(indices)
        latents = torch.cat([winners, losers])  # [2n, C, h, w]
        noise = torch.randn(winners.shape, generator=generator).to(latents).repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator)
        timesteps = timesteps.to(latents.device).repeat(2)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        cond = embeds.repeat(2, 1, 1)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=cond).sample
        model_mse = per_sample_mse(pred, target)
        unwrapped = self.accelerator.unwrap_model(self.unet)
        with torch.no_grad():
            unwrapped.disable_adapters()  # the reference model: the same UNet without LoRA
            try:
                ref_mse = per_sample_mse(self.unet(noisy, timesteps, encoder_hidden_states=cond).sample, target)
            finally:
                unwrapped.enable_adapters()
        return diffusion_dpo_loss(model_mse[:n], model_mse[n:], ref_mse[:n], ref_mse[n:], self.config.beta)

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def _checkpoints(self) -> list[str]:
        root = self.config.output_dir
        if not os.path.isdir(root):
            return []
        names = [d for d in os.listdir(root) if d.startswith("checkpoint-") and d[11:].isdigit()]
        return [os.path.join(root, d) for d in sorted(names, key=lambda d: int(d[11:]))]

    def save_checkpoint(self) -> str:
        """Writes `output_dir/checkpoint-<step>` atomically (a temporary folder renamed into place)."""
        from safetensors.torch import save_file

        root = self.config.output_dir
        os.makedirs(root, exist_ok=True)
        final = os.path.join(root, f"checkpoint-{self.step}")
        if self.accelerator.is_main_process:
            tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-checkpoint-")
            lora = {k: v.detach().cpu().contiguous() for k, v in self._lora_state().items()}
            save_file(lora, os.path.join(tmp, "lora.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step,
                        "rng": self._rng.get_state(), "python_rng": random.getstate()},
                       os.path.join(tmp, "state.pt"))  # fmt: skip
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(asdict(self.config), f, indent=2)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self._checkpoints()[: -self.config.checkpoints_total_limit]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.accelerator.unwrap_model(self.unet), load_file(os.path.join(path,
                                  "lora.safetensors")))  # fmt: skip
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self._rng.set_state(state["rng"])
        random.setstate(state["python_rng"])

    def _lora_state(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.accelerator.unwrap_model(self.unet))

    def save_lora(self, directory: str) -> None:
        """Saves the LoRA in diffusers' format (`pytorch_lora_weights.safetensors`), loadable with
        `pipe.load_lora_weights(directory)`."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        if self.accelerator.is_main_process:
            layers = convert_state_dict_to_diffusers(self._lora_state())
            StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
        self.accelerator.wait_for_everyone()

    # --- training -------------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Runs to `max_steps` optimizer steps, resuming from the latest checkpoint in `output_dir`; returns the
        last logged metrics."""
        from tqdm.auto import tqdm

        config = self.config
        self._rng = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        random.seed(config.seed)
        if self.accelerator.is_main_process and os.path.isdir(config.output_dir):
            for stale in os.listdir(config.output_dir):  # left by a run killed while writing a checkpoint
                if stale.startswith(".tmp-checkpoint-"):
                    shutil.rmtree(os.path.join(config.output_dir, stale), ignore_errors=True)
        checkpoints = self._checkpoints()
        if checkpoints:
            self.load_checkpoint(checkpoints[-1])
        if config.report_to:
            self.accelerator.init_trackers("ttalign-dpo", config={k: v for k, v in asdict(config).items()
                                                                   if v is not None})  # fmt: skip
        log_path = os.path.join(config.output_dir, "logs", "metrics.jsonl")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        metrics: dict = {}
        self.unet.train()
        bar = tqdm(total=config.max_steps, initial=self.step, desc="DPO", disable=not self.accelerator.is_main_process)
        n_pairs = len(self.pairs)
        while self.step < config.max_steps:
            for _ in range(config.gradient_accumulation_steps):
                with self.accelerator.accumulate(self.unet):
                    indices = torch.randint(0, n_pairs, (config.train_batch_size,), generator=self._rng)
                    loss, accuracy = self.compute_loss(self._rng, indices)
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
            self.step += 1
            metrics = {"step": self.step, "loss": loss.item(), "implicit_accuracy": accuracy.item()}
            if self.accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if config.report_to:
                self.accelerator.log(metrics, step=self.step)
            bar.update()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if self.step % config.checkpointing_steps == 0 or self.step == config.max_steps:
                self.save_checkpoint()
        bar.close()
        self.unet.eval()
        if config.report_to:
            self.accelerator.end_training()
        return metrics
