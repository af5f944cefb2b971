"""The weighted-matching trainers (RWR, RAFT, AWM, DiffusionNFT): each loss against a hand computation of its paper's
formula, training steps on every family they support (LoRA that diffusers loads), the refusal on the others, the
old / EMA copies of the LoRA, and checkpoint / resume."""

import json
import math

import numpy as np
import pytest
import torch

from ttalign.testing import Redness, get_tiny_flux_pipeline, get_tiny_pipeline, get_tiny_sd3_pipeline
from ttalign.training import (
    AWMConfig,
    AWMTrainer,
    DiffusionNFTConfig,
    DiffusionNFTTrainer,
    RAFTConfig,
    RAFTTrainer,
    RWRConfig,
    RWRTrainer,
    awm_loss,
    nft_loss,
    raft_weights,
    rwr_weights,
    weighted_matching_loss,
)

PROMPTS = ["a red circle", "a blue square"]
TRAINERS = {
    "rwr": (RWRTrainer, RWRConfig),
    "raft": (RAFTTrainer, RAFTConfig),
    "awm": (AWMTrainer, AWMConfig),
    "nft": (DiffusionNFTTrainer, DiffusionNFTConfig),
}
PIPELINES = {"sd": get_tiny_pipeline, "sd3": get_tiny_sd3_pipeline, "flux": get_tiny_flux_pipeline}


def test_rwr_weights_are_n_times_the_softmax():
    e = [1.0, math.e, math.e**2]  # exp(r / 5) for r = 0, 5, 10
    expected = torch.tensor([3 * x / sum(e) for x in e])
    weights = rwr_weights(torch.tensor([0.0, 5.0, 10.0]), temperature=5.0)
    torch.testing.assert_close(weights, expected)
    assert math.isclose(weights.mean().item(), 1.0, rel_tol=1e-6)


def test_raft_keeps_the_best_of_each_group_and_averages_over_them():
    weights = raft_weights(torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3, 0.7]), ["a", "a", "b", "b", "c", "c"], keep=1)
    assert weights.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # a tie goes to the first
    assert raft_weights(torch.tensor([0.1, 0.9, 0.5]), ["a"] * 3, keep=2).tolist() == [0.0, 1.0, 1.0]
    errors = torch.tensor([10.0, 1.0, 2.0, 20.0, 30.0, 3.0])
    assert weighted_matching_loss(errors, weights, normalize=True).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert weighted_matching_loss(errors, weights).item() == pytest.approx(1.0)  # (1 + 2 + 3) / 6


def test_raft_min_reward_keeps_only_images_that_pass():
    rewards, prompts = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0]), ["a", "a", "b", "b", "c", "c"]
    # group b has no passing image: without min_reward its first (failing) image is kept, with it nothing is
    assert raft_weights(rewards, prompts, keep=1).tolist() == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert raft_weights(rewards, prompts, keep=1, min_reward=0.5).tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert raft_weights(rewards, prompts, keep=2, min_reward=0.5).tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    nothing = raft_weights(torch.zeros(4), ["a"] * 4, keep=1, min_reward=0.5)
    assert nothing.sum().item() == 0.0
    assert weighted_matching_loss(torch.ones(4), nothing, normalize=True).item() == 0.0
    with pytest.raises(ValueError, match="min_reward"):
        RAFTConfig(min_reward=float("nan"))
    with pytest.raises(ValueError, match="'high'"):
        RAFTConfig(min_reward="high")


