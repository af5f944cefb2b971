"""Training: `DiffusionDPOTrainer`, `DiffusionKTOTrainer`, `DDPOTrainer` (with DPOK's KL term) and
`RewardBackpropTrainer` (DRaFT-K, AlignProp, ReFL), on one LoRA / accelerate / checkpoint base, and their losses."""

from .ddpo import DDPOConfig, DDPOTrainer, TrajectoryRecorder
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
from .trainer import LoRATrainer, TrainingConfig, crop_geometry, image_to_tensor

__all__ = [
    "DDPOConfig",
    "DDPOTrainer",
    "DPOConfig",
    "DiffusionDPOTrainer",
    "DiffusionKTOTrainer",
    "KTOConfig",
    "LoRATrainer",
    "RewardBackpropConfig",
    "RewardBackpropTrainer",
    "TrainingConfig",
    "TrajectoryRecorder",
    "crop_geometry",
    "image_to_tensor",
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
