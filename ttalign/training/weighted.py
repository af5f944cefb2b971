"""Fine-tuning on the model's own samples with one weighted denoising / flow-matching loss: reward-weighted regression
(RWR), RAFT (best-of-N fine-tuning), Advantage Weighted Matching (AWM) and DiffusionNFT, each a small configuration of
:class:`WeightedMatchingTrainer`.

A round (:mod:`~ttalign.training.rollout`) samples `train_batch_size` images per sampling call, `group_size` per
prompt, with any sampler (the pipeline's own), and keeps only what these methods need: the clean latents `x0`, the
conditioning of the call and the rewards. A micro-batch then noises `x0` afresh (`noise`, and a timestep drawn per
image: uniform over the training timesteps, or logit-normal sigma on flow matching) and computes the denoiser's
prediction on the conditional branch. Each method turns that into a loss (formulas in REFERENCES.md):

- RWR (Lee et al. 2023, https://arxiv.org/abs/2302.12192; DDPO's baseline, https://arxiv.org/abs/2305.13301):
  `mean(w_i * e_i)` with `e_i` the per-image denoising error and `w = N * softmax(r / temperature)` over the batch.
- RAFT (Dong et al. 2023, https://arxiv.org/abs/2304.06767): the plain denoising loss on the best `keep` images of each
  prompt's group, `sum(w_i e_i) / sum(w_i)` with `w` 0 or 1.
- AWM (Xue et al. 2025, https://arxiv.org/abs/2509.25050), flow matching: `mean(A_i * g_i)` with `A` the group
  advantage clamped to `+-adv_clip_max` and divided by it, and `g = sigma * ((e + 1e-10)^0.25 - 1e-10^0.25) / 0.25`;
  plus `kl_weight * ||v - v_ref||^2` (the LoRA-free model) and `ema_weight * ||v - v_ema||^2` (an EMA of the LoRA with
  decay `min(0.3, 0.001 * step)`).
- DiffusionNFT (Zheng et al. 2025, https://arxiv.org/abs/2509.16117), flow matching: with `v_old` the old policy (an
  EMA of the LoRA with decay `min(0.001 * step, 0.5)`, updated before each round, which also samples),
  `v+ = beta v + (1 - beta) v_old`, `v- = (1 + beta) v_old - beta v`, `x0± = x_t - sigma v±`,
  `L± = mean((x0± - x0)^2 / sg(mean |x0± - x0|))`, `r = clamp(0.5 + A / (2 adv_clip_max), 0, 1)` and
  `loss = adv_clip_max * mean(r L+ + (1 - r) L-) / beta + kl_weight * ||v - v_ref||^2`.

The per-image error `e` is the mean squared error to the family's training target (noise, `v` or the flow velocity
`noise - x0`), in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ttalign.hooks import AlignmentMethod, GenerationState, Stage
from ttalign.rewards.base import check_scores, reward_name

from .losses import (
    awm_loss,
    group_advantages,
    nft_loss,
    per_sample_mse,
    raft_weights,
    rwr_weights,
    weighted_matching_loss,
)
from .noising import draw_noise_and_timesteps, noised_and_target
from .rollout import RoundsConfig, RoundTrainer

# --- configurations -------------------------------------------------------------------------------------------------


@dataclass
class WeightedMatchingConfig(RoundsConfig):
    """Settings shared by the weighted-matching trainers: those of :class:`~ttalign.training.rollout.RoundsConfig`
    (`train_batch_size` counts images: a multiple of `group_size`), and

    Args:
        group_size (`int`, defaults to 4): images per prompt in a sampling call.
        num_inference_steps (`int`, defaults to 10), guidance_scale (`float`, defaults to 4.5): the sampling.
        timestep_sampling (`str`, *optional*): `"uniform"` (training timesteps uniform; flow: sigma uniform in
            (0, 1)) or `"logit_normal"` (flow matching only: SD3's `sigmoid(N(0, 1))`); default: logit-normal on flow
            matching, uniform otherwise.
        kl_weight (`float`, defaults to 0.0): `kl_weight * mean((pred - pred_ref)^2)` to the LoRA-free model.
    """

    group_size: int = 4
    num_inference_steps: int = 10
    guidance_scale: float = 4.5
    timestep_sampling: str | None = None
    kl_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be an integer >= 1, got {self.group_size!r}.")
        if self.train_batch_size % self.group_size:
            raise ValueError(
                f"train_batch_size ({self.train_batch_size}) must be a multiple of group_size ({self.group_size})."
            )
        if self.timestep_sampling not in (None, "uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'logit_normal', got {self.timestep_sampling!r}.")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight!r}.")


@dataclass
class RWRConfig(WeightedMatchingConfig):
    """:class:`WeightedMatchingConfig` and `temperature` (`float`, defaults to 5.0): `w = N softmax(r / temperature)`
    (DDPO's RWR baseline)."""

    temperature: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")


@dataclass
class RAFTConfig(WeightedMatchingConfig):
    """:class:`WeightedMatchingConfig` and `keep` (`int`, defaults to 1): the best `keep` images of each prompt's
    group are fine-tuned on (`group_size` 4 by default: best of 4); `min_reward` (`float`, *optional*): images
    rewarded below it are never kept, so a pass/fail reward (`shapes_exact`) with `min_reward=0.5` trains only on
    images that pass."""

    keep: int = 1
    min_reward: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.keep, int) or not 1 <= self.keep <= self.group_size:
            raise ValueError(f"keep must be an integer in [1, group_size={self.group_size}], got {self.keep!r}.")
        if self.min_reward is not None and (
            not isinstance(self.min_reward, (int, float)) or not math.isfinite(self.min_reward)
        ):
            raise ValueError(f"min_reward must be a finite number or None, got {self.min_reward!r}.")


@dataclass
class AWMConfig(WeightedMatchingConfig):
    """:class:`WeightedMatchingConfig` with AWM's defaults (`kl_weight` 0.001, CFG-free sampling: `guidance_scale`
    1.0), and `ema_weight` (`float`, defaults to 1.0): `ema_weight * mean((v - v_ema)^2)` to an EMA of the LoRA
    (decay `min(0.3, 0.001 * step)`)."""

    guidance_scale: float = 1.0
    kl_weight: float = 0.001
    ema_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.ema_weight < 0:
            raise ValueError(f"ema_weight must be >= 0, got {self.ema_weight!r}.")


@dataclass
class DiffusionNFTConfig(WeightedMatchingConfig):
    """:class:`WeightedMatchingConfig` with DiffusionNFT's defaults (`kl_weight` 1e-4, CFG-free sampling:
    `guidance_scale` 1.0), and `beta` (`float`, defaults to 1.0): the guidance strength of the implicit positive and
    negative policies (0.1 in its OCR and multi-reward runs)."""

    guidance_scale: float = 1.0
    kl_weight: float = 1e-4
    beta: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}.")


