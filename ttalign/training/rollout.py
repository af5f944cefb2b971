"""What the trainers that learn from their own samples share (DDPO, GRPO / Flow-GRPO, D3PO, SPO and the weighted-
matching trainers): sampling rounds and PPO's inner epochs over them, as ddpo-pytorch
(https://github.com/kvablack/ddpo-pytorch) and flow_grpo organize them. :class:`RoundTrainer` runs the rounds over any
batch a subclass samples; :class:`RolloutTrainer` adds the recorded trajectories of the policy-gradient trainers.

A round samples `rollout_batches` batches of `train_batch_size` trajectories with the current weights, each stored
as a :class:`Rollout` (latents, next latents, timesteps, log-probabilities, the conditioning the sampling call used,
rewards, advantages, and the scheduler as the call set it). Then `num_inner_epochs` passes take the round's batches in
a shuffled order, one micro-batch each, on the transitions :meth:`RolloutTrainer.training_rows` picks. The first
optimizer step of a round scores the transitions under the weights that sampled them (ratio 1); every later one is
off-policy, which is where PPO's clip acts. Each step logs the ratio's mean, min and max, the clip fraction and the
approximate KL `0.5 * mean((log p - log p_old)^2)` (ddpo-pytorch's).

A round lives in memory only: a run resumed from a checkpoint starts a new round.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from .trainer import LoRATrainer, TrainingConfig


@dataclass
class RoundsConfig(TrainingConfig):
    """Settings of the trainers that learn from their own samples in rounds: those of :class:`TrainingConfig`, and

    Args:
        rollout_batches (`int`, defaults to 1): sampling calls of `train_batch_size` images per round
            (ddpo-pytorch's `sample.num_batches_per_epoch`).
        num_inner_epochs (`int`, defaults to 1): passes over a round's batches (ddpo-pytorch's
            `train.num_inner_epochs`). With both at 1 every optimizer step is on-policy.
        adv_clip_max (`float`, defaults to 5.0): advantages are clamped to `+-adv_clip_max`.
    """

    rollout_batches: int = 1
    num_inner_epochs: int = 1
    adv_clip_max: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        for key in ("rollout_batches", "num_inner_epochs"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{type(self).__name__}.{key} must be an integer >= 1, got {getattr(self, key)!r}.")
        if self.adv_clip_max <= 0:
            raise ValueError(f"adv_clip_max must be > 0, got {self.adv_clip_max!r}.")

    @property
    def steps_per_round(self) -> int:
        """Micro-batches per round: `rollout_batches * num_inner_epochs`."""
        return self.rollout_batches * self.num_inner_epochs


@dataclass
class RolloutConfig(RoundsConfig):
    """Settings of the policy-gradient trainers (DDPO, GRPO): those of :class:`RoundsConfig` (with both at 1, the
    ratio is 1 at every step and the clip never acts: REINFORCE's gradient), and

    Args:
        clip_range (`float`, defaults to 1e-4): PPO's ratio clip.
        timestep_fraction (`float`, defaults to 1.0): the share of a trajectory's recorded transitions trained on in
            a micro-batch (their graphs are held together, so this also bounds memory).
    """

    clip_range: float = 1e-4
    timestep_fraction: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.clip_range <= 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range!r}.")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction!r}.")


@dataclass
class Rollout:
    """One sampling call's trajectories: the recorded step indices `steps` (`T`), their `timesteps` `[T]`, latents and
    next latents `[T, N, ...]`, old log-probabilities `[T, N]`, rewards and advantages `[N]`, the prompts, the
    :class:`~ttalign.pipelines.family.Conditioning` the call used, and a copy of the scheduler as the call set it
    (so the loss reads the trajectory's own schedule, whatever the pipeline's scheduler is set to later)."""

    steps: list[int]
    timesteps: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    prompts: list[str]
    conditioning: Any
    scheduler: Any


def start_trajectory(state) -> None:
    """Opens the `trajectory` trace of a sampling call (the trainers' recording methods call it at setup)."""
    state.traces["trajectory"] = {
        "steps": [],
        "timesteps": [],
        "latents": [],
        "next_latents": [],
        "log_probs": [],
        "conditioning": None,
    }


def record_transition(state, x_t: torch.Tensor, log_prob: torch.Tensor) -> None:
    """Appends the step's transition `x_t -> state.latents`, its log-probability `[N]`, step index and timestep to the
    `trajectory` trace, with the call's conditioning."""
    trace = state.traces["trajectory"]
    trace["conditioning"] = state.conditioning
    trace["steps"].append(state.step_index)
    trace["timesteps"].append(torch.as_tensor(state.timestep).reshape(()).cpu())
    trace["latents"].append(x_t)
    trace["next_latents"].append(state.latents)
    trace["log_probs"].append(log_prob)


def rollout_from_trace(out, rewards: torch.Tensor, advantages: torch.Tensor, prompts: list[str], scheduler) -> Rollout:
    """A :class:`Rollout` from a sampling call's output (its `trajectory` trace)."""
    trace = out.traces["trajectory"]
    if not trace["steps"]:
        raise RuntimeError("The sampling call recorded no stochastic transition to train on.")
    return Rollout(
        trace["steps"],
        torch.stack(trace["timesteps"]),
        torch.stack(trace["latents"]),
        torch.stack(trace["next_latents"]),
        torch.stack(trace["log_probs"]),
        rewards,
        advantages,
        prompts,
        trace["conditioning"],
        copy.deepcopy(scheduler),
    )


def ratio_metrics(log_probs: list[torch.Tensor], old_log_probs: list[torch.Tensor], clip_range: float) -> dict:
    """The importance ratios of a micro-batch's transitions: mean, min and max of `exp(log p - log p_old)`, the share
    outside `1 +- clip_range` (clip fraction) and ddpo-pytorch's approximate KL `0.5 * mean((log p - log p_old)^2)`."""
    diff = torch.cat([(a.detach() - b).float().flatten() for a, b in zip(log_probs, old_log_probs)])
    ratio = diff.exp()
    return {
        "ratio": ratio.mean().item(),
        "ratio_min": ratio.min().item(),
        "ratio_max": ratio.max().item(),
        "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().item(),
        "approx_kl": (0.5 * diff.pow(2).mean()).item(),
    }


class RoundTrainer(LoRATrainer):
    """Base of the trainers that learn from their own samples: a subclass implements `sample(generator)` (one
    sampling call's batch, any object) and `batch_loss(batch, generator) -> (loss, metrics)`; this class runs the
    rounds (see the module docstring) and calls :meth:`start_round` before sampling each."""

    def __init__(self, pipe, config: RoundsConfig, reward, prompts: list[str]):
        if not prompts:
            raise ValueError(f"{type(self).__name__} needs at least one prompt.")
        super().__init__(pipe, config)
        self.reward, self.prompts = reward, list(prompts)
        self.sampler_pipe = self.model.aligned_pipeline()  # the sampling calls, through the family's aligned pipeline
        self.sampler_pipe.set_progress_bar_config(disable=True)
        self._queue: list[tuple[Any, int]] = []
        self.rounds = 0

    def sample(self, generator: torch.Generator):
        raise NotImplementedError

    def batch_loss(self, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def start_round(self, generator: torch.Generator) -> None:
        """Samples a round and queues its micro-batches for `num_inner_epochs` passes, each in a shuffled order."""
        c = self.config
        batches = [self.sample(generator) for _ in range(c.rollout_batches)]
        self.rounds += 1
        self._queue = []
        for epoch in range(c.num_inner_epochs):
            order = torch.randperm(len(batches), generator=generator).tolist()
            self._queue += [(batches[i], epoch) for i in order]

    def training_step(self, generator: torch.Generator):
        if not self._queue:
            self.start_round(generator)
        batch, epoch = self._queue.pop(0)
        loss, metrics = self.batch_loss(batch, generator)
        return loss, {"round": self.rounds, "inner_epoch": epoch, **metrics}


class RolloutTrainer(RoundTrainer):
    """Base of the policy-gradient trainers: `sample(generator) -> Rollout` and `policy_loss(rollout, rows)` on the
    recorded transitions `rows` (positions in `rollout.steps`, picked by :meth:`training_rows`)."""

    def policy_loss(self, rollout: Rollout, rows: list[int]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def training_rows(self, rollout: Rollout, generator: torch.Generator) -> list[int]:
        """The transitions of a micro-batch: a random `timestep_fraction` of the recorded ones."""
        n = len(rollout.steps)
        count = max(1, round(self.config.timestep_fraction * n))
        return sorted(torch.randperm(n, generator=generator)[:count].tolist())

    def batch_loss(self, batch: Rollout, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        return self.policy_loss(batch, self.training_rows(batch, generator))
