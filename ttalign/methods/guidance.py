"""Reward-guided sampling: gradient guidance and particle steering.

- `RewardGuidance`: the gradient of a differentiable reward of the decoded x0 prediction, added to the noise
  prediction at every step: the forward guidance of universal guidance (Bansal et al. 2023,
  https://arxiv.org/abs/2302.07121), with the gradient taken at the x0 prediction and the noise prediction held
  fixed. FreeDoM (Yu et al. 2023, https://arxiv.org/abs/2303.09833) differentiates through the denoiser to `x_t`
  instead, which this method does not do.
- `ParticleSteering`: Feynman-Kac steering (Singhal et al. 2025, https://arxiv.org/abs/2501.06848), a sequential
  Monte Carlo sampler over `particles` stochastic trajectories per image, resampled by potentials of the reward of
  their x0 predictions; the best final particle is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttalign.hooks import AlignmentMethod, GenerationState, Stage, frozen
from ttalign.rewards.base import check_scores, last_details, require_differentiable, reward_name
from ttalign.sampler import DifferentiableSampler
from ttalign.sampling import is_flow, is_sigma_space, scheduler_kind, scheduler_step


def _noise_level(scheduler, timestep, index: int) -> float:
    """The step's noise level `sigma_t`: `sqrt((1 - a_t) / a_t)` for variance-preserving schedules (`x_t = x0 +
    sigma_t eps` up to scale), the scheduler's sigma in sigma space and in flow matching (`x0 = x_t - sigma v`)."""
    if is_sigma_space(scheduler) or is_flow(scheduler):
        return float(scheduler.sigmas[index])
    alpha_prod = float(scheduler.alphas_cumprod[int(timestep)])
    return ((1 - alpha_prod) / alpha_prod) ** 0.5


@dataclass(eq=False)
class RewardGuidance(AlignmentMethod):
    """Gradient guidance by a differentiable reward on the x0 (Tweedie) prediction.

    At each guided step, with `x0 = x0(x_t, eps)` the denoiser's estimate and `g = d reward(decode(x0)) / d x0`
    (the noise prediction held fixed, so no backward pass through the UNet), the noise prediction becomes
    `eps - scale * sigma_t * g`, which moves the x0 estimate by `scale * sigma_t^2 * g` (variance-preserving
    schedules: `sigma_t = sqrt((1 - a_t) / a_t)`; sigma space: the scheduler's sigma). On flow-matching models
    (SD3, FLUX) the velocity becomes `v - scale * sigma * g` with the same effect, `x0 = x_t - sigma v`.

    Args:
        reward: a differentiable reward.
        scale (`float`, defaults to 1.0): guidance strength.
        start, stop (`float`): the fraction of the steps guided, `[start, stop)` (all by default).
        every (`int`, defaults to 1): guide every `every`-th step in that window.
        grad_clip (`float`, *optional*): maximum norm of `sigma_t * g` per image.

    `out.traces["reward_guidance"]` holds the x0 reward per guided step (`rewards`, `[steps, N]`), the guided step
    indices, and the count of images whose gradient was not finite (skipped).

    Example:

    ```py
    >>> from ttalign.methods import RewardGuidance
    >>> out = pipe("a red circle left of a blue square", alignment=[RewardGuidance(reward=reward, scale=2.0)])
    ```
    """

    reward: Callable[[torch.Tensor, list[str]], torch.Tensor]
    scale: float = 1.0
    start: float = 0.0
    stop: float = 1.0
    every: int = 1
    grad_clip: float | None = None

    stages = (Stage.NOISE_PRED,)

    def __post_init__(self):
        if not callable(self.reward):
            raise ValueError(f"RewardGuidance needs a callable reward, got {self.reward!r}.")
        require_differentiable(self.reward, "RewardGuidance", "; otherwise use BestOfN or ParticleSteering")
        if not 0 <= self.start < self.stop <= 1:
            raise ValueError(f"RewardGuidance needs 0 <= start < stop <= 1, got start={self.start}, stop={self.stop}.")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"RewardGuidance needs every >= 1, got every={self.every!r}.")

    def guided_steps(self, num_steps: int) -> list[int]:
        """The step indices this method guides at, of `num_steps`."""
        first = int(self.start * num_steps)
        return [
            i
            for i in range(num_steps)
            if self.start * num_steps <= i < self.stop * num_steps and (i - first) % self.every == 0
        ]

    def extra_evaluations_per_render(self, num_inference_steps: int) -> float:
        return float(len(self.guided_steps(num_inference_steps)))  # a decode and a reward gradient per guided step

    def setup(self, state: GenerationState) -> None:
        if state.prompt is None:
            raise ValueError("RewardGuidance scores images against their prompts: pass `prompt`.")
        state.traces["reward_guidance"] = {"rewards": [], "steps": [], "skipped": 0}

    def on_noise_pred(self, state: GenerationState) -> None:
        if state.step_index not in self.guided_steps(len(state.timesteps)):
            return
        i = state.step_index
        scheduler = state.family.scheduler
        sampler = DifferentiableSampler.from_state(state)
        with torch.enable_grad(), frozen(state.family.vae):
            x0 = state.family.predict_x0(state.noise_pred, state.timestep, state.latents).detach().requires_grad_()
            rewards = check_scores(
                self.reward(sampler.decode(x0), state.image_prompts), len(x0), reward_name(self.reward)
            )
            (grad,) = torch.autograd.grad(rewards.sum(), x0)
        state.reward_calls += 1
        sampler.account(state)
        step = _noise_level(scheduler, state.timestep, i) * grad  # [N, C, h, w] (FLUX: packed, [N, L, C])
        rows = (-1,) + (1,) * (step.ndim - 1)
        finite = torch.isfinite(step).flatten(1).all(1)  # [N]
        step = torch.where(finite.view(rows), step, torch.zeros_like(step))
        if self.grad_clip is not None:
            norm = step.flatten(1).norm(dim=1).clamp_min(1e-12)
            step = step * (self.grad_clip / norm).clamp(max=1.0).view(rows)
        state.noise_pred = state.noise_pred - self.scale * step.to(state.noise_pred.dtype)
        trace = state.traces["reward_guidance"]
        trace["rewards"].append(rewards.detach().float().cpu())
        trace["steps"].append(i)
        trace["skipped"] += int((~finite).sum())


POTENTIALS = ("max", "add", "diff")


def systematic_resample(log_weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Systematic resampling of each row: normalized `log_weights [N, P]` and one uniform per row `[N, 1]` ->
    parent indices `[N, P]` (particle `k` is copied about `P * w_k` times, never less than `floor(P * w_k)`)."""
    p = log_weights.shape[1]
    positions = (uniforms + torch.arange(p)) / p  # [N, P], evenly spaced on [0, 1)
    cdf = torch.exp(log_weights).cumsum(dim=1)
    cdf[:, -1] = 1.0
    return torch.searchsorted(cdf, positions, right=True).clamp(max=p - 1)


@dataclass(eq=False)
class ParticleSteering(AlignmentMethod):
    """Feynman-Kac steering / SMC: `particles` stochastic trajectories per image, resampled by reward potentials.

    At each resampling step the reward `r` of every particle's decoded x0 prediction gives a log-weight
    `lmbda * s`, with `s = max(r, s_prev)` (`"max"`), `r + s_prev` (`"add"`) or `r - s_prev` (`"diff"`) and `s_prev`
    the particle's previous statistic (starting at `reward_min`, as in the reference code). When the effective sample
    size `1 / sum(w^2)` of the normalized weights falls below `ess_threshold * particles` (always, with
    `ess_threshold=None`), the particles of each image are resampled systematically. Weights stay in log space.
    The image returned is the particle with the highest final reward.

    The method owns the injected noise: every step is recomputed with DDIM noise scale `eta` (Euler ancestral and
    LCM inject their own; on flow-matching models, SD3 and FLUX, `eta` is the noise level `a` of Flow-GRPO's SDE,
    which keeps the deterministic sampler's marginals) from one random stream per particle slot, derived from the
    call's generator, so a seeded call is reproducible and copies of a resampled particle diverge.

    Args:
        reward: any reward, differentiable or not.
        particles (`int`, defaults to 4).
        potential (`str`, defaults to `"max"`): `"max"`, `"add"` or `"diff"`.
        lmbda (`float`, defaults to 10.0): inverse temperature of the potentials.
        resample_every (`int`, *optional*): steps between resamplings (default: 20% of the steps, as FK steering's
            every 20 of 100 steps).
        resample_start, resample_stop (`float`): the window of resampling, as fractions of the steps (0.2, 0.8).
        ess_threshold (`float`, *optional*, defaults to 0.5): resample when ESS < threshold x particles.
        eta (`float`, defaults to 1.0): DDIM noise scale (FK steering samples with DDIM eta 1); flow matching: the
            SDE's noise level `a` (Flow-GRPO samples with 0.7, 0.9 on FLUX).
        reward_min (`float`, defaults to 0.0): the starting statistic of every particle.

    `out.traces["particle_steering"]` holds, per resampling step, its index, the particles' rewards `[N, P]`, the
    effective sample size `[N]`, whether it resampled and the ancestry (`parents`, `[N, P]`); and the final rewards,
    with the returned images' explanations (`reward_details`) where the reward keeps them (`last_details`).

    Example:

    ```py
    >>> from ttalign.methods import ParticleSteering
    >>> out = pipe("two red circles", eta=1.0, alignment=[ParticleSteering(reward=reward, particles=4)])
    ```
    """

    reward: Callable[[torch.Tensor, list[str]], torch.Tensor]
    particles: int = 4
    potential: str = "max"
    lmbda: float = 10.0
    resample_every: int | None = None
    resample_start: float = 0.2
    resample_stop: float = 0.8
    ess_threshold: float | None = 0.5
    eta: float = 1.0
    reward_min: float = 0.0

    stages = (Stage.NOISE_PRED, Stage.STEP_END, Stage.OUTPUT)
    changes_batch = True
    costly_options = ("particles",)
    owns_step_noise = True
    required_features = frozenset({"stochastic_steps"})

    def __post_init__(self):
        if not callable(self.reward):
            raise ValueError(f"ParticleSteering needs a callable reward, got {self.reward!r}.")
        if not isinstance(self.particles, int) or self.particles < 1:
            raise ValueError(f"ParticleSteering needs particles >= 1, got particles={self.particles!r}.")
        if self.potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {POTENTIALS}, got {self.potential!r}.")
        if self.resample_every is not None and self.resample_every < 1:
            raise ValueError(f"resample_every must be >= 1, got {self.resample_every!r}.")
        if not 0 <= self.resample_start <= self.resample_stop <= 1:
            raise ValueError(
                f"Need 0 <= resample_start <= resample_stop <= 1, got {self.resample_start}, {self.resample_stop}."
            )
        if self.ess_threshold is not None and not 0 < self.ess_threshold <= 1:
            raise ValueError(f"ess_threshold must be in (0, 1] or None, got {self.ess_threshold!r}.")

    def renders_per_image(self, num_inference_steps: int) -> float:
        return float(self.particles)

    def extra_evaluations_per_render(self, num_inference_steps: int) -> float:
        return float(len(self.resample_steps(num_inference_steps)))  # an x0 decode and a reward call per resampling

    def setup(self, state: GenerationState) -> None:
        if state.user_latents is not None:
            raise ValueError("ParticleSteering draws its own initial noise for each particle: do not pass `latents`.")
        if state.prompt is None:
            raise ValueError("ParticleSteering scores images against their prompts: pass `prompt`.")
        scheduler = state.family.scheduler
        kind = scheduler_kind(scheduler)
        flow_ode = kind == "flow" and self.eta <= 0 and not scheduler.config.get("stochastic_sampling", False)
        if kind == "euler" or (kind == "ddim" and self.eta <= 0) or flow_ode:
            raise ValueError(
                f"ParticleSteering needs a stochastic sampler (resampled copies must diverge): DDIM with eta > 0, "
                f"Euler ancestral, LCM or flow matching with eta > 0 (an SDE); got {type(scheduler).__name__} with "
                f"eta={self.eta}."
            )
        state.expand_generators(self.particles)  # per-image generators: each image's particles derive from its own
        state.num_images_per_prompt *= self.particles
        state.scratch[self] = {"generators": None, "stats": None}
        state.traces["particle_steering"] = {"steps": [], "rewards": [], "ess": [], "resampled": [], "parents": []}

    def resample_steps(self, num_steps: int) -> list[int]:
        every = self.resample_every or max(1, round(0.2 * num_steps))
        start, stop = round(self.resample_start * num_steps), round(self.resample_stop * num_steps)
        return [i for i in range(start, min(stop, num_steps - 1) + 1, every) if i < num_steps - 1]

    def _noise(self, state: GenerationState, store: dict, like: torch.Tensor) -> torch.Tensor:
        if store["generators"] is None:
            if isinstance(state.generator, list):  # one stream per particle, from the particle's own generator
                store["generators"] = [
                    state.derived_generator(salt=1000 + k % self.particles, row=k) for k in range(like.shape[0])
                ]
            else:
                store["generators"] = [state.derived_generator(salt=1000 + k) for k in range(like.shape[0])]
        return torch.stack([torch.randn(like.shape[1:], generator=g) for g in store["generators"]]).to(like)

    def _uniforms(self, state: GenerationState, store: dict, n: int) -> torch.Tensor:
        """One uniform per image `[n, 1]` for systematic resampling (per-image generators: each image its own)."""
        if "resampler" not in store:
            if isinstance(state.generator, list):
                store["resampler"] = [state.derived_generator(salt=999, row=j * self.particles) for j in range(n)]
            else:
                store["resampler"] = state.derived_generator(salt=999)
        if isinstance(store["resampler"], list):
            return torch.cat([torch.rand(1, 1, generator=g) for g in store["resampler"]])
        return torch.rand(n, 1, generator=store["resampler"])

    def on_noise_pred(self, state: GenerationState) -> None:
        state.scratch[self]["x_t"] = state.latents

    @torch.no_grad()
    def on_step_end(self, state: GenerationState) -> None:
        store, i = state.scratch[self], state.step_index
        scheduler, x_t = state.family.scheduler, store["x_t"]
        noise = self._noise(state, store, x_t)  # drawn every step, so each stream stays aligned with the steps
        prev, x0 = scheduler_step(scheduler, i, state.noise_pred, x_t, self.eta, noise)
        state.latents = prev
        if i not in self.resample_steps(len(state.timesteps)):
            return

        sampler = DifferentiableSampler.from_state(state)
        rewards = check_scores(self.reward(sampler.decode(x0), state.image_prompts), len(x0), reward_name(self.reward))
        state.reward_calls += 1
        sampler.account(state)
        n, p = len(x0) // self.particles, self.particles
        r = rewards.float().cpu().view(n, p)
        r = torch.where(torch.isfinite(r), r, torch.full_like(r, float("-inf")))  # a NaN particle gets weight 0
        prev_stats = store["stats"] if store["stats"] is not None else torch.full_like(r, self.reward_min)
        if self.potential == "max":
            stats = torch.maximum(r, prev_stats)
            log_w = self.lmbda * stats
        elif self.potential == "add":
            stats = r + prev_stats
            log_w = self.lmbda * stats
        else:
            stats = r
            log_w = self.lmbda * (r - prev_stats)
        log_w = torch.nan_to_num(log_w, nan=float("-inf"))
        if torch.isinf(log_w).all(dim=1).any():
            raise ValueError(f"Reward {reward_name(self.reward)} returned no finite score for some image's particles.")
        log_w = log_w - torch.logsumexp(log_w, dim=1, keepdim=True)  # normalized, [N, P]
        ess = 1.0 / torch.exp(2 * log_w).sum(dim=1)  # [N]
        do = torch.ones(n, dtype=torch.bool) if self.ess_threshold is None else ess < self.ess_threshold * p
        parents = torch.arange(p).expand(n, p).clone()
        if do.any():
            # systematic resampling: one uniform per image, P evenly spaced positions on the weights' CDF
            u = self._uniforms(state, store, n)
            drawn = systematic_resample(log_w, u)
            parents = torch.where(do[:, None], drawn, parents)
        flat = (parents + torch.arange(n)[:, None] * p).flatten().to(state.latents.device)  # [N * P]
        state.latents = state.latents[flat]
        store["stats"] = stats.gather(1, parents)
        trace = state.traces["particle_steering"]
        trace["steps"].append(i)
        trace["rewards"].append(r)
        trace["ess"].append(ess)
        trace["resampled"].append(do)
        trace["parents"].append(parents)

    def on_output(self, state: GenerationState) -> None:
        images, prompts = state.images, state.image_prompts
        scores = check_scores(self.reward(images, prompts), len(prompts), reward_name(self.reward)).float()
        state.reward_calls += 1
        details = last_details(self.reward, len(prompts))
        scores = scores.view(-1, self.particles)  # [N, P]
        state.keep_best(scores, reward_name(self.reward))
        state.traces["particle_steering"]["final_rewards"] = scores.cpu()
        if details is not None:
            state.traces["particle_steering"]["reward_details"] = [details[k] for k in state.selected.tolist()]
