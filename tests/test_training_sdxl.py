"""Every trainer on tiny SDXL components: each takes a step, and its saved LoRA loads with diffusers' own
`StableDiffusionXLPipeline.load_lora_weights` and changes its images; DPO conditions on each image's size and crop."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from ttalign.rewards.evaluation import PreferencePair
from ttalign.testing import Redness, get_tiny_sdxl_components, get_tiny_sdxl_pipeline
from ttalign.training import (
    DDPOConfig,
    DDPOTrainer,
    DiffusionDPOTrainer,
    DiffusionKTOTrainer,
    DPOConfig,
    KTOConfig,
    RewardBackpropConfig,
    RewardBackpropTrainer,
    crop_geometry,
)


def _pairs():
    """Preference pairs of non-square images (48 x 80 and 80 x 64 px), so that sizes and crops differ."""
    rng = np.random.default_rng(0)

    def image(w, h):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    return [
        PreferencePair("a red circle", image(80, 48), image(80, 48), 0.0),
        PreferencePair("a blue square", image(64, 80), image(64, 80), 1.0),
    ]


def _lora_moved(trainer) -> bool:
    return any("lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items())


def _loads_in_diffusers(trainer, folder) -> None:
    trainer.save_lora(str(folder))
    reference = StableDiffusionXLPipeline(**get_tiny_sdxl_components(), add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "np"}
    before = reference("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    reference.load_lora_weights(str(folder))
    after = reference("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(after - before).max() > 0


def test_dpo_conditions_on_each_images_size_and_its_lora_loads_in_diffusers(tmp_path):
    torch.manual_seed(0)
    pairs = _pairs()
    config = DPOConfig(max_steps=2, train_batch_size=2, beta=500.0, learning_rate=1e-2, output_dir=str(tmp_path / "o"))
    trainer = DiffusionDPOTrainer(get_tiny_sdxl_pipeline(), config, train_dataset=pairs)
    assert trainer.size == 64  # the pipeline's default size
    # time ids: original size + crop corner + target size, from image 0 of each pair (diffusers' DPO script)
    expected = []
    for pair in pairs:
        (h, w), (top, left) = crop_geometry(pair.image_0, 64)
        expected.append([h, w, top, left, 64, 64])
    assert trainer.cond.added["time_ids"].tolist() == expected == [[48, 80, 0, 21, 64, 64], [80, 64, 8, 0, 64, 64]]
    assert trainer.cond.added["text_embeds"].shape == (2, 32)  # the pooled embedding of the second encoder
    metrics = trainer.train()
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"]) and _lora_moved(trainer)
    _loads_in_diffusers(trainer, tmp_path / "lora")


def test_kto_takes_a_step(tmp_path):
    torch.manual_seed(0)
    config = KTOConfig(max_steps=1, train_batch_size=2, beta=500.0, learning_rate=1e-2, output_dir=str(tmp_path / "o"))
    trainer = DiffusionKTOTrainer(get_tiny_sdxl_pipeline(), config, train_dataset=_pairs())
    assert len(trainer.records) == 4 and trainer.cond.added["time_ids"].shape == (4, 6)
    assert np.isfinite(trainer.train()["loss"]) and _lora_moved(trainer)


def test_ddpo_recomputes_the_recorded_log_probabilities_and_trains(tmp_path):
    torch.manual_seed(0)
    config = DDPOConfig(
        num_inference_steps=3,
        guidance_scale=5.0,
        max_steps=1,
        train_batch_size=2,
        learning_rate=1e-2,
        kl_weight=0.01,
        clip_range=0.2,
        output_dir=str(tmp_path / "o"),
    )
    trainer = DDPOTrainer(get_tiny_sdxl_pipeline(), config, Redness(), ["a red circle", "a blue square"])
    traj = trainer.sample(torch.Generator().manual_seed(0))
    assert traj.latents.shape == (3, 2, 4, 32, 32)
    # before any update the policy is the one that sampled: ratio exactly 1, nothing clipped
    loss, metrics = trainer.policy_loss(traj, [0, 1, 2])
    assert metrics["clip_fraction"] == 0.0 and metrics["kl"] == 0.0
    assert torch.isclose(loss, -traj.advantages.mean(), atol=1e-5)
    assert np.isfinite(trainer.train()["loss"]) and _lora_moved(trainer)
    _loads_in_diffusers(trainer, tmp_path / "lora")


@pytest.mark.parametrize("mode", ["draft", "refl"])
def test_reward_backprop_takes_a_step(mode, tmp_path):
    torch.manual_seed(0)
    config = RewardBackpropConfig(
        mode=mode,
        k=2,
        num_inference_steps=3,
        guidance_scale=5.0,
        max_steps=1,
        train_batch_size=2,
        learning_rate=1e-2,
        refl_target=1.0,
        output_dir=str(tmp_path / mode),
    )
    trainer = RewardBackpropTrainer(get_tiny_sdxl_pipeline(), config, Redness(), ["a red circle", "a blue square"])
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"]) and "reward" in metrics and _lora_moved(trainer)
    if mode == "draft":
        _loads_in_diffusers(trainer, tmp_path / "lora")


@pytest.mark.parametrize("name", ["grpo", "d3po", "spo", "rwr", "raft"])
def test_the_online_trainers_take_a_step_on_sdxl(name, tmp_path):
    from ttalign import training as T

    torch.manual_seed(0)
    common = dict(
        num_inference_steps=3,
        guidance_scale=5.0,
        max_steps=1,
        train_batch_size=2,
        learning_rate=1e-2,
        output_dir=str(tmp_path / "o"),
    )
    config = {
        "grpo": lambda: T.GRPOConfig(group_size=2, noise_level=1.0, **common),
        "d3po": lambda: T.D3POConfig(noise_level=1.0, **common),
        "spo": lambda: T.SPOConfig(start_step=0, threshold=0.0, **common),
        "rwr": lambda: T.RWRConfig(group_size=2, **common),
        "raft": lambda: T.RAFTConfig(group_size=2, **common),
    }[name]()
    trainer_cls = {"grpo": T.GRPOTrainer, "d3po": T.D3POTrainer, "spo": T.SPOTrainer, "rwr": T.RWRTrainer}
    trainer_cls["raft"] = T.RAFTTrainer
    trainer = trainer_cls[name](get_tiny_sdxl_pipeline(), config, Redness(), ["a red circle", "a blue square"])
    assert np.isfinite(trainer.train()["loss"]) and _lora_moved(trainer)
