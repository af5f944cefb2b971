"""SPO on tiny components: its loss against a hand computation, the step pairs drawn from one x_t (the winner the
child the reward prefers), the zero-initialized LoRA's first loss of log 2, training steps on SD and SD3."""

import math

import numpy as np
import pytest
import torch

from ttalign.testing import Redness, get_tiny_pipeline, get_tiny_sd3_pipeline
from ttalign.training import SPOConfig, SPOTrainer, spo_loss

PROMPTS = ["a red circle", "a blue square"]


def test_spo_loss_against_a_hand_computation():
    w, l_ = torch.tensor([0.05, 1.0]), torch.tensor([-0.02, 0.0])
    zero = torch.zeros(2)
    # pair 1: beta (0.05 + 0.02) = 0.7; pair 2: log rho_w clipped to log 1.1 -> beta log 1.1
    expected = (math.log(1 + math.exp(-0.7)) + math.log(1 + math.exp(-10 * math.log(1.1)))) / 2
    assert spo_loss(w, l_, zero, zero, beta=10.0, eps=0.1).item() == pytest.approx(expected, rel=1e-6)


def _trainer(pipe, tmp_path, **kwargs):
    settings = dict(
        num_inference_steps=4,
        start_step=1,
        guidance_scale=3.0,
        train_batch_size=2,
        max_steps=2,
        resolution=32,
        learning_rate=1e-2,
        threshold=0.0,
        output_dir=str(tmp_path / "spo"),
    )
    return SPOTrainer(pipe, SPOConfig(**{**settings, **kwargs}), Redness(), PROMPTS)


@pytest.mark.parametrize("make", [get_tiny_pipeline, get_tiny_sd3_pipeline], ids=["sd", "sd3"])
def test_step_pairs_and_training(make, tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(make(), tmp_path)
    pairs = trainer.sample(torch.Generator().manual_seed(0))
    # steps 1 and 2 of 4 make pairs (the last step does not), one per image when the children differ
    assert set(pairs.steps) <= {1, 2} and len(pairs.steps) == 4
    assert not torch.equal(pairs.winners, pairs.losers)
    # the winner is the child whose predicted x0 the reward scores higher: redness of the decoded prediction
    model = trainer.model.replace(scheduler=pairs.scheduler)
    j, rows = pairs.steps[0], [0]
    t_next = pairs.scheduler.timesteps[j + 1]
    with torch.no_grad():
        cond = pairs.conditioning.select(rows)
        both = torch.cat([pairs.winners[rows], pairs.losers[rows]])
        out = model.denoise(both, t_next, cond.select([0, 0]), 3.0)
        x0 = model.predict_x0(out, t_next, both) if "flow_matching" not in model.features else None
        if x0 is None:
            x0 = both - float(pairs.scheduler.sigmas[j + 1]) * out
        images = (model.decode(x0, 32, 32).float() / 2 + 0.5).clamp(0, 1)
        scores = Redness()(images, ["x", "x"])
    assert scores[0] > scores[1]
    # the LoRA starts at zero: every log rho is 0 and the loss is log 2
    loss, metrics = trainer.batch_loss(pairs, torch.Generator())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["log_ratio_abs"] == 0.0
    metrics = trainer.train()
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"]) and metrics["pairs"] > 0
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items())


def test_a_threshold_no_pair_passes_gives_a_zero_loss(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(get_tiny_pipeline(), tmp_path, threshold=0.999, score_temperature=100.0)
    pairs = trainer.sample(torch.Generator().manual_seed(0))
    assert pairs.steps == []
    loss, metrics = trainer.batch_loss(pairs, torch.Generator())
    assert loss.item() == 0.0 and metrics["pairs"] == 0
    loss.backward()  # a graph through the LoRA, so the trainer's backward works


def test_spo_config_errors():
    with pytest.raises(ValueError, match="children"):
        SPOConfig(children=1)
    with pytest.raises(ValueError, match="start_step"):
        SPOConfig(num_inference_steps=4, start_step=3)
    with pytest.raises(ValueError, match="threshold"):
        SPOConfig(threshold=1.0)
