"""D3PO (Yang et al. 2024, https://arxiv.org/abs/2311.13231): direct preference optimization on the denoising chain,
from preferences between two sampled trajectories, without a reward model.

Each pair of images shares its prompt and its initial noise `x_T` (a per-image generator with the pair's seed) and is
sampled on the stochastic step of :func:`~ttalign.sampling.stochastic_transition` (DDIM with `eta = noise_level` on the
UNet families, Flow-GRPO's SDE on SD3 / FLUX), recorded with every transition. A preference `c` labels the pair: `+1`
for the preferred image, `-1` for the other, `0` for both on a tie. It comes from `preference(images, prompts)` (a
person's choice, the code path of a labelling tool) or from a reward's comparison of the two. The loss at each
recorded step is

`-log sigmoid(beta * (c_0 * log rho_0 + c_1 * log rho_1))`, `rho_k = clamp(exp(log p_theta - log p_ref), 1 +- eps)`,

with `p_ref` the transition's density under the reference model (the denoiser with its LoRA disabled), beta 0.1 and
eps 0.1 (D3PO's code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttalign.rewards.base import check_scores, reward_name
from ttalign.sampling import gaussian_log_prob, stochastic_transition

from .grpo import GRPOConfig, GRPOTrainer, StochasticTrajectory
from .losses import d3po_loss
from .rollout import Rollout, rollout_from_trace


@dataclass
class D3POConfig(GRPOConfig):
    """Settings of :class:`D3POTrainer`: those of :class:`~ttalign.training.GRPOConfig` with pairs (`group_size` 2,
    `train_batch_size` images: twice the pairs), no KL term, and

    Args:
        beta (`float`, defaults to 0.1), eps (`float`, defaults to 0.1): D3PO's scale and ratio clip.
    """

    group_size: int = 2
    kl_weight: float = 0.0
    beta: float = 0.1
    eps: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.group_size != 2:
            raise ValueError(f"D3PO compares pairs: group_size must be 2, got {self.group_size!r}.")
        if self.beta <= 0 or not 0 < self.eps < 1:
            raise ValueError(f"beta must be > 0 and eps in (0, 1), got {self.beta!r}, {self.eps!r}.")


class D3POTrainer(GRPOTrainer):
    """Fine-tunes a pipeline's denoiser with LoRA by D3PO on pairs of its own trajectories (see the module docstring).

    Args:
        pipe: a pipeline of a supported family (DDIM on SD 1.x/2.x and SDXL; SD3, FLUX).
        config (:class:`D3POConfig`).
        preference: `preference(images [2P, 3, H, W] in [0, 1], prompts) -> [2P]` with `+1` / `-1` / `0` per image
            (pairs consecutive), or a reward (`reward(images, prompts) -> [2P]`): the higher image of each pair is
            preferred, equal scores tie. Which one it is: `preference_from="labels"` or `"reward"`.
        prompts (`list[str]`): training prompts, drawn uniformly.
        preference_from (`str`, defaults to `"reward"`).

    Example:

    ```py
    >>> from ttalign.training import D3POConfig, D3POTrainer
    >>> D3POTrainer(pipe, D3POConfig(train_batch_size=8, output_dir="d3po"), my_reward, prompts).train()
    ```
    """

    name = "d3po"

    def __init__(self, pipe, config: D3POConfig, preference: Callable, prompts: list[str], preference_from="reward"):
        if preference_from not in ("reward", "labels"):
            raise ValueError(f"preference_from must be 'reward' or 'labels', got {preference_from!r}.")
        super().__init__(pipe, config, preference, prompts)
        self.preference_from = preference_from

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> Rollout:
        """Samples `train_batch_size / 2` pairs, each pair from one prompt and one initial noise, and labels them."""
        c = self.config
        pairs = c.train_batch_size // 2
        picks = torch.randint(0, len(self.prompts), (pairs,), generator=generator).tolist()
        prompts = [self.prompts[i] for i in picks for _ in range(2)]
        seeds = torch.randint(0, 2**31 - 1, (pairs + 1,), generator=generator).tolist()
        recorder = StochasticTrajectory(
            c.noise_level, c.sde_variant, self.stochastic_steps(generator), torch.Generator().manual_seed(seeds[-1])
        )
        self.denoiser.eval()
        out = self.sampler_pipe(
            prompts,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            height=self.size,
            width=self.size,
            output_type="pt",
            generator=[torch.Generator().manual_seed(seeds[i // 2]) for i in range(2 * pairs)],  # x_T per pair
            alignment=[recorder],
            **c.encode_options,
        )
        self.denoiser.train()
        scores = check_scores(self.reward(out.images.float(), prompts), len(prompts), reward_name(self.reward))
        scores = scores.float().cpu()
        if self.preference_from == "labels":
            preference = scores
            if not torch.isin(preference, torch.tensor([-1.0, 0.0, 1.0])).all():
                raise ValueError(f"Preference labels must be +1, -1 or 0, got {preference.tolist()}.")
        else:
            first = torch.sign(scores[0::2] - scores[1::2])  # [P]
            preference = torch.stack([first, -first], dim=1).flatten()  # [2P]
        return rollout_from_trace(out, scores, preference, prompts, self.sampler_pipe.scheduler)

    def policy_loss(self, rollout: Rollout, rows: list[int]) -> tuple[torch.Tensor, dict]:
        """D3PO's loss on the recorded transitions `rows`, averaged over them and the pairs."""
        c, device = self.config, self.accelerator.device
        scheduler = rollout.scheduler
        model = self.model.replace(scheduler=scheduler)
        preference = rollout.advantages.to(device)
        losses, log_ratios = [], []
        for row in rows:
            j = rollout.steps[row]
            x_t, prev = rollout.latents[row].to(device), rollout.next_latents[row].to(device)
            t = rollout.timesteps[row].to(device)

            def log_prob(x_t=x_t, t=t, j=j, prev=prev):
                out = model.denoise(x_t, t, rollout.conditioning, c.guidance_scale)
                mean, std = stochastic_transition(scheduler, j, out, x_t, c.noise_level, c.sde_variant)
                return gaussian_log_prob(prev.float(), mean, std)  # [N]

            current = log_prob()
            with torch.no_grad(), self.reference_mode():
                reference = log_prob()
            losses.append(d3po_loss(current, reference, preference, c.beta, c.eps))
            log_ratios.append((current - reference).detach())
        log_ratio = torch.cat(log_ratios)
        metrics = {
            "reward": rollout.rewards.mean().item(),
            "ties": (preference == 0).float().mean().item(),
            "log_ratio_abs": log_ratio.abs().mean().item(),
            "clip_fraction": (log_ratio.exp() - 1).abs().gt(c.eps).float().mean().item(),
        }
        return torch.stack(losses).mean(), metrics
