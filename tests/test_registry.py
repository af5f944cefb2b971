"""The registry of model families and the package's structure: what each family declares, that `align`, loading and
the tests read the registry, that methods know models only through their family, and that no modules import each
other in a circle."""

import ast
import pathlib
import re

import pytest
import torch

import ttalign
from ttalign.pipelines import FAMILIES, ModelFamily, aligned_class_for, family_entry, family_for
from ttalign.pipelines.family import CAPABILITIES, register_family
from ttalign.testing import TINY_FAMILY_PIPELINES, get_tiny_family_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_registry_holds_the_four_families():
    assert set(FAMILIES) == {"sd", "sdxl", "sd3", "flux"}
    assert {k: e.denoiser_kind for k, e in FAMILIES.items()} == {
        "sd": "unet",
        "sdxl": "unet",
        "sd3": "transformer",
        "flux": "transformer",
    }
    flow = {k for k, e in FAMILIES.items() if "flow_matching" in e.capabilities}
    joint = {k for k, e in FAMILIES.items() if "joint_attention" in e.capabilities}
    assert flow == joint == {"sd3", "flux"}
    assert all({"cross_attention", "stochastic_steps"} <= e.capabilities for e in FAMILIES.values())
    assert {k for k, e in FAMILIES.items() if "packed_latents" in e.capabilities} == {"flux"}


@pytest.mark.parametrize("key", list(FAMILIES))
def test_each_entry_matches_its_tiny_pipeline(key):
    """The declared denoiser kind and capabilities hold for the family's real modules, and every family has a tiny
    pipeline for the shared method tests."""
    entry = FAMILIES[key]
    assert key in TINY_FAMILY_PIPELINES
    pipe = get_tiny_family_pipeline(key)
    assert type(pipe) is entry.aligned_class and issubclass(entry.aligned_class, entry.pipeline_class)
    assert family_entry(pipe) is entry and family_entry(entry.pipeline_class) is entry
    family = family_for(pipe)
    assert type(family) is entry.family and entry.capabilities <= CAPABILITIES
    denoiser = family.denoiser
    assert ("UNet" in type(denoiser).__name__) == (entry.denoiser_kind == "unet")
    joint = "joint_attention" in entry.capabilities
    assert (
        any("Joint" in type(p).__name__ or "Flux" in type(p).__name__ for p in denoiser.attn_processors.values())
        == joint
    )
    flow = "flow_matching" in entry.capabilities
    assert ("FlowMatch" in type(pipe.scheduler).__name__) == flow


@pytest.mark.parametrize("key", list(FAMILIES))
def test_align_and_loading_read_the_registry(key, tmp_path):
    entry = FAMILIES[key]
    aligned = get_tiny_family_pipeline(key)
    parent = entry.pipeline_class(**aligned.components)
    wrapped = ttalign.align(parent, [])
    assert (
        type(wrapped) is entry.aligned_class
        and wrapped.family.denoiser is parent.components[entry.family.denoiser_attribute]
    )
    assert ttalign.align(aligned, []) is aligned
    (tmp_path / "model_index.json").write_text(f'{{"_class_name": "{entry.pipeline_class.__name__}"}}')
    assert aligned_class_for(str(tmp_path)) is entry.aligned_class


def test_registering_refuses_unknown_capabilities_and_taken_keys():
    sd = FAMILIES["sd"]

    class Odd(sd.family):
        features = frozenset({"telepathy"})

    with pytest.raises(ValueError, match=r"unknown capabilities \['telepathy'\]"):
        register_family("odd", sd.aligned_class)(Odd)

    class Again(sd.family):
        pass

    with pytest.raises(ValueError, match="already registered as 'sd'"):
        register_family("sd", sd.aligned_class)(Again)
    assert FAMILIES["sd"] is sd and "odd" not in FAMILIES


def test_an_unsupported_pipeline_is_named():
    from diffusers import DDPMPipeline

    assert family_entry(DDPMPipeline) is None
    supported = "FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline"
    with pytest.raises(TypeError, match=f"ttalign.align does not support DDPMPipeline; supported: {supported}"):
        ttalign.align(DDPMPipeline(unet=None, scheduler=None), [])


def test_a_family_is_a_model_family():
    assert all(issubclass(e.family, ModelFamily) for e in FAMILIES.values())
    assert torch.nn.Module not in FAMILIES["sd"].family.__mro__


def test_methods_trainers_and_the_sampler_know_models_only_through_their_family():
    """No method, trainer, sampler, attention helper or server module names a denoiser, a pipeline class or a text
    encoder, and nothing decides on a class name."""
    package = ROOT / "ttalign"
    files = sorted(
        [
            *(package / "methods").glob("*.py"),
            *(package / "training").glob("*.py"),
            *(package / "serve").glob("*.py"),
            package / "sampling.py",
            package / "sampler.py",
            package / "attention.py",
        ]
    )
    model = re.compile(
        r"\.unet\b|encoder_hidden_states\s*=|StableDiffusion\w*Pipeline|pipe\.(text_encoder|vae|"
        r"tokenizer)\b|unet\.config"
    )
    by_name = re.compile(r"__name__\s*(==|!=|in\b|not in\b)|\.name\s*(==|in\b)\s*[\"'(]")
    offending = [
        f"{f.name}:{i}: {line.strip()}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if model.search(line) or by_name.search(line)
    ]
    assert len(files) > 15 and offending == []


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in (ROOT / "ttalign").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "pipelines").glob("*.py"):
        modules["ttalign.pipelines" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    return modules


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
    """The package modules `name` imports anywhere (function-level imports included)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_modules_import_each_other_in_a_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "ttalign.sampler" in graph["ttalign.methods.noise"]  # the walk sees the imports

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal:
                return [nxt]
            if nxt not in seen:
                seen.add(nxt)
                path = reaches(nxt, goal, seen)
                if path:
                    return [nxt, *path]
        return None

    cycles = []
    for name in sorted(graph):
        path = reaches(name, name, set())
        if path:
            cycles.append(" -> ".join([name, *path]))
    assert cycles == []


def test_methods_needing_stochastic_steps_are_refused_on_a_family_without_them():
    """What a method needs is read from the family's declared capabilities, before any compute."""
    from ttalign.methods import NoiseOptimization, ParticleSteering
    from ttalign.testing import Redness

    pipe = get_tiny_family_pipeline("sd")

    class Deterministic(FAMILIES["sd"].family):
        name = "Deterministic"
        features = frozenset({"cross_attention"})

    class Pipe(type(pipe)):
        @property
        def family(self):
            return Deterministic(self)

    limited = Pipe.from_pipe(pipe)
    kwargs = {"num_inference_steps": 2, "output_type": "pt", "eta": 1.0}
    for method in (ParticleSteering(reward=Redness()), NoiseOptimization(reward=Redness(), optimize="all-noises")):
        assert "stochastic_steps" in method.required_features
        with pytest.raises(ValueError, match=f"{method.name} cannot run on the Deterministic family"):
            limited("a cat", alignment=[method], **kwargs)
    assert NoiseOptimization(reward=Redness()).required_features == frozenset()
    assert limited("a cat", alignment=[NoiseOptimization(reward=Redness(), steps=1)], **kwargs).images.shape[0] == 1