def test_awm_loss_is_the_advantage_weighted_ghuber():
    errors, sigma, advantages = torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.25]), torch.tensor([10.0, -2.5])
    # A = clamp(adv, +-5) / 5 = [1, -0.5]; g = sigma ((e + 1e-10)^0.25 - 1e-10^0.25) / 0.25 = [0, 1 - 10^-2.5]
    expected = 0.5 * (1 * 0.0 + -0.5 * (1 - 10**-2.5))
    assert awm_loss(errors, sigma, advantages, 5.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("advantage,expected", [(0.0, 2.5), (5.0, 3.0), (-5.0, 2.0), (50.0, 3.0)])
def test_nft_loss_against_a_hand_computation(advantage, expected):
    # x0 = [1, 0], x_t = [0.5, 0.5], sigma 0.5, v = [0.2, -0.2], v_old = 0, beta 1:
    # x0+ = x_t - 0.5 v = [0.4, 0.6] -> L+ = mean(0.36 / 0.6) = 0.6; v- = -v, x0- = [0.6, 0.4] -> L- = 0.4;
    # r = clamp(0.5 + A / 10, 0, 1); loss = 5 (r L+ + (1 - r) L-)
    v = torch.tensor([[0.2, -0.2]], requires_grad=True)
    loss = nft_loss(
        v,
        torch.zeros(1, 2),
        torch.tensor([[0.5, 0.5]]),
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([0.5]),
        torch.tensor([advantage]),
        beta=1.0,
        adv_clip_max=5.0,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # the adaptive scales (0.6, 0.4) are constants; d x0+/dv = -0.5 and d x0-/dv = +0.5 (v- = -v), so with
    # d± = x0± - x0: dL/dv_j = 5 (r 2 d+_j (-0.5) / (2 * 0.6) + (1 - r) 2 d-_j (0.5) / (2 * 0.4))
    r = min(max(0.5 + advantage / 10, 0.0), 1.0)
    d_pos, d_neg = np.array([-0.6, 0.6]), np.array([-0.4, 0.4])
    grad = 5 * (r * (2 * d_pos * -0.5) / (2 * 0.6) + (1 - r) * (2 * d_neg * 0.5) / (2 * 0.4))
    np.testing.assert_allclose(v.grad.numpy()[0], grad, rtol=1e-5, atol=1e-6)


def _trainer(name, family, tmp_path, **kwargs):
    cls, config_cls = TRAINERS[name]
    settings = dict(
        num_inference_steps=3,
        guidance_scale=3.0,
        train_batch_size=4,
        group_size=2,
        max_steps=2,
        resolution=32,
        learning_rate=1e-2,
        output_dir=str(tmp_path / name),
    )
    return cls(PIPELINES[family](), config_cls(**{**settings, **kwargs}), Redness(), PROMPTS)


@pytest.mark.parametrize(
    "name,family",
    [("rwr", "sd"), ("raft", "sd"), ("rwr", "sd3"), ("raft", "flux"), ("awm", "sd3"), ("nft", "sd3"), ("nft", "flux")],
)
def test_each_trainer_learns_on_its_families(name, family, tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(name, family, tmp_path)
    before = {k: v.clone() for k, v in trainer.lora_state().items()}
    metrics = trainer.train()
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"]) and np.isfinite(metrics["reward"])
    after = trainer.lora_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with open(tmp_path / name / "logs" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [m["round"] for m in logged] == [1, 2]


@pytest.mark.parametrize("name", ["awm", "nft"])
def test_velocity_methods_refuse_noise_prediction_pipelines(name, tmp_path):
    with pytest.raises(NotImplementedError, match="flow matching"):
        _trainer(name, "sd", tmp_path)


def test_the_saved_lora_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(0)
    trainer = _trainer("nft", "sd3", tmp_path, max_steps=1)
    trainer.train()
    trainer.save_lora(str(tmp_path / "lora"))
    pipe = get_tiny_sd3_pipeline()
    reference = StableDiffusion3Pipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "np", "height": 32, "width": 32}
    before = reference("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    reference.load_lora_weights(str(tmp_path / "lora"))
    after = reference("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(after - before).max() > 0


def test_nft_old_policy_starts_as_the_lora_samples_and_is_restored(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer("nft", "sd3", tmp_path, max_steps=3, learning_rate=5e-2)
    trainer.train()
    logged = [json.loads(line) for line in open(tmp_path / "nft" / "logs" / "metrics.jsonl")]
    assert logged[0]["old_distance"] == 0.0  # decay min(0.001 * 0, 0.5) = 0: the old policy is the LoRA
    assert logged[-1]["old_distance"] > 0
    current = [p.detach().clone() for p in trainer.params]
    with trainer.sampling_weights():
        assert all(torch.equal(p, v) for p, v in zip(trainer.params, trainer.old.values))
    assert all(torch.equal(p, c) for p, c in zip(trainer.params, current))
    assert any(not torch.equal(p, v) for p, v in zip(trainer.params, trainer.old.values))


@pytest.mark.parametrize("name", ["nft", "awm"])
def test_resume_restores_the_lora_copy(name, tmp_path):
    torch.manual_seed(0)
    first = _trainer(name, "sd3", tmp_path, max_steps=2, checkpointing_steps=2, learning_rate=5e-2)
    first.train()
    copy = first.old if name == "nft" else first.ema
    saved = [v.clone() for v in copy.values]
    torch.manual_seed(0)
    second = _trainer(name, "sd3", tmp_path, max_steps=3, checkpointing_steps=1)
    second.load_checkpoint(second.checkpoints()[-1])
    restored = second.old if name == "nft" else second.ema
    assert second.step == 2 and all(torch.equal(a, b) for a, b in zip(saved, restored.values))
    assert second.train()["step"] == 3


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        RWRConfig(train_batch_size=6, group_size=4)
    with pytest.raises(ValueError, match="keep"):
        RAFTConfig(group_size=2, train_batch_size=4, keep=3)
    with pytest.raises(ValueError, match="temperature"):
        RWRConfig(temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        DiffusionNFTConfig(beta=0.0)
    with pytest.raises(ValueError, match="timestep_sampling"):
        AWMConfig(timestep_sampling="cosine")
