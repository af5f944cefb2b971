"""Diffusion-DPO trainer on the tiny components: LoRA updates, diffusers-loadable LoRA, atomic checkpoints, resume
after SIGKILL with the same final weights."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ttalign.shapes.pairs import make_shapes_preference_set
from ttalign.testing import Redness, get_tiny_components

sys.path.insert(0, os.path.dirname(__file__))
from dpo_run import run  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "dpo_run.py")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pairs"))
    make_shapes_preference_set(folder, 12)
    return folder


def test_dpo_trains_lora_and_saves_a_diffusers_lora(pairs, tmp_path):
    trainer = run(pairs, str(tmp_path / "out"), 3)
    lora = trainer.lora_state()
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at zero: it moved
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-2", "checkpoint-3", "logs"]
    trainer.save_lora(str(tmp_path / "lora"))

    from diffusers import StableDiffusionPipeline

    from ttalign import AlignedStableDiffusionPipeline

    for cls in (StableDiffusionPipeline, AlignedStableDiffusionPipeline):
        pipe = cls(**get_tiny_components())
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"num_inference_steps": 2, "output_type": "np", "height": 32, "width": 32}
        before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
        pipe.load_lora_weights(str(tmp_path / "lora"))
        after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
        assert np.abs(after - before).max() > 0


def test_killed_run_resumes_to_the_same_weights(pairs, tmp_path):
    """A run killed while it writes checkpoint 4 (files written, folder not yet renamed) leaves checkpoint 2 only, and
    resumed from it reaches the weights of a run that was never stopped."""
    straight = str(tmp_path / "straight")
    subprocess.run([sys.executable, SCRIPT, pairs, straight, "6"], check=True, capture_output=True)

    killed = str(tmp_path / "killed")
    proc = subprocess.run([sys.executable, SCRIPT, pairs, killed, "6", "4"], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(d for d in os.listdir(killed) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    assert any(d.startswith(".tmp-checkpoint-") for d in os.listdir(killed))  # the unfinished one, never visible
    subprocess.run([sys.executable, SCRIPT, pairs, killed, "6"], check=True, capture_output=True)

    a = load_file(os.path.join(straight, "checkpoint-6", "lora.safetensors"))
    b = load_file(os.path.join(killed, "checkpoint-6", "lora.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_dpo_config_is_validated():
    from ttalign.training.dpo import DPOConfig

    with pytest.raises(ValueError, match="max_steps"):
        DPOConfig(max_steps=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        DPOConfig(mixed_precision="fp8")


def test_kto_trains_on_feedback_records(pairs, tmp_path):
    import json

    from ttalign.testing import get_tiny_pipeline
    from ttalign.training import DiffusionKTOTrainer, KTOConfig

    folder = tmp_path / "feedback"
    folder.mkdir()
    records = [json.loads(line) for line in open(os.path.join(pairs, "pairs.jsonl"))][:4]
    with open(folder / "feedback.jsonl", "w") as f:
        for r in records:
            for key, good in (("image_0", r["label"] == 0), ("image_1", r["label"] == 1)):
                f.write(
                    json.dumps({"prompt": r["prompt"], "image": os.path.join(pairs, r[key]), "label": good}) + "\n"
                )
    torch.manual_seed(0)
    trainer = DiffusionKTOTrainer(
        get_tiny_pipeline(),
        KTOConfig(
            max_steps=2,
            train_batch_size=2,
            beta=500.0,
            learning_rate=1e-3,
            resolution=32,
            output_dir=str(tmp_path / "out"),
        ),
        train_dataset=str(folder),
    )
    assert len(trainer.records) == 8 and trainer.desirable.sum() == 4
    metrics = trainer.train()
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items())
    with open(folder / "feedback.jsonl", "a") as f:
        f.write('{"prompt": "x", "image": "nope.png", "label": true}\n')
    with pytest.raises(ValueError, match="feedback.jsonl, line 9: image file 'nope.png'"):
        DiffusionKTOTrainer(get_tiny_pipeline(), KTOConfig(output_dir=str(tmp_path / "o2")), train_dataset=str(folder))


@pytest.mark.parametrize("mode", ["draft", "alignprop", "refl"])
def test_reward_backprop_raises_the_reward_signal(mode, tmp_path):
    """A few steps of each mode raise the reward of the pipeline's own samples, measured on the same noise before and
    after (the training batches are drawn from other noise). ReFL trains one x0 prediction per step, at a random
    step of the whole schedule here (`refl_start=0`), so it gets a larger learning rate and more steps."""
    from ttalign.rewards import JpegIncompressibility
    from ttalign.testing import get_tiny_pipeline
    from ttalign.training import RewardBackpropConfig, RewardBackpropTrainer

    torch.manual_seed(0)
    prompts = ["a red circle", "a blue square"]
    lr, steps = (0.3, 20) if mode == "refl" else (0.1, 10)
    config = RewardBackpropConfig(
        mode=mode,
        k=2,
        num_inference_steps=3,
        guidance_scale=3.0,
        max_steps=steps,
        train_batch_size=2,
        resolution=32,
        learning_rate=lr,
        refl_target=1.0,
        refl_start=0.0,
        output_dir=str(tmp_path / mode),
    )
    pipe = get_tiny_pipeline()

    def reward_of_samples() -> float:
        images = pipe(
            prompts * 4,
            num_inference_steps=3,
            guidance_scale=3.0,
            height=32,
            width=32,
            output_type="pt",
            generator=torch.Generator().manual_seed(123),
        ).images
        return Redness()(images, prompts * 4).mean().item()

    before = reward_of_samples()
    trainer = RewardBackpropTrainer(pipe, config, Redness(), prompts)
    metrics = trainer.train()
    assert metrics["step"] == steps and np.isfinite(metrics["loss"]) and "reward" in metrics
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items())
    after = reward_of_samples()
    assert after > before + 0.005, (before, after)  # observed: +0.007 in each mode
    with pytest.raises(ValueError, match="JpegIncompressibility"):
        RewardBackpropTrainer(get_tiny_pipeline(), config, JpegIncompressibility(), ["a"])


def test_two_processes_stay_in_sync(pairs, tmp_path):
    """torchrun starts two gloo processes on the CPU; they draw different batches, and the LoRA weights stay equal
    because accelerate averages the gradients once per optimizer step. Saving a checkpoint does not hang."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = os.path.join(os.path.dirname(__file__), "dpo_ddp.py")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29517", script, pairs, out]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=env)
    ranks = [torch.load(os.path.join(out, f"rank{k}.pt"), weights_only=True) for k in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [3, 3]
    for key, value in ranks[0]["lora"].items():
        assert torch.equal(value, ranks[1]["lora"][key]), key
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in ranks[0]["lora"].items())
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.parametrize("algorithm,kl_weight", [("ppo", 0.0), ("reinforce", 0.01)])
def test_ddpo_records_trajectories_and_updates_the_lora(algorithm, kl_weight, tmp_path):
    from ttalign.rewards import JpegIncompressibility
    from ttalign.testing import get_tiny_pipeline
    from ttalign.training import DDPOConfig, DDPOTrainer

    torch.manual_seed(0)
    config = DDPOConfig(
        algorithm=algorithm,
        kl_weight=kl_weight,
        num_inference_steps=3,
        guidance_scale=3.0,
        max_steps=2,
        train_batch_size=2,
        resolution=32,
        learning_rate=1e-2,
        clip_range=0.2,
        output_dir=str(tmp_path / algorithm),
    )
    trainer = DDPOTrainer(get_tiny_pipeline(), config, JpegIncompressibility(), ["a red circle", "a blue square"])
    traj = trainer.sample(torch.Generator().manual_seed(0))
    assert traj.latents.shape[:2] == (3, 2) and traj.log_probs.shape == (3, 2)
    # before any update, the recorded log-probabilities are the current policy's: ratio 1, nothing clipped
    loss, metrics = trainer.policy_loss(traj, [0, 1, 2])
    if algorithm == "ppo":
        assert metrics["clip_fraction"] == 0.0
        assert torch.isclose(loss, -traj.advantages.mean(), atol=1e-4)
    metrics = trainer.train()
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items())
    with pytest.raises(ValueError, match="eta > 0"):
        DDPOConfig(eta=0.0)


