"""The LoRA files the trainers write: the LoRA's scale kept when alpha differs from the rank, and rounds of training
stacked into one LoRA that gives the last round's model on the first round's base (`stack_loras`)."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ttalign.shapes.models import fuse_lora
from ttalign.testing import get_tiny_components
from ttalign.training import LoRATrainer, TrainingConfig, stack_loras
from ttalign.training.trainer import LORA_WEIGHTS


def _pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**get_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _trained(pipe, tmp_path, seed: int, **config) -> LoRATrainer:
    """A trainer whose LoRA has seeded random up weights (B starts at zero), as if it had trained."""
    trainer = LoRATrainer(pipe, TrainingConfig(output_dir=str(tmp_path / f"run{seed}"), **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in trainer.accelerator.unwrap_model(trainer.denoiser).named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return trainer


def _denoise(unet) -> torch.Tensor:
    """The UNet's prediction on a fixed input, `[1, C, H, W]`."""
    generator = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    sample = torch.randn(1, unet.config.in_channels, size, size, generator=generator)
    context = torch.randn(1, 7, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


@pytest.mark.parametrize("alpha", [None, 16])
def test_a_saved_lora_loads_as_the_model_it_trained(tmp_path, alpha):
    """diffusers loads a LoRA file at alpha = rank: with alpha 16 on rank 8 the scale 2 must be in the file."""
    trainer = _trained(_pipe(), tmp_path, seed=0, lora_rank=8, lora_alpha=alpha)
    expected = _denoise(trainer.accelerator.unwrap_model(trainer.denoiser))
    trainer.save_lora(str(tmp_path / "lora"))
    pipe = _pipe()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(_denoise(pipe.unet), expected, rtol=1e-4, atol=1e-5)
    assert (_denoise(_pipe().unet) - expected).abs().max() > 1e-3  # the LoRA changes the prediction


def test_stacked_rounds_give_the_last_rounds_model_on_the_first_base(tmp_path):
    first = _trained(_pipe(), tmp_path, seed=0, lora_rank=4)
    first.save_lora(str(tmp_path / "round1"))
    # round 2 trains a new LoRA (another rank) on the model with round 1 fused in
    start = _pipe()
    fuse_lora(start, str(tmp_path / "round1"))
    second = _trained(start, tmp_path, seed=1, lora_rank=8)
    expected = _denoise(second.accelerator.unwrap_model(second.denoiser))
    second.save_lora(str(tmp_path / "round2"))

    stack_loras([str(tmp_path / "round1"), str(tmp_path / "round2")], str(tmp_path / "both"))
    assert os.listdir(tmp_path / "both") == [LORA_WEIGHTS]  # nothing temporary left
    state = load_file(str(tmp_path / "both" / LORA_WEIGHTS))
    down = next(v for k, v in state.items() if k.endswith(".lora.down.weight"))
    up = next(v for k, v in state.items() if k.endswith(".lora.up.weight"))
    assert down.shape[0] == up.shape[1] == 12  # ranks 4 + 8
    pipe = _pipe()
    pipe.load_lora_weights(str(tmp_path / "both"))
    torch.testing.assert_close(_denoise(pipe.unet), expected, rtol=1e-4, atol=1e-5)
    # the round-2 LoRA alone on the base is another model
    alone = _pipe()
    alone.load_lora_weights(str(tmp_path / "round2"))
    assert (_denoise(alone.unet) - expected).abs().max() > 1e-3


def test_fuse_lora_scales_the_update(tmp_path):
    """`fuse_lora(scale=s)` fuses s times the LoRA's weight update into the weights, and refuses a scale that is not
    positive."""
    trainer = _trained(_pipe(), tmp_path, seed=0, lora_rank=4)
    trainer.save_lora(str(tmp_path / "lora"))
    base = _pipe()
    weights = {k: v.clone() for k, v in base.unet.state_dict().items()}
    fused = {}
    for scale in (1.0, 0.5):
        pipe = _pipe()
        fuse_lora(pipe, str(tmp_path / "lora"), scale=scale)
        fused[scale] = pipe.unet.state_dict()
        assert not any("lora" in k for k in fused[scale])  # no adapter layers left
    changed = [k for k in weights if not torch.equal(fused[1.0][k], weights[k])]
    assert changed  # the LoRA moved some weights
    for k in changed:
        torch.testing.assert_close(
            fused[0.5][k] - weights[k], 0.5 * (fused[1.0][k] - weights[k]), rtol=1e-4, atol=1e-6
        )
    with pytest.raises(ValueError, match="scale must be > 0, got 0"):
        fuse_lora(_pipe(), str(tmp_path / "lora"), scale=0)


def test_stack_loras_refuses_what_it_cannot_stack_exactly(tmp_path):
    a, b, c = (str(tmp_path / name) for name in "abc")
    for folder, keys in (
        (a, ("x.lora.down.weight", "x.lora.up.weight")),
        (b, ("y.lora.down.weight", "y.lora.up.weight")),
    ):
        os.makedirs(folder)
        save_file({k: torch.zeros(2, 2) for k in keys}, os.path.join(folder, LORA_WEIGHTS))
    os.makedirs(c)
    save_file({"x.lora.down.weight": torch.zeros(2, 2), "x.alpha": torch.tensor(4.0)}, os.path.join(c, LORA_WEIGHTS))
    with pytest.raises(ValueError, match="two LoRAs or more"):
        stack_loras([a], str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="missing"):
        stack_loras([a, str(tmp_path / "missing")], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="adapt different layers"):
        stack_loras([a, b], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="x.alpha"):
        stack_loras([a, c], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


def test_lora_alpha_is_validated():
    with pytest.raises(ValueError, match="lora_alpha"):
        TrainingConfig(lora_alpha=0)


class _ToyTrainer(LoRATrainer):
    """A trainer whose step is a plain loss on the LoRA weights: the loop without sampling."""

    name = "toy"

    def training_step(self, generator):
        return sum((p.float() ** 2).sum() for p in self.params), {}


@pytest.mark.parametrize(
    "options, shown, hidden",
    [({}, "toy: 100%", None), ({"total": None}, "toy: 2it", "/2"), ({"disable": True}, None, "toy")],
)
def test_the_training_bar_takes_diffusers_progress_bar_options(tmp_path, capsys, options, shown, hidden):
    """`set_progress_bar_config` as on diffusers pipelines: `total=None` counts the steps of a run bounded by time."""
    trainer = _ToyTrainer(_pipe(), TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=2))
    trainer.set_progress_bar_config(**options)
    trainer.train()
    assert trainer.step == 2
    err = capsys.readouterr().err
    if shown:
        assert shown in err
    if hidden:
        assert hidden not in err
