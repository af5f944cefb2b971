"""Reward training on preferences: Bradley-Terry and Plackett-Luce against hand computations, a taste learned from
pairs (held-out accuracy from chance to near certain), LoRA or full fine-tuning, the saved reward loaded by name and
folder, resume from a checkpoint, and the command line on a judgment database."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ttalign.preferences import JudgmentStore
from ttalign.preferences.reward_training import Ranking, RewardTrainer, RewardTrainingConfig, split_by_prompt
from ttalign.rewards import load_reward, reward_spec_name
from ttalign.rewards.evaluation import PreferencePair
from ttalign.shapes.clip import CLIP_DIR
from ttalign.shapes.world import render, sample_scene


def _redder_wins(n: int, seed: int = 0) -> list[PreferencePair]:
    """Pairs of rendered scenes of one caption each; people prefer the image with more red in it (a taste the shapes
    CLIP knows nothing of)."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n:
        (a, caption), (b, _) = sample_scene(rng), sample_scene(rng)
        ia, ib = render(a), render(b)
        red = [float((im[..., 0] - im[..., 1:].mean(-1)).clip(0).mean()) for im in (ia, ib)]
        if abs(red[0] - red[1]) < 0.01:
            continue
        images = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in (ia, ib)]
        pairs.append(PreferencePair(caption, *images, 0.0 if red[0] > red[1] else 1.0))
    return pairs


def _config(tmp_path, **kwargs):
    settings = dict(
        output_dir=str(tmp_path / "run"),
        learning_rate=1e-3,
        weight_decay=0.0,
        warmup_steps=5,
        max_steps=60,
        batch_size=16,
        held_out=0.25,
        checkpointing_steps=30,
    )
    return RewardTrainingConfig(**{**settings, **kwargs})


def test_bradley_terry_and_plackett_luce_against_hand_computations(tmp_path):
    image = Image.new("RGB", (32, 32))
    pairs = [PreferencePair("p", image, image, 0.0), PreferencePair("q", image, image, 0.5)]
    trainer = RewardTrainer(CLIP_DIR, _config(tmp_path, held_out=0.0), pairs)
    fixed = {"p": [2.0, 0.0], "q": [1.0, 3.0]}
    trainer.scores = lambda images, prompts: torch.tensor(
        [fixed[p][0] if k < len(prompts) // 2 else fixed[p][1] for k, p in enumerate(prompts)]
    )
    # pair p: -log softmax(2, 0)[0] = log(1 + e^-2); pair q (tie): -(0.5 log s(1 - 3) + 0.5 log s(3 - 1))
    bt_p = math.log(1 + math.exp(-2))
    bt_q = 0.5 * math.log(1 + math.exp(2)) + 0.5 * math.log(1 + math.exp(-2))
    loss = trainer.loss(pairs, [1.0, 1.0])
    assert loss.item() == pytest.approx((bt_p + bt_q) / 2, rel=1e-6)
    # Plackett-Luce, order (2, 0, 1) with scores (1, 0, 3): -[3 - lse(3, 1, 0)] - [1 - lse(1, 0)]
    ranking = Ranking("r", [image] * 3, [2, 0, 1])
    trainer.scores = lambda images, prompts: torch.tensor([1.0, 0.0, 3.0])
    expected = (np.logaddexp.reduce([3.0, 1.0, 0.0]) - 3) + (np.logaddexp(1.0, 0.0) - 1)
    assert trainer.loss([ranking], [1.0]).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="orders all"):
        Ranking("r", [image] * 3, [0, 0, 1])


def test_prompts_are_held_out_whole():
    pairs = _redder_wins(40)
    train, held = split_by_prompt(pairs, 0.25, seed=0)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held}) and held and train


@pytest.mark.parametrize("lora_rank,lr", [(0, 1e-3), (4, 1e-2)])
def test_a_taste_is_learned_and_the_saved_reward_loads(lora_rank, lr, tmp_path):
    torch.manual_seed(0)
    pairs = _redder_wins(160)
    trainer = RewardTrainer(CLIP_DIR, _config(tmp_path, lora_rank=lora_rank, learning_rate=lr), pairs)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert ("lora_" in "".join(trainable)) == bool(lora_rank)
    before = trainer.evaluate(trainer.held_out)
    report = trainer.train()
    assert before["accuracy"] < 0.75 and report["accuracy"] > 0.85, (before, report)
    low, high = report["interval"]
    assert low < report["accuracy"] <= high and report["n_decided"] >= 25
    folder = trainer.save(report=report)
    reward = load_reward(folder)
    assert reward_spec_name(f"mine={folder}") == "mine" and reward_spec_name(folder) == "reward"
    held = trainer.held_out[:8]
    images = torch.stack(
        [torch.from_numpy(np.asarray(p.image_0, dtype=np.float32) / 255).permute(2, 0, 1) for p in held]
    )
    with torch.no_grad():
        expected = trainer.scores([p.image_0 for p in held], [p.prompt for p in held])
        torch.testing.assert_close(reward(images, [p.prompt for p in held]), expected, atol=1e-4, rtol=1e-4)


def test_resume_continues_from_the_checkpoint(tmp_path):
    pairs = _redder_wins(64)
    torch.manual_seed(0)
    first = RewardTrainer(CLIP_DIR, _config(tmp_path, max_steps=30), pairs)
    first.train()
    torch.manual_seed(0)
    second = RewardTrainer(CLIP_DIR, _config(tmp_path, max_steps=40), pairs)
    second.load_checkpoint(second.checkpoints()[-1])
    assert second.step == 30
    names = [n for n, p in first.model.named_parameters() if p.requires_grad]
    a, b = dict(first.model.named_parameters()), dict(second.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in names)
    second.train()
    assert second.step == 40 and os.path.basename(second.checkpoints()[-1]) == "checkpoint-40"


def test_the_command_line_trains_on_a_judgment_database(tmp_path):
    from ttalign.cli import main

    store = JudgmentStore(str(tmp_path / "labels.db"))
    for k, pair in enumerate(_redder_wins(48)):
        names = []
        for side, image in enumerate((pair.image_0, pair.image_1)):
            names.append(f"{k}_{side}.png")
            image.save(tmp_path / names[-1])
        item = store.add_item(pair.prompt, names, systems=["a", "b"])
        store.record(item, "verifier", choice="left" if pair.label == 0 else "right")
    out = tmp_path / "out"
    code = main(
        ["train-reward", "--base", CLIP_DIR, "--pairs", str(tmp_path / "labels.db"), "--format", "judgments"]
        + ["--images-root", str(tmp_path), "--out", str(out), "--steps", "5", "--lr", "1e-4", "--warmup", "1"]
    )
    assert code == 0 and os.path.isfile(out / "reward" / "ttalign_reward.json")
    assert load_reward(f"taste={out / 'reward'}") is not None
