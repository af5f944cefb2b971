"""PPO's sampling rounds and inner epochs in DDPO and Flow-GRPO on tiny components: the first optimizer step of a
round is on-policy (ratio exactly 1), later steps of the same round are off-policy and clipped, one sampling call
per batch of a round, the recorded schedule and conditioning are what the loss reads, and REINFORCE stays on-policy."""

import json

import pytest
import torch

from ttalign.testing import Redness, get_tiny_pipeline, get_tiny_sd3_pipeline
from ttalign.training import DDPOConfig, DDPOTrainer, GRPOConfig, GRPOTrainer

PROMPTS = ["a red circle", "a blue square"]


def _logged(out) -> list[dict]:
    with open(out / "logs" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _count_samples(trainer) -> list:
    calls, sample = [], trainer.sample

    def counted(generator):
        calls.append(1)
        return sample(generator)

    trainer.sample = counted
    return calls


def _ddpo(tmp_path, **kwargs):
    settings = dict(
        num_inference_steps=3,
        guidance_scale=3.0,
        train_batch_size=2,
        resolution=32,
        learning_rate=5e-2,
        clip_range=1e-4,
        output_dir=str(tmp_path / "ddpo"),
    )
    return DDPOTrainer(get_tiny_pipeline(), DDPOConfig(**{**settings, **kwargs}), Redness(), PROMPTS)


def _grpo(tmp_path, **kwargs):
    settings = dict(
        num_inference_steps=4,
        guidance_scale=3.0,
        train_batch_size=4,
        group_size=2,
        resolution=32,
        learning_rate=5e-2,
        clip_range=1e-4,
        kl_weight=0.0,
        output_dir=str(tmp_path / "grpo"),
    )
    return GRPOTrainer(get_tiny_sd3_pipeline(), GRPOConfig(**{**settings, **kwargs}), Redness(), PROMPTS)


@pytest.mark.parametrize("make", [_ddpo, _grpo], ids=["ddpo", "flow_grpo"])
def test_a_round_is_on_policy_at_its_first_step_and_clipped_after(make, tmp_path):
    torch.manual_seed(0)
    trainer = make(tmp_path, rollout_batches=2, num_inner_epochs=2, max_steps=5)
    samples = _count_samples(trainer)
    trainer.train()
    logged = _logged(tmp_path / ("ddpo" if make is _ddpo else "grpo"))
    assert [m["round"] for m in logged] == [1, 1, 1, 1, 2]
    assert [m["inner_epoch"] for m in logged] == [0, 0, 1, 1, 0]
    assert len(samples) == 4  # two sampling calls per round: the first round, then the second at step 5
    for m in (logged[0], logged[4]):  # the first step of a round scores under the weights that sampled
        assert m["ratio"] == 1.0 and m["ratio_min"] == m["ratio_max"] == 1.0
        assert m["clip_fraction"] == 0.0 and m["approx_kl"] == 0.0
    for m in logged[1:4]:  # later steps of the round are off-policy: the ratio moves and the clip acts
        assert m["ratio_min"] < 1.0 < m["ratio_max"] or abs(m["ratio"] - 1.0) > 1e-4, m
        assert m["clip_fraction"] > 0 and m["approx_kl"] > 0, m


def test_the_loss_reads_the_trajectory_schedule_not_the_pipelines(tmp_path):
    """A pipeline scheduler set to another schedule after sampling (as an evaluation between steps does) leaves the
    loss on the recorded trajectory unchanged: ratio exactly 1 before any update."""
    torch.manual_seed(0)
    trainer = _ddpo(tmp_path, max_steps=1)
    rollout = trainer.sample(torch.Generator().manual_seed(0))
    assert rollout.timesteps.tolist() == trainer.sampler_pipe.scheduler.timesteps.tolist()
    trainer.sampler_pipe.scheduler.set_timesteps(7)
    loss, metrics = trainer.policy_loss(rollout, [0, 1, 2])
    assert metrics["ratio"] == 1.0 and metrics["clip_fraction"] == 0.0
    assert torch.isclose(loss, -rollout.advantages.mean(), atol=1e-4)


def test_reinforce_stays_on_policy(tmp_path):
    with pytest.raises(ValueError, match="on-policy"):
        DDPOConfig(algorithm="reinforce", num_inner_epochs=2)
    with pytest.raises(ValueError, match="on-policy"):
        DDPOConfig(algorithm="reinforce", rollout_batches=3)
    for bad in (dict(rollout_batches=0), dict(num_inner_epochs=1.5), dict(clip_range=0.0), dict(adv_clip_max=-1)):
        with pytest.raises(ValueError):
            GRPOConfig(**bad)
    torch.manual_seed(0)
    trainer = _ddpo(tmp_path, algorithm="reinforce", max_steps=2)
    samples = _count_samples(trainer)
    trainer.train()
    logged = _logged(tmp_path / "ddpo")
    assert len(samples) == 2 and [m["round"] for m in logged] == [1, 2]
    assert all(m["ratio"] == 1.0 for m in logged)
