"""GRPO on the denoising chain: Flow-GRPO (Liu et al. 2025, https://arxiv.org/abs/2505.05470) on flow-matching
pipelines (SD3, FLUX), and the same group-relative objective on DDIM pipelines (SD 1.x/2.x, SDXL).

Each step draws `train_batch_size / group_size` prompts, samples `group_size` images of each with the aligned
pipeline itself, on the stochastic step of :func:`~ttalign.sampling.stochastic_transition` (Flow-GRPO's SDE with noise
level `a`, or its coefficients-preserving variant; DDIM with `eta = a` on the UNet families), recorded by a
:class:`StochasticTrajectory` method with every transition's log-probability, and scores the images. Advantages are
relative to the group, `(r - mean_group) / (std_all + 1e-4)` (Flow-GRPO's per-prompt mean and global std, population
std as its numpy code), clamped to `+-adv_clip_max`. Sampling runs in rounds with PPO's inner epochs
(:mod:`~ttalign.training.rollout`: `rollout_batches`, `num_inner_epochs`). The loss is PPO's clipped objective on the
recorded transitions plus `kl_weight` times the KL divergence between the step's Gaussian under the LoRA model and
under the LoRA-free reference, `||mu_theta - mu_ref||^2 / (2 std^2)` averaged over the latent dimensions, where `std`
is the whole step's standard deviation (the step size kept: flow_grpo's code divides by `std_t^2` without `dt`, its
issue #78).

`sde_window` gives Flow-GRPO-Fast: the trajectory is the ODE except in a window of `sde_window` consecutive steps
starting at a random step of the first `sde_window_range` of the schedule (the high-noise steps), and only the
window's steps are trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttalign.hooks import AlignmentMethod, GenerationState, Stage
from ttalign.rewards.base import check_scores, reward_name
from ttalign.sampling import gaussian_log_prob, scheduler_kind, stochastic_transition

from .losses import gaussian_kl, group_advantages, ppo_clip_loss
from .rollout import (
    Rollout,
    RolloutConfig,
    RolloutTrainer,
    ratio_metrics,
    record_transition,
    rollout_from_trace,
    start_trajectory,
)


@dataclass
class GRPOConfig(RolloutConfig):
    """Settings of :class:`GRPOTrainer`: those of :class:`~ttalign.training.rollout.RolloutConfig` (rounds, inner
    epochs, `clip_range` 1e-4 (Flow-GRPO-Fast uses 1e-5), `adv_clip_max` 5; `train_batch_size` counts images: a
    multiple of `group_size`), and

    Args:
        group_size (`int`, defaults to 4): images per prompt in a step (Flow-GRPO: 24).
        num_inference_steps (`int`, defaults to 10), guidance_scale (`float`, defaults to 4.5): the sampling
            (Flow-GRPO trains with 10 steps, evaluates with 40).
        noise_level (`float`, defaults to 0.7): Flow-GRPO's `a` (0.7 for SD3, 0.9 for FLUX); DDIM's `eta` on the
            UNet families.
        sde_variant (`str`, defaults to `"sde"`): `"sde"` (Flow-GRPO's SDE) or `"cps"` (coefficients-preserving).
        kl_weight (`float`, defaults to 0.04): `beta` of the KL term (0.04 for GenEval, 0.01 for PickScore, 0 in
            newer recipes).
        sde_window (`int`, *optional*): Flow-GRPO-Fast's window of stochastic (and trained) steps; `None`: every
            stochastic step.
        sde_window_range (`tuple[float, float]`, defaults to `(0.0, 0.5)`): the share of the schedule the window may
            start in.

    `timestep_fraction` trains on that share of the stochastic steps, the highest-noise ones first.
    """

    group_size: int = 4
    num_inference_steps: int = 10
    guidance_scale: float = 4.5
    noise_level: float = 0.7
    sde_variant: str = "sde"
    kl_weight: float = 0.04
    sde_window: int | None = None
    sde_window_range: tuple[float, float] = (0.0, 0.5)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(
                f"group_size must be an integer >= 2 (advantages are relative to the group), got {self.group_size!r}."
            )
        if self.train_batch_size % self.group_size:
            raise ValueError(
                f"train_batch_size ({self.train_batch_size}) must be a multiple of group_size ({self.group_size})."
            )
        if not self.noise_level > 0:
            raise ValueError(f"noise_level must be > 0 (a stochastic step), got {self.noise_level!r}.")
        if self.sde_variant not in ("sde", "cps"):
            raise ValueError(f"sde_variant must be 'sde' or 'cps', got {self.sde_variant!r}.")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight!r}.")
        if self.sde_window is not None and (not isinstance(self.sde_window, int) or self.sde_window < 1):
            raise ValueError(f"sde_window must be an integer >= 1 or None, got {self.sde_window!r}.")
        lo, hi = self.sde_window_range
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"sde_window_range must satisfy 0 <= start <= stop <= 1, got {self.sde_window_range}.")


class StochasticTrajectory(AlignmentMethod):
    """Samples the call on the RL trainers' stochastic step and records it: at each step of `steps` (all by default)
    the pipeline's output is replaced by a draw from :func:`~ttalign.sampling.stochastic_transition` (noise from
    `generator`), and `(x_t, x_{t-1}, log p(x_{t-1} | x_t))` go to `out.traces["trajectory"]`; other steps keep the
    pipeline's own (deterministic) step. Steps into sigma 0 of a flow schedule are deterministic and never recorded."""

    stages = (Stage.NOISE_PRED, Stage.STEP_END)

    def __init__(self, noise_level: float, variant: str = "sde", steps=None, generator: torch.Generator | None = None):
        self.noise_level, self.variant = noise_level, variant
        self.steps = None if steps is None else set(steps)
        self.generator = generator

    def setup(self, state: GenerationState) -> None:
        start_trajectory(state)

    def stochastic(self, scheduler, index: int) -> bool:
        if self.steps is not None and index not in self.steps:
            return False
        return scheduler_kind(scheduler) != "flow" or float(scheduler.sigmas[index + 1]) > 0

    def on_noise_pred(self, state: GenerationState) -> None:
        state.scratch[self] = state.latents

    @torch.no_grad()
    def on_step_end(self, state: GenerationState) -> None:
        i, scheduler, x_t = state.step_index, state.family.scheduler, state.scratch[self]
        if not self.stochastic(scheduler, i):
            return
        mean, std = stochastic_transition(scheduler, i, state.noise_pred, x_t, self.noise_level, self.variant)
        noise = torch.randn(mean.shape, generator=self.generator).to(mean.device)
        state.latents = (mean + std * noise).to(x_t.dtype)  # [N, ...]
        record_transition(state, x_t, gaussian_log_prob(state.latents.float(), mean, std))


