"""DDPO (Black et al. 2023, https://arxiv.org/abs/2305.13301), with DPOK's optional KL term (Fan et al. 2023,
https://arxiv.org/abs/2305.16381): online RL on the denoising chain.

A round (:mod:`~ttalign.training.rollout`) samples trajectories with the aligned pipeline itself (DDIM with
`eta > 0`), recorded by a `step_end` method with the log-probability of every transition
(:func:`~ttalign.sampling.ddim_step_with_logprob`), the conditioning and the schedule of the call; scores the images
with the reward and normalizes advantages per prompt. Then `num_inner_epochs` passes over the round's batches take one
micro-batch each, on PPO's clipped objective (`algorithm="ppo"`) or REINFORCE's (`"reinforce"`, DDPO-SF, on-policy:
one pass over a single batch per round). The reference model of the KL term is the same denoiser with LoRA disabled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttalign.hooks import AlignmentMethod, GenerationState, Stage
from ttalign.rewards.base import check_scores, reward_name
from ttalign.sampling import ddim_step_with_logprob, scale_model_input, scheduler_kind

from .losses import normalize_advantages, per_sample_mse, ppo_clip_loss, reinforce_loss
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
class DDPOConfig(RolloutConfig):
    """Settings of :class:`DDPOTrainer`: those of :class:`~ttalign.training.rollout.RolloutConfig` (rounds, inner
    epochs, `clip_range` 1e-4, `adv_clip_max` 5, `timestep_fraction`), and

    Args:
        algorithm (`str`, defaults to `"ppo"`): `"ppo"` (clipped importance sampling) or `"reinforce"` (DDPO-SF).
        num_inference_steps (`int`, defaults to 25), guidance_scale (`float`, defaults to 5.0), eta (`float`,
            defaults to 1.0): the sampling (DDIM; ddpo-pytorch uses 50 steps, guidance 5, eta 1).
        kl_weight (`float`, defaults to 0.0): DPOK's `w_KL * mean((eps_theta - eps_ref)^2)` term (0.01 in DPOK).
    """

    algorithm: str = "ppo"
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    eta: float = 1.0
    kl_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm not in ("ppo", "reinforce"):
            raise ValueError(f"algorithm must be 'ppo' or 'reinforce', got {self.algorithm!r}.")
        if self.algorithm == "reinforce" and self.steps_per_round > 1:
            raise ValueError(
                "REINFORCE is on-policy: it takes one step per sampled batch (rollout_batches = num_inner_epochs = 1, "
                f"got {self.rollout_batches} and {self.num_inner_epochs}); use algorithm='ppo' to reuse samples."
            )
        if self.eta <= 0:
            raise ValueError(f"DDPO needs a stochastic sampler (eta > 0) for its log-probabilities, got {self.eta}.")


class TrajectoryRecorder(AlignmentMethod):
    """Records `(x_t, x_{t-1}, log p(x_{t-1} | x_t))` of every DDIM step of a pipeline call, with its timestep and the
    call's conditioning (step_end stage), in `out.traces["trajectory"]`."""

    stages = (Stage.NOISE_PRED, Stage.STEP_END)

    def __init__(self, eta: float):
        self.eta = eta

    def setup(self, state: GenerationState) -> None:
        start_trajectory(state)

    def on_noise_pred(self, state: GenerationState) -> None:
        state.scratch[self] = state.latents

    def on_step_end(self, state: GenerationState) -> None:
        x_t = state.scratch[self]
        _, log_prob = ddim_step_with_logprob(
            state.family.scheduler, state.step_index, state.noise_pred, x_t, self.eta, prev_sample=state.latents
        )
        record_transition(state, x_t, log_prob)


