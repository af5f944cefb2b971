"""Initial-noise methods: seed search and reward-based noise optimization.

- `SeedSearch`: random search over initial noises with any reward, then an optional zero-order search around the
  best noise (Ma et al. 2025, "Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps",
  https://arxiv.org/abs/2501.09732).
- `NoiseOptimization`: gradient ascent of a differentiable reward with respect to the initial noise (ReNO, Eyring et
  al. 2024, https://arxiv.org/abs/2406.04312) or to every injected noise of a stochastic sampler (DNO, Tang et al.
  2024, https://arxiv.org/abs/2405.18881), through :class:`~ttalign.sampler.DifferentiableSampler`.

Both act at the `init_latents` stage: they search with the sampler, then hand the chosen noise to the pipeline, whose
own loop regenerates the chosen image (one more pass, counted in `traces["compute"]`). When the schedule injects
noise (DDIM with `eta > 0`, Euler ancestral, LCM), the injected noises are fixed for the search and replayed in the
pipeline's loop at the `step_end` stage, so the returned image is the one that was scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttalign.hooks import AlignmentMethod, GenerationState, Stage, block_checkpointing, frozen
from ttalign.rewards.base import check_scores, require_differentiable, reward_name
from ttalign.sampler import DifferentiableSampler, check_gradient_checkpointing
from ttalign.sampling import init_noise_sigma, scheduler_step


def _score(reward, images: torch.Tensor, prompts: list[str], state: GenerationState) -> torch.Tensor:
    scores = check_scores(reward(images, prompts), len(prompts), reward_name(reward))
    state.reward_calls += 1
    return scores.float()


def _require_prompts(state: GenerationState, method: str) -> None:
    if state.prompt is None:
        raise ValueError(f"{method} scores images against their prompts: pass `prompt`, not only `prompt_embeds`.")
    state.check_generators()


class _NoiseReplay:
    """Replays fixed injected noises in the pipeline's own loop (stochastic schedules only)."""

    @staticmethod
    def capture(state: GenerationState, store: dict) -> None:
        store["x_t"] = state.latents

    @staticmethod
    def replay(state: GenerationState, store: dict, eta: float) -> None:
        noise = store.get("noises", [None] * (state.step_index + 1))[state.step_index]
        if noise is not None:
            prev, _ = scheduler_step(
                state.family.scheduler, state.step_index, state.noise_pred, store["x_t"], eta, noise.to(store["x_t"])
            )
            state.latents = prev


class _CandidateSteps:
    """The call's other methods' `step_start` handlers around a sampler's steps (Attend-and-Excite's latent updates;
    the step at which region and token re-weighting modulate attention), so that a search renders its candidates as
    the pipeline's loop renders the chosen one. A handler's change of the latents passes as a constant shift:
    gradients (noise optimization) flow through the sampler's steps, not through the handler."""

    def __init__(self, state: GenerationState, owner: AlignmentMethod):
        self.state = state
        runner = state.runner
        self.methods = [] if runner is None else [m for m in runner.by_stage[Stage.STEP_START] if m is not owner]

    def _at(self, index: int, latents: torch.Tensor | None):
        state = self.state
        saved = state.step_index, state.timestep, state.latents, state.searching
        state.step_index, state.timestep, state.searching = index, state.timesteps[index], True
        if latents is not None:
            state.latents = latents
        return saved

    def _restore(self, saved) -> None:
        state = self.state
        state.step_index, state.timestep, state.latents, state.searching = saved

    def sync(self, index: int) -> None:
        from ttalign.attention import sync_step

        saved = self._at(index, None)
        try:
            sync_step(self.state)
        finally:
            self._restore(saved)

    def checkpointed(self, denoiser: torch.nn.Module):
        """The denoiser's blocks checkpointed so that a block replayed in the backward sees the attention control as
        its forward did (the control's own checkpointing; diffusers' switches when the call has no control)."""
        control = self.state.scratch.get("attention_control")
        return block_checkpointing(denoiser) if control is None else control.checkpointed(denoiser)

    def __call__(self, index: int, latents: torch.Tensor) -> torch.Tensor:
        saved = self._at(index, latents.detach())
        try:
            for method in self.methods:
                method.on_step_start(self.state)
            moved = self.state.latents
        finally:
            self._restore(saved)
        return latents + (moved.to(latents) - latents).detach()  # [N, ...]: the handlers' shift, as a constant

    @classmethod
    def attach(cls, sampler: DifferentiableSampler, state: GenerationState, owner: AlignmentMethod) -> None:
        steps = cls(state, owner)
        if steps.methods or "attention_control" in state.scratch:
            sampler.step_hooks = steps


