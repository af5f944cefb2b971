"""Training: `DiffusionDPOTrainer`, `DiffusionKTOTrainer` and `RewardBackpropTrainer` (LoRA, accelerate, atomic
checkpoints and resume), and the losses of Diffusion-DPO, Diffusion-KTO, DDPO / DPOK and reward backpropagation.

`DDPOTrainer` is not implemented yet: accessing it raises `NotImplementedError`.
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
from .reward_backprop import RewardBackpropConfig, RewardBackpropTrainer
from .trainer import LoRATrainer, TrainingConfig

_PLANNED = ("DDPOTrainer",)


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
    "RewardBackpropConfig",
    "RewardBackpropTrainer",
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
