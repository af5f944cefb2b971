"""The benchmark suites and the figures the docs quote: every step names a script that exists, every results file the
README and docs link to is committed, and the index lists every table and plot with the command that made it."""

import importlib.util
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _runner():
    spec = importlib.util.spec_from_file_location("benchmark_runner", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_step_runs_a_script_that_exists():
    runner = _runner()
    assert {"headline", "overhead", "attend_excite", "training", "scaling"} <= set(runner.SUITES)
    for name, suite in runner.SUITES.items():
        names = [step.name for step in suite.steps]
        assert len(names) == len(set(names)), f"{name}: step names repeat"
        for step in suite.steps:
            assert (ROOT / "benchmarks" / step.script).is_file(), f"{name}/{step.name}: no {step.script}"
            assert step.command.startswith(f"python benchmarks/{step.script}")
        for doc in suite.quoted_in:
            assert (ROOT / doc).is_file(), doc
    assert not list((ROOT / "benchmarks").glob("*.sh")), "shell wrappers retire into suites"


def test_results_live_in_suite_folders_and_the_docs_links_resolve():
    runner = _runner()
    results = ROOT / "benchmarks" / "results"
    loose = [p.name for p in results.iterdir() if p.is_file() and p.name != "INDEX.md"]
    assert loose == []
    assert {p.name for p in results.iterdir() if p.is_dir() and p.name != "unsorted"} <= set(runner.SUITES)
    texts = {p: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]}
    missing = []
    for path, text in texts.items():
        for link in re.findall(r"results/([a-z_]+/[A-Za-z0-9_.\-]+\.(?:md|json|png))", text):
            if not (results / link).is_file():
                missing.append(f"{path.name}: {link}")
    assert missing == []


def test_the_index_maps_every_table_and_plot_to_a_command():
    runner = _runner()
    index = (ROOT / "benchmarks" / "results" / "INDEX.md").read_text()
    for suite in runner.SUITES:
        folder = ROOT / "benchmarks" / "results" / suite
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix in (".md", ".png"):
                row = next((line for line in index.splitlines() if f"]({suite}/{path.name})" in line), None)
                assert row is not None, f"INDEX.md lacks {suite}/{path.name}: rerun `python benchmarks/run.py --index`"
                assert "`python benchmarks/" in row


def test_the_verifier_quality_auc_is_the_pairwise_ranking_probability():
    import numpy as np

    spec = importlib.util.spec_from_file_location("verifier_quality", ROOT / "benchmarks" / "verifier_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    positive = rng.random(300) < 0.2 + 0.1 * scores
    pos, neg = scores[positive], scores[~positive]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert abs(module.roc_auc(scores, positive) - pairwise) < 1e-12
    assert np.isnan(module.roc_auc(scores, np.zeros(300, bool)))
    low, high = module.bootstrap_auc(scores.reshape(60, 5), positive.reshape(60, 5), rounds=200, seed=0)
    assert low < pairwise < high


def test_the_real_width_suite_builds_the_published_sizes():
    """The real-width suite's configurations are the published ones: built on the meta device (no memory), each
    denoiser and the big text encoders have their checkpoints' parameter counts."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import real_width as R

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        assert count(UNet2DConditionModel(**R.SD15_UNET)) == 859_520_964
        assert count(UNet2DConditionModel(**R.SDXL_UNET)) == 2_567_463_684
        assert count(SD3Transformer2DModel(**R.SD35_MEDIUM)) == 2_243_171_520
        assert count(FluxTransformer2DModel(**R.FLUX_DEV)) == 11_901_408_320
        assert count(R._clip(R.CLIP_G, True, "gelu")) == 694_659_840
        assert count(R._t5(24)) == 4_762_310_656


def test_a_chart_is_written_whole_into_a_folder_it_creates(tmp_path, monkeypatch):
    """A script run on its own writes to `results/unsorted/`, which a fresh clone does not have."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("benchmark_common", ROOT / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    path = tmp_path / "not" / "yet" / "chart.png"
    common.line_chart({"a": [(0.0, 1.0), (1.0, 2.0)]}, str(path), "x", "y")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in path.parent.iterdir()) == ["chart.png"]  # no temporary file left


def test_a_lora_strength_is_chosen_away_from_the_evaluation_set(tmp_path, monkeypatch):
    """`lora_scale.py`'s selection set avoids the evaluation captions wherever a category has others, its choice
    breaks ties towards the file's own scale, and the chosen LoRA is written with only its up projections scaled."""
    import pytest
    import torch
    from safetensors.torch import load_file, save_file

    from ttalign.shapes import CATEGORIES, evaluation_prompts

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lora_scale as L

    held_out = {p for per in (20, 40) for p, _ in evaluation_prompts(per)}
    prompts, outside = L.selection_prompts(10, seed=4321, exclude=held_out)
    assert [c for _, c in prompts] == [c for c in CATEGORIES for _ in range(10)]
    for category in CATEGORIES:
        captions = [p for p, c in prompts if c == category]
        assert sum(p not in held_out for p in captions) == outside[category]
        assert all(p not in held_out for p in captions[: outside[category]])
    assert outside["single_object"] == 0 and outside["position"] == 10  # 3 single-object captions; many layouts

    assert L.best_scale({0.5: 0.4, 1.0: 0.45, 1.5: 0.45, 2.0: 0.3}) == 1.0
    assert L.best_scale({0.5: 0.4, 1.5: 0.45, 2.0: 0.45}) == 1.5
    assert L.parse_scales("0.5,1,2") == [0.5, 1.0, 2.0]
    for bad in ("0,1", "1,1", "a,1"):
        with pytest.raises(SystemExit, match="--scales"):
            L.parse_scales(bad)

    state = {"x.lora.down.weight": torch.ones(2, 3), "x.lora.up.weight": torch.full((3, 2), 2.0)}
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"))
    L.rescale(str(tmp_path), 1.5, str(tmp_path / "out"))
    scaled = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert torch.equal(scaled["x.lora.down.weight"], state["x.lora.down.weight"])
    assert torch.equal(scaled["x.lora.up.weight"], 3.0 * torch.ones(3, 2))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert L.recorded_trained_by(str(tmp_path)) == ""  # no record
    L.refuse_rescaled(str(tmp_path))
    (tmp_path / "training.json").write_text('{"trained_by": "a, rescaled x1.5 by python benchmarks/lora_scale.py"}')
    assert L.recorded_trained_by(str(tmp_path)).startswith("a, rescaled")
    with pytest.raises(SystemExit, match="rescaled already"):
        L.refuse_rescaled(str(tmp_path))
