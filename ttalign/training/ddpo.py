"""DDPO (Black et al. 2023, https://arxiv.org/abs/2305.13301), with DPOK's optional KL term (Fan et al. 2023,
https://arxiv.org/abs/2305.16381): online RL on the denoising chain.

Each step samples trajectories with the aligned pipeline itself (DDIM with `eta > 0`), recorded by a `step_end`
method with the log-probability of every transition (:func:`~ttalign.sampling.ddim_step_with_logprob`), scores the
images with the reward, normalizes advantages per prompt, and takes one gradient step on the recorded transitions, on
REINFORCE's objective or PPO's clipped one. With one update per sampled batch the ratio is 1 when the gradient is
taken, so the clip never binds and both give the REINFORCE gradient. The reference model of the KL term is the same
denoiser with LoRA disabled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttalign.hooks import AlignmentMethod, GenerationState, Stage
from ttalign.rewards.base import check_scores, reward_name
from ttalign.sampling import ddim_step_with_logprob, scale_model_input, scheduler_kind

from .losses import normalize_advantages, per_sample_mse, ppo_clip_loss, reinforce_loss
from .trainer import LoRATrainer, TrainingConfig


@dataclass
class DDPOConfig(TrainingConfig):
    """Settings of :class:`DDPOTrainer`: those of :class:`TrainingConfig`, and

    Args:
        algorithm (`str`, defaults to `"ppo"`): `"ppo"` (clipped importance sampling) or `"reinforce"` (DDPO-SF).
        num_inference_steps (`int`, defaults to 25), guidance_scale (`float`, defaults to 5.0), eta (`float`,
            defaults to 1.0): the sampling (DDIM; ddpo-pytorch uses 50 steps, guidance 5, eta 1).
        clip_range (`float`, defaults to 1e-4): PPO's ratio clip.
        adv_clip_max (`float`, defaults to 5.0): advantages are clamped to `+-adv_clip_max`.
        timestep_fraction (`float`, defaults to 1.0): the share of each trajectory's transitions trained on (their
            graphs are held together, so this also bounds memory).
        kl_weight (`float`, defaults to 0.0): DPOK's `w_KL * mean((eps_theta - eps_ref)^2)` term (0.01 in DPOK).
    """

    algorithm: str = "ppo"
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    eta: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    timestep_fraction: float = 1.0
    kl_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm not in ("ppo", "reinforce"):
            raise ValueError(f"algorithm must be 'ppo' or 'reinforce', got {self.algorithm!r}.")
        if self.eta <= 0:
            raise ValueError(f"DDPO needs a stochastic sampler (eta > 0) for its log-probabilities, got {self.eta}.")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction!r}.")


class TrajectoryRecorder(AlignmentMethod):
    """Records `(x_t, x_{t-1}, log p(x_{t-1} | x_t))` of every DDIM step of a pipeline call (step_end stage)."""

    stages = (Stage.NOISE_PRED, Stage.STEP_END)

    def __init__(self, eta: float):
        self.eta = eta

    def setup(self, state: GenerationState) -> None:
        state.traces["trajectory"] = {"latents": [], "next_latents": [], "log_probs": []}

    def on_noise_pred(self, state: GenerationState) -> None:
        state.scratch[self] = state.latents

    def on_step_end(self, state: GenerationState) -> None:
        x_t = state.scratch[self]
        _, log_prob = ddim_step_with_logprob(
            state.family.scheduler, state.step_index, state.noise_pred, x_t, self.eta, prev_sample=state.latents
        )
        trace = state.traces["trajectory"]
        trace["latents"].append(x_t)
        trace["next_latents"].append(state.latents)
        trace["log_probs"].append(log_prob)


@dataclass
class Trajectories:
    """A batch of sampled trajectories: latents `[T, N, C, h, w]`, next latents, old log-probs `[T, N]`, rewards and
    advantages `[N]`, prompts."""

    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    prompts: list[str]


class DDPOTrainer(LoRATrainer):
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
        if not prompts:
            raise ValueError("DDPOTrainer needs at least one prompt.")
        super().__init__(pipe, config)
        self.reward, self.prompts = reward, list(prompts)
        self.sampler_pipe = self.model.aligned_pipeline()
        self.sampler_pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> Trajectories:
        """Samples `train_batch_size` trajectories with the current policy and scores them."""
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
        trace = out.traces["trajectory"]
        rewards = check_scores(self.reward(out.images.float(), prompts), len(prompts), reward_name(self.reward))
        rewards = rewards.float().cpu()
        return Trajectories(
            torch.stack(trace["latents"]),
            torch.stack(trace["next_latents"]),
            torch.stack(trace["log_probs"]),
            rewards,
            normalize_advantages(rewards, prompts, c.adv_clip_max),
            prompts,
        )

    def policy_loss(self, traj: Trajectories, steps: list[int]) -> tuple[torch.Tensor, dict]:
        """The DDPO (+ DPOK KL) loss of the recorded transitions at `steps`, under the current weights."""
        c, device = self.config, self.accelerator.device
        scheduler = self.sampler_pipe.scheduler
        model = self.model.replace(scheduler=scheduler)
        with torch.no_grad():  # the conditioning the sampling call used
            cond = model.encode_prompt(
                traj.prompts,
                device,
                do_cfg=c.guidance_scale > 1,
                height=self.size,
                width=self.size,
                guidance_scale=c.guidance_scale,
                **c.encode_options,
            )
        advantages = traj.advantages.to(device)
        losses, clip_fracs, kls = [], [], []
        for j in steps:
            x_t, prev = traj.latents[j].to(device), traj.next_latents[j].to(device)
            t = scheduler.timesteps[j]

            def guided(x_t=x_t, t=t, j=j):
                return model.denoise(scale_model_input(scheduler, x_t, j), t, cond, c.guidance_scale)

            eps = guided()
            _, log_prob = ddim_step_with_logprob(scheduler, j, eps, x_t, c.eta, prev_sample=prev)
            old = traj.log_probs[j].to(device)
            if c.algorithm == "ppo":
                loss, clip_frac = ppo_clip_loss(log_prob, old, advantages, c.clip_range)
                clip_fracs.append(clip_frac.item())
            else:
                loss = reinforce_loss(log_prob, advantages)
            if c.kl_weight > 0:
                with torch.no_grad(), self.reference_mode():
                    eps_ref = guided()
                kl = per_sample_mse(eps, eps_ref).mean()
                kls.append(kl.item())
                loss = loss + c.kl_weight * kl
            losses.append(loss)
        metrics = {"reward": traj.rewards.mean().item()}
        if clip_fracs:
            metrics["clip_fraction"] = sum(clip_fracs) / len(clip_fracs)
        if kls:
            metrics["kl"] = sum(kls) / len(kls)
        return torch.stack(losses).mean(), metrics

    def training_step(self, generator):
        traj = self.sample(generator)
        n_steps = traj.latents.shape[0]
        count = max(1, round(self.config.timestep_fraction * n_steps))
        steps = sorted(torch.randperm(n_steps, generator=generator)[:count].tolist())
        return self.policy_loss(traj, steps)