@dataclass(eq=False)
class SeedSearch(AlignmentMethod):
    """Best-of-`n` over initial noises, then `rounds` of zero-order search around the best one.

    Each image starts from the pipeline's own draw plus `n - 1` fresh noises; all are denoised and scored, and the best
    becomes the pivot. Each round then scores `neighbors` noises `(pivot + radius * e) / sqrt(1 + radius^2)` (still
    standard normal) and moves the pivot to any that scores higher. The pipeline then generates from the chosen noise.

    Args:
        reward (`Callable[[Tensor, list[str]], Tensor]`): any reward, differentiable or not.
        n (`int`, defaults to 4): initial noises per image.
        rounds (`int`, defaults to 0): zero-order search rounds.
        neighbors (`int`, defaults to 4): noises scored per round.
        radius (`float`, defaults to 0.5): size of the neighbourhood.

    `out.traces["seed_search"]` holds every score (`scores`, `[N, n + rounds * neighbors]`) and `out.rewards` the
    chosen noise's reward.

    Example:

    ```py
    >>> from ttalign.methods import SeedSearch
    >>> out = pipe("a red circle", alignment=[SeedSearch(reward=reward, n=8, rounds=2)])
    ```
    """

    reward: Callable[[torch.Tensor, list[str]], torch.Tensor]
    n: int = 4
    rounds: int = 0
    neighbors: int = 4
    radius: float = 0.5

    stages = (Stage.INIT_LATENTS, Stage.NOISE_PRED, Stage.STEP_END)
    costly_options = ("n", "rounds", "neighbors")

    def __post_init__(self):
        if not callable(self.reward):
            raise ValueError(f"SeedSearch needs a callable reward, got {self.reward!r}.")
        for key in ("n", "neighbors"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"SeedSearch needs {key} >= 1, got {key}={getattr(self, key)!r}.")
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"SeedSearch needs rounds >= 0, got rounds={self.rounds!r}.")
        if not self.radius > 0:
            raise ValueError(f"SeedSearch needs radius > 0, got radius={self.radius!r}.")

    def renders_per_image(self, num_inference_steps: int) -> float:
        return float(self.n + self.rounds * self.neighbors + 1)  # the candidates, then the chosen noise's render

    def setup(self, state: GenerationState) -> None:
        _require_prompts(state, "SeedSearch")

    @torch.no_grad()
    def _evaluate(self, sampler, z, noises, state) -> torch.Tensor:
        images = sampler.decode(sampler.sample(z * init_noise_sigma(sampler.scheduler), noises))
        return _score(self.reward, images, state.image_prompts, state)

    @torch.no_grad()
    def on_init_latents(self, state: GenerationState) -> None:
        sampler = DifferentiableSampler.from_state(state)
        _CandidateSteps.attach(sampler, state, self)  # candidates rendered with the call's attention methods
        sigma = init_noise_sigma(state.family.scheduler)
        generator = state.method_generators(salt=1)  # per-image generators: each image's candidates from its own
        shape = state.latents.shape

        def draw_noises():
            return sampler.draw_noises(shape, generator, state.device, state.latents.dtype)

        def draw():
            return state.randn(shape, generator).to(state.latents)

        pivot, noises = state.latents / sigma, draw_noises()
        all_scores = []
        with state.pipe.progress_bar(total=self.n + self.rounds * self.neighbors) as bar:
            best = self._evaluate(sampler, pivot, noises, state)
            all_scores.append(best)
            bar.update()
            candidates = [(draw(), draw_noises()) for _ in range(self.n - 1)]
            for r in range(self.rounds + 1):
                for z, z_noises in candidates:
                    scores = self._evaluate(sampler, z, z_noises, state)
                    all_scores.append(scores)
                    better = scores > best  # [N]; NaN never wins
                    if better.any():
                        mask = better.view(-1, *([1] * (z.ndim - 1))).to(z.device)
                        pivot = torch.where(mask, z, pivot)
                        noises = [None if a is None else torch.where(mask, b, a) for a, b in zip(noises, z_noises)]
                        best = torch.where(better, scores, best)
                    bar.update()
                if r < self.rounds:
                    scale = 1 / math.sqrt(1 + self.radius**2)
                    candidates = [((pivot + self.radius * draw()) * scale, noises) for _ in range(self.neighbors)]
        if not torch.isfinite(best).all():
            raise ValueError(f"Reward {reward_name(self.reward)} returned no finite score for some image.")
        state.latents = pivot * sigma
        state.scratch[self] = {"noises": noises}
        state.rewards = best
        state.traces["seed_search"] = {"scores": torch.stack(all_scores, dim=1).cpu(), "best": best.cpu()}
        sampler.account(state)

    def on_noise_pred(self, state: GenerationState) -> None:
        _NoiseReplay.capture(state, state.scratch[self])

    def on_step_end(self, state: GenerationState) -> None:
        _NoiseReplay.replay(state, state.scratch[self], state.eta)


