"""The embedded flow-matching shapes model (SD3's layout): layout, loading, its text encoding, sampling quality, and a
Flow-GRPO step on it."""

import json
import os

import pytest
import torch

from ttalign import AlignedStableDiffusion3Pipeline
from ttalign.shapes import FLOW_MODEL_DIR, FLOW_SAMPLING_DEFAULTS, evaluation_prompts, load_pipeline, verify
from ttalign.shapes.train import FLOW_TEXT_LENGTH, _tokenize_all, encode_flow_text


@pytest.fixture(scope="module")
def flow_pipe():
    pipe = load_pipeline("flow", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_model_folder_is_a_standard_diffusers_layout():
    with open(os.path.join(FLOW_MODEL_DIR, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] in ("StableDiffusion3Pipeline", "AlignedStableDiffusion3Pipeline")
    for name in (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
    ):
        assert name in index and os.path.isdir(os.path.join(FLOW_MODEL_DIR, name)), name
    files = [os.path.join(root, f) for root, _, names in os.walk(FLOW_MODEL_DIR) for f in names]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]  # safetensors only
    assert sum(os.path.getsize(f) for f in files) <= 25 * 2**20
    for name in ("training_args.json", "training_log.txt"):
        assert os.path.isfile(os.path.join(FLOW_MODEL_DIR, name))


def test_loads_through_from_pretrained(flow_pipe):
    assert isinstance(flow_pipe, AlignedStableDiffusion3Pipeline)
    assert flow_pipe.transformer.config.patch_size == 2 and flow_pipe.vae_scale_factor == 2
    assert flow_pipe.family.clip_length == FLOW_TEXT_LENGTH  # the CLIP tokens before the T5 ones
    with pytest.raises(ValueError, match="expected 'sd', 'flow'"):
        load_pipeline("sdxl")


def test_the_training_encoding_is_the_pipelines(flow_pipe):
    prompts = ["a red circle left of a blue square", "three triangles", ""]
    models = {name: getattr(flow_pipe, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    tokenizers = {name: getattr(flow_pipe, name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")}
    with torch.no_grad():
        embeds, pooled = encode_flow_text(models, _tokenize_all(tokenizers, prompts))
        theirs = flow_pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=FLOW_TEXT_LENGTH
        )
    assert embeds.shape == (3, 2 * FLOW_TEXT_LENGTH, 128)
    assert torch.allclose(embeds, theirs[0], atol=1e-6) and torch.allclose(pooled, theirs[2], atol=1e-6)
    # a subject word sits at its CLIP position and at its T5 position, 10 tokens later
    spans = flow_pipe.family.token_spans("a red circle left of a blue square", ["circle", "square"])
    assert spans == [[3, 12], [8, 17]]


def test_draws_single_coloured_objects_well(flow_pipe):
    """A plain call samples with the model's own defaults (its folder's `ttalign_sampling.json`: 20 steps, guidance
    3, the T5 length it was trained on); the parent's defaults would draw none of these right."""
    prompts = [p for p, c in evaluation_prompts(12) if c == "colors"]
    out = flow_pipe(prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (24, 3, 32, 32) and out.traces["compute"]["nfe"] == 24 * 20
    assert verify(out.images, [p for p in prompts for _ in range(2)]).category_accuracy["colors"] >= 0.75


def test_sampling_defaults_travel_with_the_model(flow_pipe, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from ttalign.pipelines.base import SAMPLING_DEFAULTS_FILE

    assert (
        flow_pipe.sampling_defaults
        == FLOW_SAMPLING_DEFAULTS
        == {"num_inference_steps": 20, "guidance_scale": 3.0, "max_sequence_length": 10}
    )
    generator = torch.Generator().manual_seed(1)
    plain = flow_pipe("a red circle", generator=generator, output_type="pt", num_inference_steps=3)
    assert plain.traces["compute"]["nfe"] == 3  # what the caller gives wins
    explicit = flow_pipe(
        "a red circle",
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
        num_inference_steps=3,
        guidance_scale=3.0,
        max_sequence_length=10,
    )
    assert torch.equal(plain.images, explicit.images)
    # saved, loaded and wrapped, the defaults go along; the parent pipeline knows nothing of them
    flow_pipe.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / SAMPLING_DEFAULTS_FILE).is_file()
    loaded = AlignedStableDiffusion3Pipeline.from_pretrained(tmp_path / "copy")
    assert loaded.sampling_defaults == FLOW_SAMPLING_DEFAULTS
    assert AlignedStableDiffusion3Pipeline.from_pipe(flow_pipe).sampling_defaults == FLOW_SAMPLING_DEFAULTS
    parent = StableDiffusion3Pipeline.from_pretrained(tmp_path / "copy")
    assert AlignedStableDiffusion3Pipeline.from_pipe(parent).sampling_defaults == {}
    flow_pipe.sampling_defaults = {"strength": 0.5}
    try:
        with pytest.raises(TypeError, match=r"sampling_defaults name \['strength'\]"):
            flow_pipe("a red circle", num_inference_steps=1)
    finally:
        flow_pipe.sampling_defaults = dict(FLOW_SAMPLING_DEFAULTS)


def test_flow_grpo_step_on_the_model(flow_pipe, tmp_path):
    from ttalign.shapes import ShapesSoftVerifier
    from ttalign.training import FlowGRPOConfig, FlowGRPOTrainer

    config = FlowGRPOConfig(
        max_steps=1,
        train_batch_size=4,
        group_size=2,
        num_inference_steps=4,
        learning_rate=1e-3,
        output_dir=str(tmp_path / "o"),
        encode_options={"max_sequence_length": FLOW_TEXT_LENGTH},
    )
    pipe = AlignedStableDiffusion3Pipeline.from_pretrained(FLOW_MODEL_DIR)
    trainer = FlowGRPOTrainer(pipe, config, ShapesSoftVerifier(), ["a red circle", "two blue squares"])
    traj = trainer.sample(torch.Generator().manual_seed(0))
    assert traj.conditioning.prompt_embeds.shape[1] == 2 * FLOW_TEXT_LENGTH  # sampled with the short T5 length
    _, metrics = trainer.policy_loss(traj, list(range(len(traj.steps))))
    assert metrics["ratio"] == 1.0 and metrics["kl"] == 0.0
    assert trainer.train()["step"] == 1


def test_command_line_runs_the_flow_model(tmp_path, capsys):
    from PIL import Image

    from ttalign.cli import main

    out = tmp_path / "flow.png"
    assert (
        main(["generate", "a red circle", "--model", "shapes-flow", "--steps", "4", "--seed", "0", "--out", str(out)])
        == 0
    )
    assert Image.open(out).size == (32, 32)
    assert "nfe: 4" in capsys.readouterr().out
