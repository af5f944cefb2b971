"""Training: `DiffusionDPOTrainer` and `DiffusionKTOTrainer` (LoRA, accelerate, atomic checkpoints and resume), and
the losses of Diffusion-DPO, Diffusion-KTO, DDPO / DPOK and reward backpropagation.

`DDPOTrainer` and `RewardBackpropTrainer` are not implemented yet: accessing one raises `NotImplementedError`.
"""

from .dpo import DiffusionDPOTrainer, DiffusionKTOTrainer, DPOConfig, KTOConfig, load_feedback
from .losses import (
    diffusion_dpo_loss,
    diffusion_kto_loss,
    dpok_loss,
    normalize_advantages,
    per_sample_mse,
    ppo_clip_loss,
    refl_loss,
    reinforce_loss,
)
from .trainer import LoRATrainer, TrainingConfig

_PLANNED = ("DDPOTrainer", "RewardBackpropTrainer")


def __getattr__(name: str):
    if name in _PLANNED:
        raise NotImplementedError(f"ttalign.training.{name} is not implemented yet; the losses are available.")
    raise AttributeError(f"module 'ttalign.training' has no attribute {name!r}")


__all__ = [
    "DPOConfig",
    "DiffusionDPOTrainer",
    "DiffusionKTOTrainer",
    "KTOConfig",
    "LoRATrainer",
    "TrainingConfig",
    "load_feedback",
    "diffusion_dpo_loss",
    "diffusion_kto_loss",
    "dpok_loss",
    "normalize_advantages",
    "per_sample_mse",
    "ppo_clip_loss",
    "refl_loss",
    "reinforce_loss",
]