def noise_norm_nll(z: torch.Tensor) -> torch.Tensor:
    """ReNO's regularizer: the negative log-likelihood of the norm of a standard normal `z` (a chi distribution with
    `d` degrees of freedom), `0.5 ||z||^2 - (d - 1) log ||z||` up to a constant, per item `[N]`, in fp32."""
    flat = z.float().flatten(1)  # [N, d]
    norm = flat.norm(dim=1)
    return 0.5 * norm**2 - (flat.shape[1] - 1) * torch.log(norm)


PRESETS = {
    # ReNO (one-step models): SGD with Nesterov momentum, per-image gradient norm clipped to 0.1, norm regularizer.
    "initial": {"steps": 50, "lr": 5.0, "optimizer": "sgd", "grad_clip": 0.1, "regularizer": 0.01, "eta": None},
    # DNO (multi-step): AdamW through the whole chain with every injected noise (DDIM eta=1), grad clip 1.0.
    "all-noises": {"steps": 100, "lr": 0.01, "optimizer": "adamw", "grad_clip": 1.0, "regularizer": 0.0, "eta": 1.0},
}


@dataclass(eq=False)
class NoiseOptimization(AlignmentMethod):
    """Gradient ascent of a differentiable reward over the initial noise (ReNO) or over every noise (DNO).

    Options left as `None` take the preset of the mode (`PRESETS`): ReNO's for `optimize="initial"` (50 steps, SGD
    lr 5 with Nesterov momentum 0.9, gradient norm clipped to 0.1 per image, regularizer 0.01) and DNO's for
    `optimize="all-noises"` (100 steps, AdamW lr 0.01, clip 1.0, no regularizer, DDIM `eta=1`).

    The batch is optimized at once, with per-image optimizer state, gradient clipping, early stopping and best
    iterate; the sampler is gradient-checkpointed per step. An image whose gradient is not finite skips that iteration
    (counted in the traces).

    Args:
        reward: a differentiable reward (`reward.differentiable` is True).
        steps (`int`): optimization iterations.
        lr (`float`), optimizer (`"sgd"` or `"adamw"`), momentum (`float`, SGD only).
        grad_clip (`float`, *optional*): maximum gradient norm per image (over all optimized noises).
        regularizer (`float`): weight of :func:`noise_norm_nll` (keeps the noise on the Gaussian shell).
        optimize (`"initial"` or `"all-noises"`).
        eta (`float`, *optional*): DDIM noise scale of the sampler (the call's `eta` when `None` in "initial" mode);
            on flow-matching models (SD3, FLUX) the noise level of Flow-GRPO's SDE.
        patience (`int`, *optional*): stop an image after this many iterations without improvement.
        target (`float`, *optional*): stop an image once its reward reaches this value.
        gradient_checkpointing (`bool` or `"blocks"`, defaults to `True`): each step and the VAE decode of the
            differentiable render keep only their inputs and are recomputed in the backward. `"blocks"` also
            checkpoints the denoiser's blocks inside each step, at one more denoiser forward per step: the backward
            then holds one block's activations instead of one step's through the whole denoiser, which sets the
            peak on SDXL and SD3. The render's gradient is of the noise alone: the denoiser's and VAE's weights are
            frozen for it and get no `.grad`.
        keep_images (`bool`, defaults to `False`): also keep every iteration's images (an over-optimization monitor
            judges them with another reward or a verifier).
        reuse_render (`bool`, defaults to `True`): return the kept iterate's own render instead of sampling its noise
            again in the pipeline's loop (one full sampling saved per image). Only when no other method of the call
            acts at the denoising steps (they need the loop); the loop is then skipped, and so are the call's
            `callback_on_step_end` calls: pass `False` to keep them.

    `out.traces["noise_optimization"]` holds the reward of every image at every iteration (`rewards`, `[steps, N]`,
    NaN after an image stopped), the best reward, the iterations each image ran and its skipped iterations; with
    `keep_images`, `images` `[steps, N, 3, H, W]` in `[0, 1]` on the CPU (an image that stopped keeps its last one).

    Example:

    ```py
    >>> from ttalign.methods import NoiseOptimization
    >>> out = pipe("a cat", num_inference_steps=1, guidance_scale=0.0,
    ...            alignment=[NoiseOptimization(reward=reward)])  # ReNO on a one-step model
    ```
    """

    reward: Callable[[torch.Tensor, list[str]], torch.Tensor]
    steps: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    momentum: float = 0.9
    grad_clip: float | None = None
    regularizer: float | None = None
    optimize: str = "initial"
    eta: float | None = None
    patience: int | None = None
    target: float | None = None
    gradient_checkpointing: bool | str = True
    keep_images: bool = False
    reuse_render: bool = True

    stages = (Stage.INIT_LATENTS, Stage.NOISE_PRED, Stage.STEP_END)
    costly_options = ("steps",)

    def __post_init__(self):
        if self.optimize not in PRESETS:
            raise ValueError(f"optimize must be one of {sorted(PRESETS)}, got {self.optimize!r}.")
        for key, value in PRESETS[self.optimize].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if not callable(self.reward):
            raise ValueError(f"NoiseOptimization needs a callable reward, got {self.reward!r}.")
        require_differentiable(self.reward, "NoiseOptimization", "; otherwise use SeedSearch or BestOfN")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"NoiseOptimization needs steps >= 1, got steps={self.steps!r}.")
        if not self.lr > 0:
            raise ValueError(f"NoiseOptimization needs lr > 0, got lr={self.lr!r}.")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}.")
        if self.regularizer < 0:
            raise ValueError(f"regularizer must be >= 0, got {self.regularizer!r}.")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience!r}.")
        check_gradient_checkpointing(self.gradient_checkpointing)

    @property
    def owns_step_noise(self) -> bool:
        return self.optimize == "all-noises"  # DNO optimizes every injected noise

    @property
    def required_features(self) -> frozenset[str]:
        return frozenset({"stochastic_steps"}) if self.optimize == "all-noises" else frozenset()

    def renders_per_image(self, num_inference_steps: int) -> float:
        # each iteration: a forward render, its backward (two), with checkpointing the replayed forward and with
        # "blocks" the blocks' replay too; then the kept iterate's render (an upper bound: reusing its render, or early
        # stopping, only spends less)
        per_iteration = {False: 3, True: 4, "blocks": 5}[self.gradient_checkpointing]
        return float(per_iteration * self.steps + 1)

    def setup(self, state: GenerationState) -> None:
        _require_prompts(state, "NoiseOptimization")

    def on_init_latents(self, state: GenerationState) -> None:
        eta = state.eta if self.eta is None else self.eta
        sampler = DifferentiableSampler.from_state(state, eta=eta, gradient_checkpointing=self.gradient_checkpointing)
        _CandidateSteps.attach(sampler, state, self)  # candidates rendered with the call's attention methods
        sigma = init_noise_sigma(state.family.scheduler)
        generator = state.method_generators(salt=2)
        n = state.latents.shape[0]
        z = (state.latents / sigma).float().clone().requires_grad_()
        noises = sampler.draw_noises(state.latents.shape, generator, state.device, torch.float32)
        if self.optimize == "all-noises":
            if not sampler.stochastic:
                raise ValueError(
                    "optimize='all-noises' needs a stochastic schedule (DDIM or flow matching with "
                    "eta > 0, Euler ancestral or LCM); this one injects no noise."
                )
            noises = [None if e is None else e.clone().requires_grad_() for e in noises]
        params = [z] + [e for e in noises if e is not None and e.requires_grad]
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr)

        prompts = state.image_prompts
        best = torch.full((n,), float("-inf"))
        best_params = [p.detach().clone() for p in params]
        since_best = torch.zeros(n, dtype=torch.long)
        active = torch.ones(n, dtype=torch.bool)
        skipped = torch.zeros(n, dtype=torch.long)
        ran = torch.zeros(n, dtype=torch.long)
        history, kept, best_final = [], [], None
        with state.pipe.progress_bar(total=self.steps) as bar:
            for _ in range(self.steps):
                # the gradient of the noise alone: the models' weights neither keep inputs for theirs nor get `.grad`
                with torch.enable_grad(), frozen(state.family.denoiser, state.family.vae):
                    latents = (z * sigma).to(state.latents.dtype)
                    final = sampler.sample(latents, noises)
                    images = sampler.decode(final)
                    rewards = _score(self.reward, images, prompts, state)  # [N]
                    loss = -rewards
                    if self.regularizer > 0:
                        loss = loss + self.regularizer * sum(noise_norm_nll(p) for p in params)
                    for p, grad in zip(params, torch.autograd.grad(loss.sum(), params, materialize_grads=True)):
                        p.grad = grad
                values = rewards.detach().cpu()
                history.append(torch.where(active, values, torch.full_like(values, float("nan"))))
                if self.keep_images:
                    shown = images.detach().float().cpu()  # [N, 3, H, W]
                    if kept:  # a stopped image keeps its last one
                        shown = torch.where(active.view(-1, 1, 1, 1), shown, kept[-1])
                    kept.append(shown)
                ran += active
                improved = active & (values > best)
                for p, keep in zip(params, best_params):
                    keep[improved.to(p.device)] = p.detach()[improved.to(p.device)]
                if best_final is None:
                    best_final = final.detach().clone()
                else:
                    best_final[improved.to(final.device)] = final.detach()[improved.to(final.device)]
                best = torch.where(improved, values, best)
                since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
                if self.target is not None:
                    active &= ~(best >= self.target)
                if self.patience is not None:
                    active &= since_best < self.patience
                # per-image gradient checks and clipping, [N]
                finite = torch.stack([torch.isfinite(p.grad).flatten(1).all(1) for p in params]).all(0).cpu()
                skipped += active & ~finite
                step_mask = (active & finite).to(z.device)
                for p in params:
                    p.grad[~step_mask] = 0
                if self.grad_clip is not None:
                    norm = torch.stack([p.grad.flatten(1).norm(dim=1) ** 2 for p in params]).sum(0).sqrt()  # [N]
                    factor = (self.grad_clip / (norm + 1e-12)).clamp(max=1.0)
                    for p in params:
                        p.grad.mul_(factor.view(-1, *([1] * (p.ndim - 1))))
                before = [p.detach().clone() for p in params]
                opt.step()
                with torch.no_grad():  # images that are stopped or skipped do not move (momentum included)
                    for p, old in zip(params, before):
                        p[~step_mask] = old[~step_mask]
                bar.update()
                if not active.any():
                    break
        if not torch.isfinite(best).all():
            raise ValueError(f"Reward {reward_name(self.reward)} returned no finite score for some image.")

        if self.reuse_render and self._loop_free(state):
            # the kept iterate's render is the image: the pipeline's loop is skipped (diffusers' interrupt flag, which
            # each call resets) and the VAE decodes these latents
            state.latents = best_final.to(state.latents.dtype)
            state.pipe._interrupt = True
            state.scratch[self] = {"noises": [], "eta": eta, "reused": True}
            self._finish(state, best, history, ran, skipped, kept, sampler)
            return
        state.latents = (best_params[0] * sigma).to(state.latents.dtype)
        replay, k = [], 1
        for e in noises:
            if e is None:
                replay.append(None)
            elif e.requires_grad:
                replay.append(best_params[k])
                k += 1
            else:
                replay.append(e)
        state.scratch[self] = {"noises": replay, "eta": eta, "reused": False}
        self._finish(state, best, history, ran, skipped, kept, sampler)

    def _loop_free(self, state: GenerationState) -> bool:
        """Whether no other method of the call acts at the denoising steps (so the loop can be skipped)."""
        step_stages = {Stage.STEP_START, Stage.NOISE_PRED, Stage.STEP_END}
        others = [m for m in (state.runner.methods if state.runner is not None else []) if m is not self]
        return not any(step_stages & set(m.stages) for m in others)

    def _finish(self, state, best, history, ran, skipped, kept, sampler) -> None:
        state.rewards = best
        state.traces["noise_optimization"] = {
            "rewards": torch.stack(history),
            "best": best,
            "iterations": ran,
            "skipped": skipped,
            "reused_render": state.scratch[self]["reused"],
        }
        if self.keep_images:
            state.traces["noise_optimization"]["images"] = torch.stack(kept)
        sampler.account(state)

    def on_noise_pred(self, state: GenerationState) -> None:
        _NoiseReplay.capture(state, state.scratch[self])

    def on_step_end(self, state: GenerationState) -> None:
        _NoiseReplay.replay(state, state.scratch[self], state.scratch[self]["eta"])
