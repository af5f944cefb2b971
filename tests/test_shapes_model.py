"""The embedded shapes-world model: layout, loading, sampling quality, the training script and the harness."""

import json
import os

import pytest
import torch

from ttalign import AlignedStableDiffusionPipeline
from ttalign.cli import main
from ttalign.shapes import MODEL_DIR, SAMPLING_DEFAULTS, evaluation_prompts, load_pipeline, verify
from ttalign.shapes.evaluate import evaluate, example_grid, markdown_table


@pytest.fixture(scope="module")
def shapes_pipe():
    pipe = load_pipeline(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_model_folder_is_a_standard_diffusers_layout():
    with open(os.path.join(MODEL_DIR, "model_index.json")) as f:
        index = json.load(f)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert name in index and os.path.isdir(os.path.join(MODEL_DIR, name))
    files = [os.path.join(root, f) for root, _, names in os.walk(MODEL_DIR) for f in names]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]  # safetensors only
    assert sum(os.path.getsize(f) for f in files) <= 25 * 2**20
    assert os.path.isfile(os.path.join(MODEL_DIR, "training_args.json"))
    assert os.path.isfile(os.path.join(MODEL_DIR, "training_log.txt"))


def test_loads_through_from_pretrained(shapes_pipe):
    assert isinstance(shapes_pipe, AlignedStableDiffusionPipeline)
    again = AlignedStableDiffusionPipeline.from_pretrained(MODEL_DIR)
    assert again.unet.config.sample_size == 16 and again.vae_scale_factor == 2


def test_draws_single_coloured_objects_well(shapes_pipe):
    prompts = [p for p, c in evaluation_prompts(12) if c == "colors"]
    out = shapes_pipe(
        prompts,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **SAMPLING_DEFAULTS,
    )
    assert out.images.shape == (24, 3, 32, 32)
    assert verify(out.images, [p for p in prompts for _ in range(2)]).category_accuracy["colors"] >= 0.75


def test_evaluation_harness(shapes_pipe, tmp_path):
    from ttalign.methods import BestOfN
    from ttalign.shapes import ShapesSoftVerifier

    prompts = evaluation_prompts(2)
    base = evaluate(shapes_pipe, prompts, name="base", seeds=2, batch_prompts=6, num_inference_steps=5)
    best = evaluate(
        shapes_pipe,
        prompts,
        [BestOfN(ShapesSoftVerifier(), n=2)],
        name="bo2",
        seeds=2,
        batch_prompts=6,
        num_inference_steps=5,
    )
    assert base.images == best.images == 24
    assert base.nfe_per_image == 5 and best.nfe_per_image == 10
    assert best.reward_calls == 2 and base.reward_calls == 0
    assert set(base.category_accuracy) == {c for _, c in prompts}
    assert 0 < best.soft_reward <= 1
    table = markdown_table([base, best])
    assert table.count("\n") == 4 and "| bo2 |" in table
    summary = base.summary()
    assert json.loads(json.dumps(summary))["verdicts"] == [[v.category, v.passed] for v in base.verification.verdicts]
    assert (
        sum(passed for _, passed in summary["verdicts"]) == sum(base.verification.passed) and "samples" not in summary
    )
    assert [len(p) for p in summary["placements"]] == [2 if c == "position" else 0 for c, _ in summary["verdicts"]]
    position = evaluate(
        shapes_pipe, [p for p in prompts if p[1] == "position"], name="pos", seeds=1, num_inference_steps=2
    )
    assert markdown_table([position]).splitlines()[0] == (
        "| run | position | overall | soft reward | CLIP reward | diversity: CLIP distance / position spread | "
        "NFE / image | time (s) | peak mem (MB) |"
    )
    # intervals contain the rates; best-of-2 is compared with the base run image by image
    for result in (base, best):
        for category, rate in result.category_accuracy.items():
            low, high = result.intervals[category]
            assert 0 <= low <= rate <= high <= 1 and high - low > 0.1  # 4 images per category: wide
    assert (
        "vs baseline: won / lost, p"
        in markdown_table([base, best], baseline=base.summary()["verdicts"]).splitlines()[0]
    )
    assert base.diversity["prompts"] == 12 and 0 < base.diversity["clip_distance"] <= 2
    assert -100 <= base.clip_reward <= 100
    example_grid(base).save(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_demo_command(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--n", "2"]) == 0
    printed = capsys.readouterr().out
    verdicts = [line for line in printed.splitlines() if line.startswith(("  PASS", "  fail"))]
    assert "verified: baseline" in printed and len(verdicts) == 16
    assert out.stat().st_size > 0


def test_training_script_smoke(tmp_path):
    """The training script runs end to end on a tiny budget and writes a loadable model (training itself is not
    part of the test suite)."""
    from ttalign.shapes.train import main as train_main

    out = tmp_path / "model"
    train_main(["--out", str(out), "--vae-steps", "2", "--steps", "2", "--dataset-size", "64", "--batch-size", "8"])
    pipe = AlignedStableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    assert json.loads((out / "training_args.json").read_text())["steps"] == 2


def test_tuned_models_load_offline_with_their_lora_fused(tmp_path, monkeypatch):
    """`load_pipeline("<model>-tuned")` is the embedded model with its shipped LoRA (diffusers' format) fused into the
    denoiser: other weights than the base's, no adapter layers left, and a record of how it was trained. The command
    line and the server load it by name (`shapes-flow-tuned`); a missing LoRA is a clear error either way."""
    from ttalign import loading
    from ttalign.shapes import models
    from ttalign.shapes.models import TUNED_DIR

    for model, served_name in (("sd", "shapes-tuned"), ("flow", "shapes-flow-tuned")):
        with open(os.path.join(TUNED_DIR, model, "training.json")) as f:
            record = json.load(f)
        assert record["trained_by"].startswith("python benchmarks/run.py tuned_loras")
        assert record["tuned"]["overall"] > record["base"]["overall"]
        base, tuned = load_pipeline(model, device="cpu"), load_pipeline(f"{model}-tuned", device="cpu")
        base_weights, tuned_weights = base.family.denoiser.state_dict(), tuned.family.denoiser.state_dict()
        assert base_weights.keys() == tuned_weights.keys()  # fused: no LoRA layers
        moved = [k for k in base_weights if not torch.equal(base_weights[k], tuned_weights[k])]
        assert moved and all("attn" in k or "proj" in k or "ff" in k or "to_" in k for k in moved)
        served = loading.load_pipeline(served_name, dtype="float32", device="cpu").family.denoiser.state_dict()
        assert all(torch.equal(served[k], tuned_weights[k]) for k in moved)
    with pytest.raises(ValueError, match="sd-tuned"):
        load_pipeline("sdxl-tuned")
    monkeypatch.setattr(models, "TUNED_DIR", str(tmp_path))  # no LoRA shipped
    with pytest.raises(FileNotFoundError, match="tuned_loras"):
        load_pipeline("sd-tuned")
    with pytest.raises(loading.ModelLoadError, match="'shapes-tuned'.*No tuned LoRA"):
        loading.load_pipeline("shapes-tuned", device="cpu")
