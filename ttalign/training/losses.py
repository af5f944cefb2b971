"""The training objectives, each written from its paper's formula (see the docstrings), on plain tensors.

One beta convention for Diffusion-DPO and KTO: `loss = -logsigmoid(-0.5 * beta * (model_diff - ref_diff))`, beta 5000
for Stable Diffusion 1.5. diffusers' `train_diffusion_dpo.py` writes `-logsigmoid(beta_dpo * (ref_diff - model_diff))`
with default `beta_dpo = 2500`: the same loss, with `beta = 2 * beta_dpo`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B]`: the mean squared error over every dimension but the batch, in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))


def diffusion_dpo_loss(model_mse_w, model_mse_l, ref_mse_w, ref_mse_l, beta: float = 5000.0):
    """Diffusion-DPO (Wallace et al. 2023, https://arxiv.org/abs/2311.12908), winner and loser noised with the same
    noise and timestep: `model_diff = mse_w - mse_l`, `ref_diff = ref_mse_w - ref_mse_l`,
    `loss = -logsigmoid(-0.5 * beta * (model_diff - ref_diff)).mean()`.

    Returns `(loss, implicit_accuracy)`: the share of pairs where the model prefers the winner more than the
    reference does."""
    model_diff = model_mse_w - model_mse_l  # [B]
    ref_diff = ref_mse_w - ref_mse_l  # [B]
    inside = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside).mean(), (inside > 0).float().mean()


def diffusion_kto_loss(
    model_mse, ref_mse, desirable, beta: float = 5000.0, lambda_desirable: float = 1.0, lambda_undesirable: float = 1.0
):
    """Diffusion-KTO (Li et al. 2024, https://arxiv.org/abs/2404.04465) on binary feedback:
    `g = ref_mse - model_mse`, `kl = clamp(mean(g), 0)` (detached), `h = sigmoid(sign * beta * (g - kl))` with
    `sign = +1` for desirable and `-1` for undesirable samples, `loss = mean(lambda_y * (1 - h))`."""
    g = ref_mse - model_mse  # [B]
    kl = g.mean().clamp(min=0).detach()
    sign = torch.where(desirable, 1.0, -1.0).to(g)
    weight = torch.where(desirable, lambda_desirable, lambda_undesirable).to(g)
    h = torch.sigmoid(sign * beta * (g - kl))
    return (weight * (1 - h)).mean()


def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range: float = 1e-4):
    """DDPO's PPO objective (Black et al. 2023, https://arxiv.org/abs/2305.13301): with
    `ratio = exp(log_prob - old_log_prob)`, `loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - e, 1 + e)))`.
    Returns `(loss, clip_fraction)`."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ((ratio - 1).abs() > clip_range).float().mean()


def reinforce_loss(log_prob, advantages):
    """DDPO-SF (REINFORCE): `-mean(A * log_prob)`."""
    return -(advantages * log_prob).mean()


def dpok_loss(
    log_prob,
    old_log_prob,
    rewards,
    values,
    eps_model,
    eps_ref,
    reward_weight: float = 10.0,
    kl_weight: float = 0.01,
    clip_range: float = 1e-4,
):
    """DPOK (Fan et al. 2023, https://arxiv.org/abs/2305.16381), as its code: a plain clamp of the ratio (not PPO's
    min) and a KL term on the guided noise predictions:
    `-w_R * (R - V) * clamp(ratio, 1 +- e) + w_KL * mean((eps_theta - eps_ref)^2)`."""
    ratio = torch.clamp(torch.exp(log_prob - old_log_prob), 1 - clip_range, 1 + clip_range)
    policy = -reward_weight * (rewards - values) * ratio  # [B]
    kl = per_sample_mse(eps_model, eps_ref)  # [B]
    return (policy + kl_weight * kl).mean()


def normalize_advantages(rewards: torch.Tensor, prompts: list[str], clip: float = 5.0) -> torch.Tensor:
    """DDPO's per-prompt advantage: `(r - mean_prompt) / (std_prompt + 1e-8)` (the batch statistics for a prompt
    seen once), clamped to `+-clip`."""
    advantages = torch.empty_like(rewards, dtype=torch.float32)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    for indices in groups.values():
        r = rewards[indices].float() if len(indices) > 1 else rewards.float()
        mean, std = r.mean(), r.std() if len(r) > 1 else torch.tensor(1.0)
        advantages[indices] = (rewards[indices].float() - mean) / (std + 1e-8)
    return advantages.clamp(-clip, clip)


def refl_loss(rewards: torch.Tensor, scale: float = 1e-3, target: float = 2.0) -> torch.Tensor:
    """ReFL (Xu et al. 2023, https://arxiv.org/abs/2304.05977): `mean(relu(target - reward)) * scale`."""
    return F.relu(target - rewards).mean() * scale


def group_advantages(rewards: torch.Tensor, prompts: list[str], clip: float = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantage as Flow-GRPO computes it (https://arxiv.org/abs/2505.05470): each reward minus
    the mean of its prompt's group, over the standard deviation of all the rewards of the batch (population std, as its
    numpy code) plus `eps`, clamped to `+-clip`. Unlike :func:`normalize_advantages` (DDPO's per-prompt statistics),
    the scale is shared, so a group whose images all score alike gets advantages near 0 rather than blown up."""
    r = rewards.float()
    advantages = torch.empty_like(r)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    std = r.std(unbiased=False)
    for indices in groups.values():
        advantages[indices] = (r[indices] - r[indices].mean()) / (std + eps)
    return advantages.clamp(-clip, clip)


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std) -> torch.Tensor:
    """`KL(N(mean, std^2) || N(mean_ref, std^2))` per sample, averaged over the other dimensions:
    `mean((mean - mean_ref)^2) / (2 std^2)` `[N, ...] -> [N]` (Flow-GRPO's KL term, with `std` the whole step's
    standard deviation)."""
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    diff = (mean.float() - mean_ref.float()) ** 2
    return diff.mean(dim=tuple(range(1, diff.ndim))) / (2 * std**2)


def rwr_weights(rewards: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """RWR's weights as DDPO's baseline computes them: `N * softmax(r / temperature)` (mean 1)."""
    return len(rewards) * torch.softmax(rewards.float() / temperature, dim=0)


def raft_weights(
    rewards: torch.Tensor, prompts: list[str], keep: int = 1, min_reward: float | None = None
) -> torch.Tensor:
    """1 for the `keep` best images of each prompt's group, 0 for the others (ties broken by position); with
    `min_reward`, an image whose reward is below it is never kept (rejection sampling: with a pass/fail reward and
    `min_reward=0.5`, a group where nothing passes contributes nothing)."""
    weights = torch.zeros(len(rewards))
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    for indices in groups.values():
        order = sorted(indices, key=lambda i: (-float(rewards[i]), i))
        kept = [i for i in order[:keep] if min_reward is None or float(rewards[i]) >= min_reward]
        weights[kept] = 1.0
    return weights


def weighted_matching_loss(errors: torch.Tensor, weights: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """`mean(w * e)`, or `sum(w * e) / sum(w)` with `normalize` (RAFT's mean over the kept images)."""
    weights = weights.to(errors)
    if normalize:
        return (weights * errors).sum() / weights.sum().clamp(min=1e-12)
    return (weights * errors).mean()


def awm_loss(errors: torch.Tensor, sigma: torch.Tensor, advantages: torch.Tensor, adv_clip_max: float = 5.0):
    """AWM's policy term `mean(A * g)`: `A = clamp(advantages, +-adv_clip_max) / adv_clip_max`,
    `g = sigma * ((e + 1e-10)^0.25 - 1e-10^0.25) / 0.25` (the "ghuber" of the per-image error `e`, in fp64)."""
    e = errors.double()
    g = sigma.double() * ((e + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25
    a = advantages.double().clamp(-adv_clip_max, adv_clip_max) / adv_clip_max
    return (a.to(g.device) * g).mean().float()


def _adaptive_x0_error(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        scale = (x0_hat.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
    return ((x0_hat - x0) ** 2 / scale).mean(dim=dims)  # [N]


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    advantages: torch.Tensor,
    beta: float = 1.0,
    adv_clip_max: float = 5.0,
) -> torch.Tensor:
    """DiffusionNFT's policy term (formulas in the module docstring): `v`, `v_old` `[N, ...]` velocity predictions of
    the trained and the old model at `x_t = (1 - sigma) x0 + sigma noise`, `sigma` `[N]`."""
    v_old = v_old.detach()
    s = sigma.view(-1, *[1] * (x0.ndim - 1)).to(v)
    positive = beta * v + (1 - beta) * v_old
    negative = (1 + beta) * v_old - beta * v
    loss_pos = _adaptive_x0_error(x_t - s * positive, x0)  # [N]
    loss_neg = _adaptive_x0_error(x_t - s * negative, x0)  # [N]
    a = advantages.clamp(-adv_clip_max, adv_clip_max).to(v)
    r = (a / adv_clip_max / 2 + 0.5).clamp(0, 1)
    return adv_clip_max * (r * loss_pos / beta + (1 - r) * loss_neg / beta).mean()


def d3po_loss(log_prob, ref_log_prob, preference, beta: float = 0.1, eps: float = 0.1) -> torch.Tensor:
    """D3PO's loss on pairs: `log_prob`, `ref_log_prob` `[2P]` (pairs consecutive: images `2i`, `2i + 1`),
    `preference` `[2P]` (`+1` preferred, `-1` not, `0` tie): `mean(-logsigmoid(beta * sum_k c_k log rho_k))` with
    `rho_k = clamp(exp(log_prob - ref_log_prob), 1 - eps, 1 + eps)`."""
    log_rho = (log_prob - ref_log_prob).clamp(math.log(1 - eps), math.log(1 + eps))  # [2P]
    inside = beta * (preference.to(log_rho) * log_rho).view(-1, 2).sum(-1)  # [P]
    return -F.logsigmoid(inside).mean()


def spo_loss(log_prob_w, log_prob_l, ref_log_prob_w, ref_log_prob_l, beta: float = 10.0, eps: float = 0.1):
    """SPO's loss on pairs `[P]`: `mean(-logsigmoid(beta * (log rho_w - log rho_l)))` with
    `rho = clamp(exp(log_prob - ref_log_prob), 1 - eps, 1 + eps)`."""
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    log_rho_w = (log_prob_w - ref_log_prob_w).clamp(lo, hi)
    log_rho_l = (log_prob_l - ref_log_prob_l).clamp(lo, hi)
    return -F.logsigmoid(beta * (log_rho_w - log_rho_l)).mean()
