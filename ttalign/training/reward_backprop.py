"""Reward backpropagation: fine-tune a pipeline's denoiser (LoRA) by differentiating a reward through sampling.

Three modes, through the same :class:`~ttalign.sampler.DifferentiableSampler` as noise optimization:

- `"draft"`: DRaFT-K (Clark et al. 2023, https://arxiv.org/abs/2309.17400), gradients through the last `k` steps.
- `"alignprop"`: AlignProp (Prabhudesai et al. 2023, https://arxiv.org/abs/2310.03739), gradients through a random
  number of last steps (randomized truncation), with per-step checkpointing.
- `"refl"`: ReFL (Xu et al. 2023, https://arxiv.org/abs/2304.05977), sampling without gradients to a random late step,
  then one step predicting x0 directly, scored with `relu(target - reward) * scale`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttalign.rewards.base import check_scores, require_differentiable, reward_name
from ttalign.sampler import DifferentiableSampler
from ttalign.sampling import init_noise_sigma

from .losses import refl_loss
from .trainer import LoRATrainer, TrainingConfig

MODES = ("draft", "alignprop", "refl")


@dataclass
class RewardBackpropConfig(TrainingConfig):
    """Settings of :class:`RewardBackpropTrainer`: those of :class:`TrainingConfig`, and

    Args:
        mode (`str`, defaults to `"draft"`): `"draft"`, `"alignprop"` or `"refl"`.
        k (`int`, defaults to 1): DRaFT's number of differentiated last steps.
        num_inference_steps (`int`, defaults to 25), guidance_scale (`float`, defaults to 5.0), eta (`float`,
            defaults to 0.0): the sampling used during training.
        refl_start (`float`, defaults to 0.7): ReFL stops the gradient-free sampling at a random step in
            `[refl_start * T, T)`.
        refl_target (`float`, defaults to 2.0), refl_scale (`float`, defaults to 1e-3): ReFL's loss
            `relu(target - reward) * scale` (ImageReward's values; other rewards have other scales).
    """

    mode: str = "draft"
    k: int = 1
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    eta: float = 0.0
    refl_start: float = 0.7
    refl_target: float = 2.0
    refl_scale: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if not 1 <= self.k <= self.num_inference_steps:
            raise ValueError(f"k must be in [1, num_inference_steps], got k={self.k}.")
        if not 0 <= self.refl_start < 1:
            raise ValueError(f"refl_start must be in [0, 1), got {self.refl_start!r}.")


class RewardBackpropTrainer(LoRATrainer):
    """Fine-tunes a pipeline's denoiser with LoRA by backpropagating a differentiable reward through sampling.

    Args:
        pipe: a pipeline of a supported family (SD 1.x/2.x, SDXL) whose scheduler the sampler supports (DDIM, Euler,
            Euler ancestral, LCM).
        config (:class:`RewardBackpropConfig`).
        reward: a differentiable reward (`reward.differentiable`).
        prompts (`list[str]`): the training prompts, drawn uniformly.

    Example:

    ```py
    >>> from ttalign.shapes import ShapesSoftVerifier, evaluation_prompts, load_pipeline
    >>> from ttalign.training import RewardBackpropConfig, RewardBackpropTrainer
    >>> pipe = load_pipeline()
    >>> config = RewardBackpropConfig(mode="draft", k=1, max_steps=50, output_dir="draft")
    >>> trainer = RewardBackpropTrainer(pipe, config, ShapesSoftVerifier(), [p for p, _ in evaluation_prompts(10)])
    >>> trainer.train()
    ```
    """

    name = "reward-backprop"

    def __init__(self, pipe, config: RewardBackpropConfig, reward: Callable, prompts: list[str]):
        require_differentiable(reward, "RewardBackpropTrainer", "; otherwise use DDPOTrainer")
        if not prompts:
            raise ValueError("RewardBackpropTrainer needs at least one prompt.")
        super().__init__(pipe, config)
        self.reward, self.prompts = reward, list(prompts)
        self.scheduler = type(self.model.scheduler).from_config(self.model.scheduler.config)

    def training_step(self, generator):
        c, device = self.config, self.accelerator.device
        picks = torch.randint(0, len(self.prompts), (c.train_batch_size,), generator=generator).tolist()
        prompts = [self.prompts[i] for i in picks]
        # the trainer's own scheduler and the accelerate-prepared denoiser (gradients synchronized across processes)
        model = self.model.replace(scheduler=self.scheduler)
        with torch.no_grad():
            cond = model.encode_prompt(
                prompts,
                device,
                do_cfg=c.guidance_scale > 1,
                height=self.size,
                width=self.size,
                guidance_scale=c.guidance_scale,
                **c.encode_options,
            )
        model.set_timesteps(c.num_inference_steps, device, self.size, self.size)
        sampler = DifferentiableSampler(
            model, cond, guidance_scale=c.guidance_scale, eta=c.eta, gradient_checkpointing=True
        )
        shape = model.latents_shape(len(prompts), self.size, self.size)
        latents = torch.randn(shape, generator=generator).to(device) * init_noise_sigma(self.scheduler)
        noises = sampler.draw_noises(shape, generator, device)
        steps = sampler.num_steps
        if c.mode == "refl":
            stop = int(torch.randint(int(c.refl_start * steps), steps, (1,), generator=generator))
            with torch.no_grad():
                latents = sampler.sample(latents, noises, 0, stop)
            output = sampler.model_output(stop, latents)
            x0 = model.predict_x0(output, self.scheduler.timesteps[stop], latents)
            rewards = self._reward(sampler.decode(x0), prompts)
            return refl_loss(rewards, c.refl_scale, c.refl_target), {"reward": rewards.mean().item(), "stop": stop}
        k = c.k if c.mode == "draft" else int(torch.randint(1, steps + 1, (1,), generator=generator))
        with torch.no_grad():
            latents = sampler.sample(latents, noises, 0, steps - k)
        latents = sampler.sample(latents, noises, steps - k, steps)
        rewards = self._reward(sampler.decode(latents), prompts)
        return -rewards.mean(), {"reward": rewards.mean().item(), "k": k}

    def _reward(self, images, prompts):
        return check_scores(self.reward(images, prompts), len(prompts), reward_name(self.reward)).float()