def test_dpo_with_gradient_checkpointing_and_bf16(pairs, tmp_path):
    from accelerate.state import AcceleratorState

    from ttalign.testing import get_tiny_pipeline
    from ttalign.training import DiffusionDPOTrainer, DPOConfig

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    torch.manual_seed(0)
    config = DPOConfig(
        max_steps=1,
        train_batch_size=2,
        gradient_checkpointing=True,
        mixed_precision="bf16",
        resolution=32,
        beta=500.0,
        learning_rate=1e-3,
        output_dir=str(tmp_path / "o"),
    )
    trainer = DiffusionDPOTrainer(get_tiny_pipeline(), config, train_dataset=pairs)
    assert trainer.accelerator.unwrap_model(trainer.unet).is_gradient_checkpointing
    metrics = trainer.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert np.isfinite(metrics["loss"])
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items())


def test_tensorboard_logging(pairs, tmp_path):
    from ttalign.testing import get_tiny_pipeline
    from ttalign.training import DiffusionDPOTrainer, DPOConfig

    torch.manual_seed(0)
    config = DPOConfig(
        max_steps=2,
        train_batch_size=2,
        resolution=32,
        beta=500.0,
        report_to="tensorboard",
        output_dir=str(tmp_path / "tb"),
    )
    DiffusionDPOTrainer(get_tiny_pipeline(), config, train_dataset=pairs).train()
    events = [f for _, _, files in os.walk(tmp_path / "tb") for f in files if f.startswith("events.out.tfevents")]
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next(root for root, _, files in os.walk(tmp_path / "tb") if any(f in events for f in files))
    acc = EventAccumulator(run_dir)
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"] and len(acc.Scalars("loss")) == 2
