"""Trainers on tiny SD3 and FLUX components: reward backpropagation through the flow sampler takes a step and its
LoRA loads with diffusers' own `load_lora_weights`; the noise-target trainers refuse flow models and name their flow
counterparts (Flow-GRPO and Flow-DPO are tested in test_training_grpo.py)."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from ttalign.rewards.evaluation import PreferencePair
from ttalign.testing import (
    Redness,
    get_tiny_flux_components,
    get_tiny_flux_pipeline,
    get_tiny_sd3_components,
    get_tiny_sd3_pipeline,
)
from ttalign.training import (
    DDPOConfig,
    DDPOTrainer,
    DiffusionDPOTrainer,
    DiffusionKTOTrainer,
    DPOConfig,
    KTOConfig,
    RewardBackpropConfig,
    RewardBackpropTrainer,
)

FAMILIES = {
    "sd3": (get_tiny_sd3_pipeline, lambda: StableDiffusion3Pipeline(**get_tiny_sd3_components())),
    "flux": (
        lambda: get_tiny_flux_pipeline(guidance_embeds=True),
        lambda: FluxPipeline(**get_tiny_flux_components(guidance_embeds=True)),
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reward_backprop_through_the_flow_sampler(family, tmp_path):
    aligned, parent = FAMILIES[family]
    torch.manual_seed(0)
    config = RewardBackpropConfig(
        mode="draft",
        k=2,
        num_inference_steps=3,
        guidance_scale=3.0,
        max_steps=1,
        train_batch_size=2,
        learning_rate=1e-2,
        resolution=32,
        output_dir=str(tmp_path / "o"),
    )
    trainer = RewardBackpropTrainer(aligned(), config, Redness(), ["a red circle", "a blue square"])
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"]) and "reward" in metrics
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items())
    trainer.save_lora(str(tmp_path / "lora"))
    reference = parent()
    reference.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "np", "height": 32, "width": 32}
    before = reference("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    reference.load_lora_weights(str(tmp_path / "lora"))
    after = reference("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(after - before).max() > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_noise_target_trainers_refuse_flow_models(family, tmp_path):
    pipe = FAMILIES[family][0]()
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    pairs = [PreferencePair("a red circle", image, image, 1.0)]
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="use FlowDPOTrainer"):
        DiffusionDPOTrainer(pipe, DPOConfig(output_dir=out), train_dataset=pairs)
    with pytest.raises(ValueError, match="use FlowKTOTrainer"):
        DiffusionKTOTrainer(pipe, KTOConfig(output_dir=out), train_dataset=pairs)
    with pytest.raises(ValueError, match="use FlowGRPOTrainer"):
        DDPOTrainer(pipe, DDPOConfig(output_dir=out), Redness(), ["a cat"])
