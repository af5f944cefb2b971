"""Every training loss against its reference formula (REFERENCES.md) on fixed tensors."""

import math

import torch

from ttalign.training.losses import (
    diffusion_dpo_loss,
    diffusion_kto_loss,
    dpok_loss,
    normalize_advantages,
    per_sample_mse,
    ppo_clip_loss,
    refl_loss,
)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_dpo_loss_and_beta_convention():
    mw, ml, rw, rl = (torch.tensor(v) for v in ([0.10, 0.20], [0.12, 0.18], [0.11, 0.19], [0.11, 0.19]))
    loss, acc = diffusion_dpo_loss(mw, ml, rw, rl, beta=5000.0)
    expected = []
    for i in range(2):
        inside = -0.5 * 5000 * ((mw[i] - ml[i]) - (rw[i] - rl[i])).item()
        expected.append(-_log_sigmoid(inside))
    assert math.isclose(loss.item(), sum(expected) / 2, rel_tol=1e-5)
    assert acc.item() == 0.5
    # diffusers' script form, beta_dpo = 2500: -logsigmoid(beta_dpo * (ref_diff - model_diff))
    script = -torch.nn.functional.logsigmoid(2500 * ((rw - rl) - (mw - ml))).mean()
    assert torch.isclose(loss, script)


def test_kto_loss():
    model, ref = torch.tensor([0.10, 0.30, 0.20]), torch.tensor([0.12, 0.25, 0.20])
    desirable = torch.tensor([True, False, True])
    loss = diffusion_kto_loss(model, ref, desirable, beta=10.0, lambda_desirable=1.0, lambda_undesirable=2.0)
    g = [0.02, -0.05, 0.0]
    kl = max(sum(g) / 3, 0.0)
    terms = []
    for gi, d in zip(g, [True, False, True]):
        h = 1 / (1 + math.exp(-((1 if d else -1) * 10 * (gi - kl))))
        terms.append((1.0 if d else 2.0) * (1 - h))
    assert math.isclose(loss.item(), sum(terms) / 3, rel_tol=1e-5)


def test_ppo_and_dpok_and_refl():
    logp, old, adv = torch.tensor([0.0, 0.1, -0.1]), torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, -2.0, 3.0])
    loss, frac = ppo_clip_loss(logp, old, adv, clip_range=0.05)
    ratio = torch.exp(logp - old)
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.95, 1.05)).mean()
    assert torch.isclose(loss, expected) and math.isclose(frac.item(), 2 / 3, rel_tol=1e-6)
    eps, ref = torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    r, v = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5, 0.5])
    d = dpok_loss(logp, old, r, v, eps, ref, reward_weight=10.0, kl_weight=0.01, clip_range=1e-4)
    expected = (-10 * (r - v) * ratio.clamp(1 - 1e-4, 1 + 1e-4) + 0.01 * 1.0).mean()
    assert torch.isclose(d, expected)
    assert torch.isclose(refl_loss(torch.tensor([1.0, 3.0])), torch.tensor(0.5e-3))
    assert torch.allclose(per_sample_mse(eps, ref), torch.ones(3))


def test_advantages_are_normalized_per_prompt_and_clamped():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0, 0.0])
    adv = normalize_advantages(rewards, ["a", "a", "b", "b", "c"], clip=5.0)
    assert torch.allclose(adv[:2], torch.tensor([-1.0, 1.0]) / math.sqrt(2), atol=1e-5)
    assert torch.allclose(adv[2:4], torch.zeros(2))
    assert adv.abs().max() <= 5.0