class DDPOTrainer(RolloutTrainer):
    """Fine-tunes a pipeline's denoiser with LoRA by DDPO (REINFORCE or PPO's clipped objective), optionally with
    DPOK's KL term.

    Args:
        pipe: a pipeline of a supported family (SD 1.x/2.x, SDXL) with a `DDIMScheduler`.
        config (:class:`DDPOConfig`).
        reward: any reward (differentiable or not), `reward(images [0, 1], prompts) -> [N]`.
        prompts (`list[str]`): training prompts, drawn uniformly.

    Example:

    ```py
    >>> from ttalign.shapes import ShapesSoftVerifier, evaluation_prompts, load_pipeline
    >>> from ttalign.training import DDPOConfig, DDPOTrainer
    >>> pipe = load_pipeline()
    >>> trainer = DDPOTrainer(pipe, DDPOConfig(max_steps=20, output_dir="ddpo"), ShapesSoftVerifier(),
    ...                       [p for p, _ in evaluation_prompts(10)])
    >>> trainer.train()
    ```
    """

    name = "ddpo"

    def __init__(self, pipe, config: DDPOConfig, reward: Callable, prompts: list[str]):
        from ttalign.pipelines import family_for

        scheduler = family_for(pipe).scheduler
        if scheduler_kind(scheduler) == "flow":
            raise ValueError(
                "DDPO samples with DDIM; for flow-matching pipelines (SD3, FLUX) use FlowGRPOTrainer, its counterpart."
            )
        if scheduler_kind(scheduler) != "ddim":
            raise ValueError(f"DDPO samples with DDIM; the pipeline has {type(scheduler).__name__}.")
        super().__init__(pipe, config, reward, prompts)

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> Rollout:
        """Samples `train_batch_size` trajectories with the current weights and scores them."""
        c = self.config
        picks = torch.randint(0, len(self.prompts), (c.train_batch_size,), generator=generator).tolist()
        prompts = [self.prompts[i] for i in picks]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self.denoiser.eval()
        out = self.sampler_pipe(
            prompts,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            eta=c.eta,
            height=self.size,
            width=self.size,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed),
            alignment=[TrajectoryRecorder(c.eta)],
            **c.encode_options,
        )
        self.denoiser.train()
        rewards = check_scores(self.reward(out.images.float(), prompts), len(prompts), reward_name(self.reward))
        rewards = rewards.float().cpu()
        advantages = normalize_advantages(rewards, prompts, c.adv_clip_max)
        return rollout_from_trace(out, rewards, advantages, prompts, self.sampler_pipe.scheduler)

    def policy_loss(self, rollout: Rollout, rows: list[int]) -> tuple[torch.Tensor, dict]:
        """The DDPO (+ DPOK KL) loss of the recorded transitions `rows` (positions in `rollout.steps`), under the
        current weights, with the conditioning and the schedule the sampling call used."""
        c, device = self.config, self.accelerator.device
        scheduler = rollout.scheduler
        model = self.model.replace(scheduler=scheduler)
        advantages = rollout.advantages.to(device)
        losses, new, old, kls = [], [], [], []
        for row in rows:
            j = rollout.steps[row]
            x_t, prev = rollout.latents[row].to(device), rollout.next_latents[row].to(device)
            t = rollout.timesteps[row].to(device)

            def guided(x_t=x_t, t=t, j=j):
                return model.denoise(scale_model_input(scheduler, x_t, j), t, rollout.conditioning, c.guidance_scale)

            eps = guided()
            _, log_prob = ddim_step_with_logprob(scheduler, j, eps, x_t, c.eta, prev_sample=prev)
            old_log_prob = rollout.log_probs[row].to(device)
            new.append(log_prob)
            old.append(old_log_prob)
            if c.algorithm == "ppo":
                loss, _ = ppo_clip_loss(log_prob, old_log_prob, advantages, c.clip_range)
            else:
                loss = reinforce_loss(log_prob, advantages)
            if c.kl_weight > 0:
                with torch.no_grad(), self.reference_mode():
                    eps_ref = guided()
                kl = per_sample_mse(eps, eps_ref).mean()
                kls.append(kl.item())
                loss = loss + c.kl_weight * kl
            losses.append(loss)
        metrics = {"reward": rollout.rewards.mean().item(), **ratio_metrics(new, old, c.clip_range)}
        if kls:
            metrics["kl"] = sum(kls) / len(kls)
        return torch.stack(losses).mean(), metrics
