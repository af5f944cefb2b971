"""SPO (Liang et al. 2024, https://arxiv.org/abs/2406.04314): step-wise preference optimization, preferences between
the children of one denoising step.

While sampling, at every step from `start_step` on (but the last; the pipeline's own steps before it), each image's
step draws `children` candidates of `x_{t-1}` from the same `x_t` on the stochastic step of
:func:`~ttalign.sampling.stochastic_transition` (DDIM with `eta = noise_level`, Flow-GRPO's SDE on SD3 / FLUX). Each
child is scored where it stands: the denoiser predicts its `x0` at the next timestep and the reward scores the decoded
prediction (SPO's step-aware preference model scores the noisy latent directly; any reward stands in for it here).
With `p = softmax(scores / score_temperature)` over the children, the best and the worst child make a pair when
`p_best - p_worst > threshold`; sampling continues from a random child. The loss on each pair is

`-log sigmoid(beta * (log rho_w - log rho_l))`, `rho = clamp(exp(log p_theta - log p_ref), 1 +- eps)`,

with `p_ref` the transition's density under the reference model (the denoiser with its LoRA disabled), beta 10 and
eps 0.1 (SPO's). `score_temperature` has no counterpart in SPO, whose preference model returns PickScore-scale logits:
it puts a reward in `[0, 1]` on a comparable scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttalign.hooks import AlignmentMethod, GenerationState, Stage
from ttalign.rewards.base import check_scores, reward_name
from ttalign.sampling import gaussian_log_prob, predict_x0, scale_model_input, scheduler_kind, stochastic_transition

from .losses import spo_loss
from .rollout import RoundsConfig, RoundTrainer


@dataclass
class SPOConfig(RoundsConfig):
    """Settings of :class:`SPOTrainer`: those of :class:`~ttalign.training.rollout.RoundsConfig` (`train_batch_size`
    counts images per sampling call), and

    Args:
        num_inference_steps (`int`, defaults to 20), guidance_scale (`float`, defaults to 5.0), noise_level (`float`,
            defaults to 1.0): the sampling (SPO: 20 DDIM steps).
        children (`int`, defaults to 4): candidates drawn at a step.
        start_step (`int`, defaults to 4): steps before it are sampled without pairs.
        threshold (`float`, defaults to 0.3), score_temperature (`float`, defaults to 0.1): a pair is kept when
            `softmax(scores / score_temperature)` of its best and worst child differ by more than `threshold`.
        beta (`float`, defaults to 10.0), eps (`float`, defaults to 0.1): SPO's scale and ratio clip.
        sde_variant (`str`, defaults to `"sde"`): Flow-GRPO's SDE or its coefficients-preserving variant (flow).
    """

    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    noise_level: float = 1.0
    children: int = 4
    start_step: int = 4
    threshold: float = 0.3
    score_temperature: float = 0.1
    beta: float = 10.0
    eps: float = 0.1
    sde_variant: str = "sde"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.children, int) or self.children < 2:
            raise ValueError(f"children must be an integer >= 2, got {self.children!r}.")
        if not isinstance(self.start_step, int) or not 0 <= self.start_step < self.num_inference_steps - 1:
            raise ValueError(
                f"start_step must be in [0, num_inference_steps - 1) = [0, {self.num_inference_steps - 1}), "
                f"got {self.start_step!r}."
            )
        if self.noise_level <= 0 or self.score_temperature <= 0 or self.beta <= 0 or not 0 < self.eps < 1:
            raise ValueError(
                f"Bad SPO settings: noise_level={self.noise_level}, score_temperature={self.score_temperature}, "
                f"beta={self.beta}, eps={self.eps}."
            )
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold!r}.")
        if self.sde_variant not in ("sde", "cps"):
            raise ValueError(f"sde_variant must be 'sde' or 'cps', got {self.sde_variant!r}.")


class StepPreferences(AlignmentMethod):
    """SPO's sampling (step_end stage): draws the step's children, scores their predicted `x0` with `reward`, keeps
    the (best, worst) pairs over the threshold in `out.traces["step_pairs"]` and continues from a random child."""

    stages = (Stage.NOISE_PRED, Stage.STEP_END)

    def __init__(self, config: SPOConfig, reward: Callable, generator: torch.Generator):
        self.config, self.reward, self.generator = config, reward, generator

    def setup(self, state: GenerationState) -> None:
        state.traces["step_pairs"] = []
        self.last_conditioning = None

    def on_noise_pred(self, state: GenerationState) -> None:
        state.scratch[self] = state.latents

    @torch.no_grad()
    def on_step_end(self, state: GenerationState) -> None:
        c, i, family = self.config, state.step_index, state.family
        scheduler, x_t = family.scheduler, state.scratch[self]
        if i < c.start_step or i >= len(scheduler.timesteps) - 1:
            return
        n, k = x_t.shape[0], c.children
        mean, std = stochastic_transition(scheduler, i, state.noise_pred, x_t, c.noise_level, c.sde_variant)
        noise = torch.randn((k, *mean.shape), generator=self.generator).to(mean.device)
        children = (mean[None] + std * noise).to(x_t.dtype)  # [k, N, ...]
        flat = children.flatten(0, 1)  # [k N, ...]: child j of image b at j N + b
        rows = torch.arange(n).repeat(k)
        cond = state.conditioning.select(rows)
        t_next = scheduler.timesteps[i + 1]
        out = family.denoise(scale_model_input(scheduler, flat, i + 1), t_next, cond, state.guidance_scale)
        if scheduler_kind(scheduler) == "flow":
            x0 = (flat.float() - float(scheduler.sigmas[i + 1]) * out.float()).to(flat.dtype)
        else:
            x0 = predict_x0(scheduler, out, t_next, flat)
        images = (family.decode(x0, state.height, state.width).float() / 2 + 0.5).clamp(0, 1)
        prompts = [state.prompt[b // state.num_images_per_prompt] for b in range(n)] if state.prompt else [""] * n
        scores = check_scores(
            self.reward(images, [prompts[b] for b in rows.tolist()]), k * n, reward_name(self.reward)
        )
        scores = scores.float().view(k, n).cpu()  # [k, N]
        p = torch.softmax(scores / c.score_temperature, dim=0)
        best, worst = scores.argmax(0), scores.argmin(0)  # [N]
        gap = p.gather(0, best[None])[0] - p.gather(0, worst[None])[0]
        keep = (gap > c.threshold) & (best != worst)
        for b in keep.nonzero().flatten().tolist():
            state.traces["step_pairs"].append(
                {
                    "step": i,
                    "timestep": torch.as_tensor(state.timestep).reshape(()).cpu(),
                    "image": b,
                    "x_t": x_t[b],
                    "winner": children[best[b], b],
                    "loser": children[worst[b], b],
                }
            )
        self.last_conditioning = state.conditioning
        pick = torch.randint(0, k, (n,), generator=self.generator)
        state.latents = children[pick, torch.arange(n)]  # continue from a random child


@dataclass
class StepPairs:
    """The preference pairs of one sampling call: step indices and timesteps `[P]`, `x_t`, winner and loser children
    `[P, ...]`, the conditioning of each pair's image, the scheduler as the call set it, the mean reward of the final
    images."""

    steps: list[int]
    timesteps: torch.Tensor
    x_t: torch.Tensor
    winners: torch.Tensor
    losers: torch.Tensor
    conditioning: object
    scheduler: object
    reward: float
    images: int


class SPOTrainer(RoundTrainer):
    """Fine-tunes a pipeline's denoiser with LoRA by SPO (see the module docstring).

    Args:
        pipe: a pipeline of a supported family (DDIM on SD 1.x/2.x and SDXL; SD3, FLUX).
        config (:class:`SPOConfig`).
        reward: any reward, `reward(images [0, 1], prompts) -> [N]`, scoring each child's predicted `x0`.
        prompts (`list[str]`): training prompts, drawn uniformly.

    Example:

    ```py
    >>> from ttalign.training import SPOConfig, SPOTrainer
    >>> SPOTrainer(pipe, SPOConfig(train_batch_size=4, output_dir="spo"), my_reward, prompts).train()
    ```
    """

    name = "spo"

    def __init__(self, pipe, config: SPOConfig, reward: Callable, prompts: list[str]):
        from ttalign.pipelines import family_for

        scheduler = family_for(pipe).scheduler
        if scheduler_kind(scheduler) not in ("flow", "ddim"):
            raise ValueError(
                f"SPO samples with a flow-matching or DDIM scheduler; the pipeline has {type(scheduler).__name__}."
            )
        super().__init__(pipe, config, reward, prompts)

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> StepPairs:
        """Samples `train_batch_size` images with the current weights, collecting the step pairs."""
        import copy

        c = self.config
        picks = torch.randint(0, len(self.prompts), (c.train_batch_size,), generator=generator).tolist()
        prompts = [self.prompts[i] for i in picks]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        method = StepPreferences(c, self.reward, torch.Generator().manual_seed(seed + 1))
        self.denoiser.eval()
        out = self.sampler_pipe(
            prompts,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            height=self.size,
            width=self.size,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed),
            alignment=[method],
            **c.encode_options,
        )
        self.denoiser.train()
        final = check_scores(self.reward(out.images.float(), prompts), len(prompts), reward_name(self.reward))
        pairs = out.traces["step_pairs"]
        conditioning = method.last_conditioning.select([p["image"] for p in pairs]) if pairs else None
        return StepPairs(
            [p["step"] for p in pairs],
            torch.stack([p["timestep"] for p in pairs]) if pairs else torch.zeros(0),
            torch.stack([p["x_t"] for p in pairs]) if pairs else torch.zeros(0),
            torch.stack([p["winner"] for p in pairs]) if pairs else torch.zeros(0),
            torch.stack([p["loser"] for p in pairs]) if pairs else torch.zeros(0),
            conditioning,
            copy.deepcopy(self.sampler_pipe.scheduler),
            float(final.float().mean()),
            len(prompts),
        )

    def batch_loss(self, batch: StepPairs, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """SPO's loss over the call's pairs, grouped by step (one denoiser call per step and model)."""
        c, device = self.config, self.accelerator.device
        metrics = {"reward": batch.reward, "pairs": len(batch.steps)}
        if not batch.steps:  # no pair over the threshold: a zero loss that keeps the graph
            return sum(p.sum() * 0 for p in self.params), metrics
        scheduler = batch.scheduler
        model = self.model.replace(scheduler=scheduler)
        losses, log_ratios = [], []
        for j in sorted(set(batch.steps)):
            rows = [r for r, s in enumerate(batch.steps) if s == j]
            x_t = batch.x_t[rows].to(device)
            t = batch.timesteps[rows[0]].to(device)
            cond = batch.conditioning.select(rows)

            def log_probs(x_t=x_t, t=t, j=j, cond=cond, rows=rows):
                out = model.denoise(scale_model_input(scheduler, x_t, j), t, cond, c.guidance_scale)
                mean, std = stochastic_transition(scheduler, j, out, x_t, c.noise_level, c.sde_variant)
                winners, losers = batch.winners[rows].to(device), batch.losers[rows].to(device)
                return gaussian_log_prob(winners.float(), mean, std), gaussian_log_prob(losers.float(), mean, std)

            w, l_ = log_probs()
            with torch.no_grad(), self.reference_mode():
                ref_w, ref_l = log_probs()
            losses.append(spo_loss(w, l_, ref_w, ref_l, c.beta, c.eps) * len(rows))
            log_ratios.append(torch.cat([w - ref_w, l_ - ref_l]).detach())
        metrics["log_ratio_abs"] = torch.cat(log_ratios).abs().mean().item()
        return torch.stack(losses).sum() / len(batch.steps), metrics
