"""D3PO on tiny components: its loss against a hand computation, pairs that share their prompt and initial noise,
the reference's log-probabilities (LoRA disabled), preferences from a reward or from labels, training steps on SD and
SD3."""

import math

import numpy as np
import pytest
import torch

from ttalign.testing import Redness, get_tiny_pipeline, get_tiny_sd3_pipeline
from ttalign.training import D3POConfig, D3POTrainer, d3po_loss

PROMPTS = ["a red circle", "a blue square"]


def test_d3po_loss_against_a_hand_computation():
    log_prob = torch.tensor([0.05, -0.02, 0.5, 0.0])
    ref = torch.tensor([0.0, 0.0, 0.0, 0.0])
    preference = torch.tensor([1.0, -1.0, -1.0, 1.0])
    # pair 1: log rho = (0.05, -0.02) inside the clip (log 0.9, log 1.1) -> beta (0.05 + 0.02) = 0.007
    # pair 2: log rho = (0.5 -> log 1.1, 0) -> beta (-log 1.1)
    expected = (-math.log(1 / (1 + math.exp(-0.007))) - math.log(1 / (1 + math.exp(0.1 * math.log(1.1))))) / 2
    assert d3po_loss(log_prob, ref, preference, beta=0.1, eps=0.1).item() == pytest.approx(expected, rel=1e-6)
    tie = d3po_loss(log_prob, ref, torch.zeros(4), beta=0.1, eps=0.1)
    assert tie.item() == pytest.approx(math.log(2))


def _trainer(pipe, tmp_path, **kwargs):
    settings = dict(
        num_inference_steps=3,
        guidance_scale=3.0,
        noise_level=1.0,
        train_batch_size=4,
        max_steps=2,
        resolution=32,
        learning_rate=1e-2,
        output_dir=str(tmp_path / "d3po"),
    )
    return D3POTrainer(pipe, D3POConfig(**{**settings, **kwargs}), Redness(), PROMPTS)


@pytest.mark.parametrize("make", [get_tiny_pipeline, get_tiny_sd3_pipeline], ids=["sd", "sd3"])
def test_pairs_share_their_start_and_the_first_loss_is_log_2(make, tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(make(), tmp_path)
    rollout = trainer.sample(torch.Generator().manual_seed(0))
    assert rollout.prompts[0] == rollout.prompts[1] and rollout.prompts[2] == rollout.prompts[3]
    assert rollout.steps[0] == 0  # the first transition starts from x_T, shared within a pair
    assert torch.equal(rollout.latents[0][0], rollout.latents[0][1])
    assert torch.equal(rollout.latents[0][2], rollout.latents[0][3])
    assert not torch.equal(rollout.latents[0][0], rollout.latents[0][2])
    assert not torch.equal(rollout.next_latents[0][0], rollout.next_latents[0][1])  # their own step noise
    signs = torch.sign(rollout.rewards[0::2] - rollout.rewards[1::2])
    assert torch.equal(rollout.advantages[0::2], signs) and torch.equal(rollout.advantages[1::2], -signs)
    # the LoRA starts at zero: the model is the reference, every log rho is 0 and the loss is log 2
    loss, metrics = trainer.policy_loss(rollout, list(range(len(rollout.steps))))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["log_ratio_abs"] == 0.0
    metrics = trainer.train()
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items())
    loss, metrics = trainer.policy_loss(rollout, list(range(len(rollout.steps))))
    assert metrics["log_ratio_abs"] > 0


def test_preferences_from_labels(tmp_path):
    def labels(images, prompts):
        return torch.tensor([1.0, -1.0] * (len(prompts) // 2))

    torch.manual_seed(0)
    trainer = D3POTrainer(
        get_tiny_pipeline(),
        D3POConfig(num_inference_steps=2, train_batch_size=4, resolution=32, output_dir=str(tmp_path / "o")),
        labels,
        PROMPTS,
        preference_from="labels",
    )
    rollout = trainer.sample(torch.Generator().manual_seed(0))
    assert rollout.advantages.tolist() == [1.0, -1.0, 1.0, -1.0]
    trainer.reward = lambda images, prompts: torch.full((len(prompts),), 0.5)
    with pytest.raises(ValueError, match="must be \\+1, -1 or 0"):
        trainer.sample(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="group_size must be 2"):
        D3POConfig(group_size=4, train_batch_size=8)
    with pytest.raises(ValueError, match="preference_from"):
        D3POTrainer(get_tiny_pipeline(), D3POConfig(output_dir=str(tmp_path / "p")), labels, PROMPTS, "votes")