class GRPOTrainer(RolloutTrainer):
    """Fine-tunes a pipeline's denoiser with LoRA by GRPO: Flow-GRPO on SD3 / FLUX, the same objective with DDIM
    log-probabilities on SD 1.x/2.x and SDXL. See the module docstring for the objective.

    Args:
        pipe: a flow-matching pipeline (`FlowMatchEulerDiscreteScheduler`) or one with a `DDIMScheduler`.
        config (:class:`GRPOConfig`).
        reward: any reward (differentiable or not), `reward(images [0, 1], prompts) -> [N]`.
        prompts (`list[str]`): training prompts, drawn uniformly.

    Example:

    ```py
    >>> from ttalign.shapes import FLOW_SAMPLING_DEFAULTS, ShapesSoftVerifier, evaluation_prompts, load_pipeline
    >>> from ttalign.training import FlowGRPOConfig, FlowGRPOTrainer
    >>> pipe = load_pipeline("flow")
    >>> config = FlowGRPOConfig(max_steps=20, train_batch_size=8, group_size=4, output_dir="grpo",
    ...                         encode_options={"max_sequence_length": FLOW_SAMPLING_DEFAULTS["max_sequence_length"]})
    >>> FlowGRPOTrainer(pipe, config, ShapesSoftVerifier(), [p for p, _ in evaluation_prompts(10)]).train()
    ```
    """

    name = "grpo"

    def __init__(self, pipe, config: GRPOConfig, reward: Callable, prompts: list[str]):
        from ttalign.pipelines import family_for

        scheduler = family_for(pipe).scheduler
        if scheduler_kind(scheduler) not in ("flow", "ddim"):
            raise ValueError(
                f"GRPO samples with a flow-matching or DDIM scheduler; the pipeline has {type(scheduler).__name__}."
            )
        super().__init__(pipe, config, reward, prompts)

    def stochastic_steps(self, generator: torch.Generator) -> list[int] | None:
        """The steps sampled stochastically this time: all (`None`), or Flow-GRPO-Fast's random window."""
        c = self.config
        if c.sde_window is None:
            return None
        n = c.num_inference_steps
        lo = math.floor(c.sde_window_range[0] * n)
        hi = max(lo, min(math.floor(c.sde_window_range[1] * n), n - 1 - c.sde_window))
        start = lo + int(torch.randint(0, hi - lo + 1, (1,), generator=generator))
        return list(range(start, min(start + c.sde_window, n)))

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> Rollout:
        """Samples `train_batch_size` trajectories, `group_size` per prompt, with the current weights; scores them."""
        c = self.config
        groups = c.train_batch_size // c.group_size
        picks = torch.randint(0, len(self.prompts), (groups,), generator=generator).tolist()
        prompts = [self.prompts[i] for i in picks for _ in range(c.group_size)]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        recorder = StochasticTrajectory(
            c.noise_level, c.sde_variant, self.stochastic_steps(generator), torch.Generator().manual_seed(seed + 1)
        )
        self.denoiser.eval()
        out = self.sampler_pipe(
            prompts,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            height=self.size,
            width=self.size,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed),
            alignment=[recorder],
            **c.encode_options,
        )
        self.denoiser.train()
        rewards = check_scores(self.reward(out.images.float(), prompts), len(prompts), reward_name(self.reward))
        rewards = rewards.float().cpu()
        advantages = group_advantages(rewards, prompts, c.adv_clip_max)
        return rollout_from_trace(out, rewards, advantages, prompts, self.sampler_pipe.scheduler)

    def policy_loss(self, rollout: Rollout, rows: list[int]) -> tuple[torch.Tensor, dict]:
        """PPO-clip (+ KL) on the recorded transitions `rows` (positions in `rollout.steps`), under the current
        weights, with the conditioning and the schedule the sampling call used."""
        c, device = self.config, self.accelerator.device
        scheduler = rollout.scheduler
        model = self.model.replace(scheduler=scheduler)
        advantages = rollout.advantages.to(device)
        losses, new, old, kls = [], [], [], []
        for row in rows:
            j = rollout.steps[row]
            x_t, prev = rollout.latents[row].to(device), rollout.next_latents[row].to(device)
            t = rollout.timesteps[row].to(device)

            def guided(x_t=x_t, t=t):
                return model.denoise(x_t, t, rollout.conditioning, c.guidance_scale)

            mean, std = stochastic_transition(scheduler, j, guided(), x_t, c.noise_level, c.sde_variant)
            log_prob = gaussian_log_prob(prev.float(), mean, std)  # [N]
            old_log_prob = rollout.log_probs[row].to(device)
            new.append(log_prob)
            old.append(old_log_prob)
            loss, _ = ppo_clip_loss(log_prob, old_log_prob, advantages, c.clip_range)
            if c.kl_weight > 0:
                with torch.no_grad(), self.reference_mode():
                    mean_ref, _ = stochastic_transition(scheduler, j, guided(), x_t, c.noise_level, c.sde_variant)
                kl = gaussian_kl(mean, mean_ref, std).mean()
                kls.append(kl.item())
                loss = loss + c.kl_weight * kl
            losses.append(loss)
        metrics = {"reward": rollout.rewards.mean().item(), **ratio_metrics(new, old, c.clip_range)}
        if kls:
            metrics["kl"] = sum(kls) / len(kls)
        return torch.stack(losses).mean(), metrics

    def training_rows(self, rollout: Rollout, generator: torch.Generator) -> list[int]:
        """The highest-noise `timestep_fraction` of the recorded steps."""
        return list(range(max(1, math.ceil(self.config.timestep_fraction * len(rollout.steps)))))


#: Flow-GRPO is :class:`GRPOTrainer` on a flow-matching pipeline.
FlowGRPOTrainer = GRPOTrainer
FlowGRPOConfig = GRPOConfig
