"""Training: `DiffusionDPOTrainer`, `DiffusionKTOTrainer`, `DDPOTrainer` (with DPOK's KL term), `RewardBackpropTrainer`
(DRaFT-K, AlignProp, ReFL), and for flow-matching pipelines `FlowGRPOTrainer` (`GRPOTrainer`, also on DDIM pipelines)
and `FlowDPOTrainer`, on one LoRA / accelerate / checkpoint base, and their losses."""

from .ddpo import DDPOConfig, DDPOTrainer, TrajectoryRecorder
from .dpo import (
    DiffusionDPOTrainer,
    DiffusionKTOTrainer,
    DPOConfig,
    FlowDPOConfig,
    FlowDPOTrainer,
    KTOConfig,
    load_feedback,
)
from .grpo import FlowGRPOConfig, FlowGRPOTrainer, GRPOConfig, GRPOTrainer, StochasticTrajectory
from .losses import (
    diffusion_dpo_loss,
    diffusion_kto_loss,
    dpok_loss,
    gaussian_kl,
    group_advantages,
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
    "FlowDPOConfig",
    "FlowDPOTrainer",
    "FlowGRPOConfig",
    "FlowGRPOTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "KTOConfig",
    "LoRATrainer",
    "RewardBackpropConfig",
    "RewardBackpropTrainer",
    "StochasticTrajectory",
    "TrainingConfig",
    "TrajectoryRecorder",
    "crop_geometry",
    "image_to_tensor",
    "load_feedback",
    "diffusion_dpo_loss",
    "diffusion_kto_loss",
    "dpok_loss",
    "gaussian_kl",
    "group_advantages",
    "normalize_advantages",
    "per_sample_mse",
    "ppo_clip_loss",
    "refl_loss",
    "reinforce_loss",
]
