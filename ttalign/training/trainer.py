"""What every trainer shares: LoRA on the pipeline's denoiser through peft, accelerate (devices, mixed precision,
gradient accumulation, processes), atomic checkpoints with resume, JSONL / tracker logging and a progress bar.

A trainer subclasses :class:`LoRATrainer` and implements `training_step(generator) -> (loss, metrics)`. It knows the
model only through its family (`self.model`, a :class:`~ttalign.pipelines.family.ModelFamily` whose denoiser is the
accelerate-prepared one).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class TrainingConfig:
    """Settings shared by every trainer.

    Args:
        learning_rate (`float`, defaults to 1e-4): AdamW learning rate of the LoRA weights.
        lora_rank (`int`, defaults to 8), lora_alpha (`int`, *optional*, defaults to the rank): LoRA on the
            denoiser's attention projections (the family's `lora_target_modules`: `to_q`, `to_k`, `to_v`, `to_out.0`
            for the UNet families).
        train_batch_size (`int`, defaults to 4): samples (pairs, records or prompts) per step and process.
        gradient_accumulation_steps (`int`, defaults to 1).
        max_steps (`int`, defaults to 100): optimizer steps.
        max_grad_norm (`float`, defaults to 1.0).
        mixed_precision (`str`, defaults to `"no"`): `"no"`, `"fp16"` or `"bf16"` (accelerate's).
        gradient_checkpointing (`bool`, defaults to `False`): the denoiser's activation checkpointing.
        resolution (`int`, *optional*): training images are resized to this square size (default: the pipeline's).
        checkpointing_steps (`int`, defaults to 50): write a checkpoint every this many optimizer steps.
        checkpoints_total_limit (`int`, defaults to 2): keep at most this many checkpoints.
        output_dir (`str`, defaults to `"ttalign-output"`): checkpoints, logs (`logs/metrics.jsonl`).
        report_to (`str`, *optional*): an accelerate tracker (`"tensorboard"`), in addition to the JSONL log.
        seed (`int`, defaults to 0).
        encode_options (`dict`): extra prompt-encoding arguments of the pipeline, given to every prompt encoding and
            every sampling call of the trainer (e.g. `{"max_sequence_length": 10}` for a T5 trained on short text).
    """

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
    output_dir: str = "ttalign-output"
    report_to: str | None = None
    seed: int = 0
    encode_options: dict = field(default_factory=dict)

    def __post_init__(self):
        for key in (
            "lora_rank",
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "checkpointing_steps",
            "checkpoints_total_limit",
        ):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{type(self).__name__}.{key} must be an integer >= 1, got {getattr(self, key)!r}.")
        if self.lora_alpha is not None and (not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha must be > 0 or None (the rank), got {self.lora_alpha!r}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")


def crop_geometry(image, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where :func:`image_to_tensor` takes its square from: the image's original `(height, width)` and the top-left
    corner `(top, left)` of the centre crop in the resized image (SDXL's size and crop conditioning)."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    return (h, w), ((new_h - size) // 2, (new_w - size) // 2)


def image_to_tensor(image, size: int) -> torch.Tensor:
    """PIL image -> float `[3, size, size]` in `[-1, 1]` (bicubic resize of the shorter side, centre crop)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


class LoRATrainer:
    """Base of the trainers: sets up LoRA, the optimizer and accelerate; runs the loop with checkpoints.

    Attributes:
        model (`ModelFamily`): the pipeline's model family, with the accelerate-prepared `denoiser`.
        denoiser: the accelerate-prepared denoiser (`unet` is its alias for the UNet families).
    """

    name = "train"

    def __init__(self, pipe, config: TrainingConfig):
        from accelerate import Accelerator
        from peft import LoraConfig

        from ttalign.pipelines import family_for

        family = family_for(pipe)  # TypeError naming the supported pipelines, before any set-up
        self.pipe, self.config = pipe, config
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=config.report_to,
            project_dir=config.output_dir,
            cpu=not torch.cuda.is_available(),
        )
        denoiser = family.base_denoiser
        for module in (denoiser, family.vae, *family.text_encoders):
            module.requires_grad_(False)
        denoiser.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha or config.lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(family.lora_target_modules),
            )
        )
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate)
        self.denoiser, self.optimizer = self.accelerator.prepare(denoiser, self.optimizer)
        self.model = family.replace(denoiser=self.denoiser)
        self.step = 0
        self._rng = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        self.size = config.resolution or family.default_image_size
        self._progress_bar_config: dict = {}

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options of the training loop's tqdm bar, as diffusers' `DiffusionPipeline.set_progress_bar_config`:
        `disable=True` hides it, `total=None` counts steps without a total (a run bounded by time, not steps)."""
        self._progress_bar_config = dict(kwargs)

    @property
    def unet(self):
        """The accelerate-prepared denoiser, under the name the UNet families' scripts use."""
        return self.denoiser

    def reference_mode(self):
        """A context in which the denoiser runs without its LoRA adapters (the reference model)."""
        return _AdaptersDisabled(self.accelerator.unwrap_model(self.denoiser))

    def training_step(self, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """One micro-batch: returns the loss to backpropagate and the metrics to log."""
        raise NotImplementedError

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def checkpoints(self) -> list[str]:
        """The complete checkpoints in `output_dir`, oldest first."""
        root = self.config.output_dir
        if not os.path.isdir(root):
            return []
        names = [d for d in os.listdir(root) if d.startswith("checkpoint-") and d[11:].isdigit()]
        return [os.path.join(root, d) for d in sorted(names, key=lambda d: int(d[11:]))]

    def lora_state(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.accelerator.unwrap_model(self.denoiser))

    def save_checkpoint(self) -> str:
        """Writes `output_dir/checkpoint-<step>` atomically: a temporary folder renamed into place, so a run killed
        while writing leaves no partial checkpoint behind."""
        from safetensors.torch import save_file

        root = self.config.output_dir
        os.makedirs(root, exist_ok=True)
        final = os.path.join(root, f"checkpoint-{self.step}")
        if self.accelerator.is_main_process:
            tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-checkpoint-")
            lora = {k: v.detach().cpu().contiguous() for k, v in self.lora_state().items()}
            save_file(lora, os.path.join(tmp, "lora.safetensors"))
            extra = {k: v.detach().cpu().contiguous() for k, v in self.extra_state().items()}
            if extra:
                save_file(extra, os.path.join(tmp, "extra.safetensors"))
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "step": self.step,
                    "rng": self._rng.get_state(),
                    "python_rng": random.getstate(),
                },
                os.path.join(tmp, "state.pt"),
            )
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({k: v for k, v in asdict(self.config).items() if not callable(v)}, f, indent=2, default=str)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[: -self.config.checkpoints_total_limit]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        lora = load_file(os.path.join(path, "lora.safetensors"))
        set_peft_model_state_dict(self.accelerator.unwrap_model(self.denoiser), lora)
        if os.path.isfile(os.path.join(path, "extra.safetensors")):
            self.load_extra_state(load_file(os.path.join(path, "extra.safetensors")))
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self._rng.set_state(state["rng"])
        random.setstate(state["python_rng"])

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors a trainer keeps beside the LoRA (an old or EMA copy of it), saved in every checkpoint."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores what :meth:`extra_state` saved."""

    def save_lora(self, directory: str) -> None:
        """Saves the LoRA in the format of the family's diffusers pipeline (`pytorch_lora_weights.safetensors`),
        loadable with `pipe.load_lora_weights(directory)` by diffusers' pipelines and the aligned ones."""
        if self.accelerator.is_main_process:
            layers = self.lora_state()
            scale = (self.config.lora_alpha or self.config.lora_rank) / self.config.lora_rank
            if scale != 1:
                # diffusers' format keeps no alpha (it loads a LoRA at alpha = rank): the scale goes into B
                layers = {k: v * scale if k.endswith(LORA_UP_KEYS) else v for k, v in layers.items()}
            self.model.save_lora(directory, layers)
        self.accelerator.wait_for_everyone()

    # --- the loop -------------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Runs to `max_steps` optimizer steps, resuming from the latest checkpoint in `output_dir`; returns the
        last logged metrics."""
        from tqdm.auto import tqdm

        config = self.config
        random.seed(config.seed)
        if self.accelerator.is_main_process and os.path.isdir(config.output_dir):
            for stale in os.listdir(config.output_dir):  # left by a run killed while writing a checkpoint
                if stale.startswith(".tmp-checkpoint-"):
                    shutil.rmtree(os.path.join(config.output_dir, stale), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        checkpoints = self.checkpoints()
        if checkpoints:
            self.load_checkpoint(checkpoints[-1])
        if config.report_to:
            hparams = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
            self.accelerator.init_trackers(f"ttalign-{self.name}", config=hparams)
        log_path = os.path.join(config.output_dir, "logs", "metrics.jsonl")
        if self.accelerator.is_main_process:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
        metrics: dict = {}
        self.denoiser.train()
        bar_options = {"total": config.max_steps, "desc": self.name, **self._progress_bar_config}
        bar_options["disable"] = bar_options.get("disable", False) or not self.accelerator.is_main_process
        bar = tqdm(initial=self.step, **bar_options)
        while self.step < config.max_steps:
            for _ in range(config.gradient_accumulation_steps):
                with self.accelerator.accumulate(self.denoiser):
                    loss, step_metrics = self.training_step(self._rng)
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
            self.step += 1
            metrics = {"step": self.step, "loss": loss.item(), **step_metrics}
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
        self.denoiser.eval()
        if config.report_to:
            self.accelerator.end_training()
        return metrics


class _AdaptersDisabled:
    """Disables a peft-adapted module's adapters inside the block (also when it raises)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.disable_adapters()
        return self.module

    def __exit__(self, *exc):
        self.module.enable_adapters()
        return False