# --- the trainers ---------------------------------------------------------------------------------------------------


class FinalLatents(AlignmentMethod):
    """Records the final latents and the conditioning of a pipeline call (output stage) in `out.traces["samples"]`."""

    stages = (Stage.OUTPUT,)

    def on_output(self, state: GenerationState) -> None:
        state.traces["samples"] = {"latents": state.latents, "conditioning": state.conditioning}


@dataclass
class Samples:
    """One sampling call's images as the weighted-matching trainers keep them: clean latents `x0` `[N, ...]`, the
    call's conditioning, rewards and group advantages `[N]`, prompts."""

    latents: torch.Tensor
    conditioning: object
    rewards: torch.Tensor
    advantages: torch.Tensor
    prompts: list[str]


class LoRACopy:
    """A copy of a trainer's LoRA weights (an old or EMA policy): `update(decay)` moves it to
    `decay * copy + (1 - decay) * current`; inside `applied()` the denoiser runs with the copy's weights."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.values = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for value, p in zip(self.values, self.params):
            value.mul_(decay).add_(p.detach(), alpha=1 - decay)

    def applied(self):
        return _Swapped(self)


class _Swapped:
    def __init__(self, copy: LoRACopy):
        self.copy = copy

    @torch.no_grad()
    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.copy.params]
        for p, value in zip(self.copy.params, self.copy.values):
            p.copy_(value)

    @torch.no_grad()
    def __exit__(self, *exc):
        for p, value in zip(self.copy.params, self.saved):
            p.copy_(value)
        return False


class WeightedMatchingTrainer(RoundTrainer):
    """Fine-tunes a pipeline's denoiser with LoRA on its own samples by a weighted denoising / flow-matching loss (see
    the module docstring); :class:`RWRTrainer`, :class:`RAFTTrainer`, :class:`AWMTrainer` and
    :class:`DiffusionNFTTrainer` are its configurations.

    Args:
        pipe: a pipeline of a supported family (SD 1.x/2.x, SDXL, SD3, FLUX; AWM and DiffusionNFT: SD3, FLUX).
        config (:class:`WeightedMatchingConfig` or a method's subclass).
        reward: any reward (differentiable or not), `reward(images [0, 1], prompts) -> [N]`.
        prompts (`list[str]`): training prompts, drawn uniformly.
    """

    name = "weighted-matching"
    #: Whether the method is defined on flow matching's velocity only.
    flow_only = False

    def __init__(self, pipe, config: WeightedMatchingConfig, reward: Callable, prompts: list[str]):
        from ttalign.pipelines import family_for

        family = family_for(pipe)
        self.flow = "flow_matching" in family.features
        if self.flow_only and not self.flow:
            raise NotImplementedError(
                f"{type(self).__name__} is defined on flow matching's velocity (SD3, FLUX); its noise-prediction "
                f"form for {type(pipe).__name__} is not implemented. RWRTrainer and RAFTTrainer run there."
            )
        if config.timestep_sampling == "logit_normal" and not self.flow:
            raise ValueError("timestep_sampling='logit_normal' is for flow-matching pipelines (SD3, FLUX).")
        super().__init__(pipe, config, reward, prompts)
        self.noise_scheduler = type(self.model.scheduler).from_config(self.model.scheduler.config)
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps

    # --- sampling ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> Samples:
        """Samples `train_batch_size` images, `group_size` per prompt, and scores them."""
        c = self.config
        groups = c.train_batch_size // c.group_size
        picks = torch.randint(0, len(self.prompts), (groups,), generator=generator).tolist()
        prompts = [self.prompts[i] for i in picks for _ in range(c.group_size)]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self.denoiser.eval()
        with self.sampling_weights():
            out = self.sampler_pipe(
                prompts,
                num_inference_steps=c.num_inference_steps,
                guidance_scale=c.guidance_scale,
                height=self.size,
                width=self.size,
                output_type="pt",
                generator=torch.Generator().manual_seed(seed),
                alignment=[FinalLatents()],
                **c.encode_options,
            )
        self.denoiser.train()
        rewards = check_scores(self.reward(out.images.float(), prompts), len(prompts), reward_name(self.reward))
        rewards = rewards.float().cpu()
        trace = out.traces["samples"]
        return Samples(
            trace["latents"],
            trace["conditioning"],
            rewards,
            group_advantages(rewards, prompts, c.adv_clip_max),
            prompts,
        )

    def sampling_weights(self):
        """The weights the sampling runs with: the current LoRA (DiffusionNFT: the old policy)."""
        return nullcontext()

    # --- the loss ---------------------------------------------------------------------------------------------------

    def noised(self, x0: torch.Tensor, generator: torch.Generator):
        """Fresh noise and a timestep per image: `(x_t, target, timesteps, sigma)`; `sigma` `[N]` is flow matching's
        (`None` otherwise). See :mod:`~ttalign.training.noising`."""
        sampling = self.config.timestep_sampling or "logit_normal"
        noise, timesteps = draw_noise_and_timesteps(x0, generator, self.num_train_timesteps, self.flow, sampling)
        x_t, target = noised_and_target(self.noise_scheduler, x0, noise, timesteps, self.flow)
        return x_t, target, timesteps, (timesteps / self.num_train_timesteps if self.flow else None)

    def batch_loss(self, batch: Samples, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        c = self.config
        x0 = batch.latents
        x_t, target, timesteps, sigma = self.noised(x0, generator)
        # the LoRA copies' predictions first: they swap weights in place, which must not happen once the trained
        # forward has saved its tensors for the backward
        copies = self.copy_predictions(x_t, timesteps, batch.conditioning)
        pred = self.model.forward(x_t, timesteps, batch.conditioning, cfg=False)
        loss, metrics = self.objective(pred, target, x_t, x0, sigma, batch, copies)
        if c.kl_weight > 0:
            with torch.no_grad(), self.reference_mode():
                ref = self.model.forward(x_t, timesteps, batch.conditioning, cfg=False)
            kl = per_sample_mse(pred, ref).mean()
            loss = loss + c.kl_weight * kl
            metrics["kl"] = kl.item()
        return loss, {"reward": batch.rewards.mean().item(), **metrics}

    @torch.no_grad()
    def copy_predictions(self, x_t, timesteps, conditioning) -> dict:
        """Predictions of the method's LoRA copies (DiffusionNFT's old policy, AWM's EMA) at `x_t`; none here."""
        return {}

    def objective(self, pred, target, x_t, x0, sigma, batch: Samples, copies: dict) -> tuple[torch.Tensor, dict]:
        """The method's loss on the micro-batch (see the module docstring) and its metrics."""
        raise NotImplementedError


class RWRTrainer(WeightedMatchingTrainer):
    """Reward-weighted regression: the denoising loss weighted by `N softmax(r / temperature)` (:class:`RWRConfig`).

    Example:

    ```py
    >>> from ttalign.shapes import ShapesSoftVerifier, evaluation_prompts, load_pipeline
    >>> from ttalign.training import RWRConfig, RWRTrainer
    >>> trainer = RWRTrainer(load_pipeline(), RWRConfig(max_steps=20, output_dir="rwr"), ShapesSoftVerifier(),
    ...                      [p for p, _ in evaluation_prompts(10)])
    >>> trainer.train()
    ```
    """

    name = "rwr"

    def objective(self, pred, target, x_t, x0, sigma, batch, copies):
        weights = rwr_weights(batch.rewards, self.config.temperature)
        errors = per_sample_mse(pred, target)
        return weighted_matching_loss(errors, weights), {"weight_max": weights.max().item()}


class RAFTTrainer(WeightedMatchingTrainer):
    """RAFT: the plain denoising loss on the best `keep` images of each prompt's group (:class:`RAFTConfig`).

    Example:

    ```py
    >>> from ttalign.training import RAFTConfig, RAFTTrainer
    >>> RAFTTrainer(pipe, RAFTConfig(group_size=4, keep=1, output_dir="raft"), reward, prompts).train()
    ```
    """

    name = "raft"

    def objective(self, pred, target, x_t, x0, sigma, batch, copies):
        weights = raft_weights(batch.rewards, batch.prompts, self.config.keep, self.config.min_reward)
        errors = per_sample_mse(pred, target)
        kept_reward = (weights * batch.rewards).sum() / weights.sum().clamp(min=1)
        logs = {"kept_reward": kept_reward.item(), "kept": weights.sum().item()}
        return weighted_matching_loss(errors, weights, normalize=True), logs


class AWMTrainer(WeightedMatchingTrainer):
    """Advantage Weighted Matching on flow-matching pipelines (SD3, FLUX): `mean(A * ghuber(e))` with group advantages,
    plus the KL to the LoRA-free model and the pull to an EMA of the LoRA (:class:`AWMConfig`).

    Example:

    ```py
    >>> from ttalign.training import AWMConfig, AWMTrainer
    >>> AWMTrainer(sd3, AWMConfig(group_size=4, output_dir="awm"), reward, prompts).train()
    ```
    """

    name = "awm"
    flow_only = True

    def __init__(self, pipe, config: AWMConfig, reward: Callable, prompts: list[str]):
        super().__init__(pipe, config, reward, prompts)
        self.ema = LoRACopy(self.params)

    @torch.no_grad()
    def copy_predictions(self, x_t, timesteps, conditioning) -> dict:
        if self.config.ema_weight == 0:
            return {}
        with self.ema.applied():
            return {"ema": self.model.forward(x_t, timesteps, conditioning, cfg=False)}

    def objective(self, pred, target, x_t, x0, sigma, batch, copies):
        c = self.config
        errors = per_sample_mse(pred, target)
        loss = awm_loss(errors, sigma, batch.advantages.to(errors.device), c.adv_clip_max)
        metrics = {}
        if c.ema_weight > 0:
            pull = per_sample_mse(pred, copies["ema"]).mean()
            loss = loss + c.ema_weight * pull
            metrics["ema_distance"] = pull.item()
        return loss, metrics

    def training_step(self, generator):
        self.ema.update(min(0.3, 0.001 * self.step))
        return super().training_step(generator)

    def extra_state(self):
        return {f"ema.{i}": v for i, v in enumerate(self.ema.values)}

    def load_extra_state(self, tensors):
        for i, value in enumerate(self.ema.values):
            value.copy_(tensors[f"ema.{i}"])


class DiffusionNFTTrainer(WeightedMatchingTrainer):
    """DiffusionNFT on flow-matching pipelines (SD3, FLUX): negative-aware fine-tuning on the forward process, the old
    policy an EMA of the LoRA that also samples (:class:`DiffusionNFTConfig`).

    Example:

    ```py
    >>> from ttalign.training import DiffusionNFTConfig, DiffusionNFTTrainer
    >>> DiffusionNFTTrainer(sd3, DiffusionNFTConfig(group_size=4, output_dir="nft"), reward, prompts).train()
    ```
    """

    name = "diffusion-nft"
    flow_only = True

    def __init__(self, pipe, config: DiffusionNFTConfig, reward: Callable, prompts: list[str]):
        super().__init__(pipe, config, reward, prompts)
        self.old = LoRACopy(self.params)

    def sampling_weights(self):
        return self.old.applied()

    def start_round(self, generator):
        self.old.update(min(0.001 * self.step, 0.5))
        super().start_round(generator)

    @torch.no_grad()
    def copy_predictions(self, x_t, timesteps, conditioning) -> dict:
        with self.old.applied():
            return {"old": self.model.forward(x_t, timesteps, conditioning, cfg=False)}

    def objective(self, pred, target, x_t, x0, sigma, batch, copies):
        c = self.config
        v_old = copies["old"]
        loss = nft_loss(pred, v_old, x_t, x0, sigma, batch.advantages.to(pred.device), c.beta, c.adv_clip_max)
        return loss, {"old_distance": per_sample_mse(pred, v_old).mean().item()}

    def extra_state(self):
        return {f"old.{i}": v for i, v in enumerate(self.old.values)}

    def load_extra_state(self, tensors):
        for i, value in enumerate(self.old.values):
            value.copy_(tensors[f"old.{i}"])


__all__ = [
    "AWMConfig",
    "AWMTrainer",
    "DiffusionNFTConfig",
    "DiffusionNFTTrainer",
    "RAFTConfig",
    "RAFTTrainer",
    "RWRConfig",
    "RWRTrainer",
    "WeightedMatchingConfig",
    "WeightedMatchingTrainer",
]