#: The file of a LoRA saved in a pipeline's diffusers format.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: The names of a LoRA's down (A) and up (B) projections in the formats diffusers saves.
LORA_DOWN_KEYS = (".lora.down.weight", ".lora_A.weight")
LORA_UP_KEYS = (".lora.up.weight", ".lora_B.weight")


def stack_loras(folders: list[str], out: str) -> None:
    """Writes to `out` one LoRA equal to the LoRAs in `folders` applied in turn: rounds of on-policy training, each
    trained on the model with the rounds before it fused in. `pipe.load_lora_weights(out)` on the first round's base
    model then gives the last round's model, in diffusers too.

    Each LoRA adds `up @ down` to a weight, so the sum of the rounds is one LoRA whose down projections are stacked
    along the rank and whose up projections are set side by side: `[B_1 | B_2] @ [A_1; A_2] = B_1 A_1 + B_2 A_2`
    (`A_i`: `[r_i, in]`, `B_i`: `[out, r_i]`; the rank is the sum of the ranks). Exact for files that diffusers loads
    at scale 1, as `LoRATrainer.save_lora` writes them (alpha / rank in the up weights); files with alpha keys are
    refused.

    Args:
        folders (`list[str]`): folders holding `pytorch_lora_weights.safetensors` (a trainer's `save_lora`), first
            round first; every one must adapt the same layers.
        out (`str`): the folder to write; the file is written whole, then moved in place.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if len(folders) < 2:
        raise ValueError(f"stack_loras needs two LoRAs or more, got {len(folders)}: {folders!r}")
    states = []
    for folder in folders:
        path = os.path.join(folder, LORA_WEIGHTS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No LoRA {LORA_WEIGHTS} in {folder!r}")
        with safe_open(path, "pt") as f:
            states.append({key: f.get_tensor(key) for key in f.keys()})
    for folder, state in zip(folders, states):
        other = set(state) - {k for k in state if k.endswith(LORA_DOWN_KEYS + LORA_UP_KEYS)}
        if other:
            raise ValueError(
                f"The LoRA in {folder!r} has keys other than down / up projections ({sorted(other)[0]!r}, ...): "
                "only LoRAs of scale 1 without alpha keys stack exactly"
            )
        if set(state) != set(states[0]):
            differing = sorted(set(state) ^ set(states[0]))
            raise ValueError(
                f"The LoRAs in {folders[0]!r} and {folder!r} adapt different layers ({differing[0]!r}, ...)"
            )
    stacked = {}
    for key in states[0]:
        # down: [r_i, in] stacked along the rank; up: [out, r_i] side by side
        dim = 0 if key.endswith(LORA_DOWN_KEYS) else 1
        stacked[key] = torch.cat([state[key] for state in states], dim=dim).contiguous()
    os.makedirs(out, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=out, prefix=".tmp-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file(stacked, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out, LORA_WEIGHTS))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
