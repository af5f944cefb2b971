"""The aligned Stable Diffusion 3 and FLUX pipelines without methods are diffusers' `StableDiffusion3Pipeline` and
`FluxPipeline`: same images, same arguments, same modules; `ttalign.align` and the command line recognise them."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

import ttalign
from ttalign import AlignedFluxPipeline, AlignedPipelineOutput, AlignedStableDiffusion3Pipeline
from ttalign.methods import BestOfN
from ttalign.testing import get_tiny_flux_components, get_tiny_sd3_components

FAMILIES = {
    "sd3": (StableDiffusion3Pipeline, AlignedStableDiffusion3Pipeline, get_tiny_sd3_components),
    "flux": (FluxPipeline, AlignedFluxPipeline, get_tiny_flux_components),
}


def _pipes(family, **component_kwargs):
    """diffusers' pipeline and the aligned one on the very same modules."""
    parent, aligned_class, components = FAMILIES[family]
    reference = parent(**components(**component_kwargs))
    aligned = aligned_class.from_pipe(reference)
    for pipe in (reference, aligned):
        pipe.set_progress_bar_config(disable=True)
    return reference, aligned


@pytest.fixture(scope="module")
def sd3_pipes():
    return _pipes("sd3")


@pytest.fixture(scope="module")
def flux_pipes():
    return _pipes("flux", guidance_embeds=True)


def _run(pipe, **kwargs):
    kwargs.setdefault("prompt", "a red circle left of a blue square")
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs)


def _diff(a, b):
    if isinstance(a, list):  # PIL images
        a = np.stack([np.asarray(x, dtype=np.float32) for x in a])
        b = np.stack([np.asarray(x, dtype=np.float32) for x in b])
    if isinstance(a, torch.Tensor):
        return (a - b).abs().max().item()
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


def _check_parity(reference, aligned, **kwargs):
    expected = _run(reference, **kwargs).images
    out = _run(aligned, **kwargs)
    assert isinstance(out, AlignedPipelineOutput) and out.nsfw_content_detected is None
    assert type(out.images) is type(expected) and len(out.images) == len(expected)
    assert _diff(out.images, expected) <= 1e-6
    return out.images


# --- Stable Diffusion 3 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_sd3_parity_with_diffusers(sd3_pipes, guidance_scale, output_type):
    images = _check_parity(*sd3_pipes, guidance_scale=guidance_scale, output_type=output_type)
    if output_type == "np":
        assert np.abs(images).max() > 0 and images.shape == (1, 32, 32, 3)
    if output_type == "latent":
        assert images.shape == (1, 4, 32, 32)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(
            prompt=["a red circle", "two blue squares"],
            num_images_per_prompt=2,
            negative_prompt=["a cat", ""],
            prompt_2=["a big red circle", "blue squares"],
            prompt_3=["red", "blue"],
            negative_prompt_3=["a dog", "a tree"],
        ),
        dict(
            skip_guidance_layers=[0],
            skip_layer_guidance_scale=2.8,
            skip_layer_guidance_start=0.0,
            num_inference_steps=3,
        ),
        dict(max_sequence_length=16, clip_skip=1),
        dict(sigmas=[1.0, 0.6, 0.3]),
        dict(height=24, width=40),
    ],
    ids=["batches-and-three-prompts", "skip-layer-guidance", "max-sequence-length", "sigmas", "non-square"],
)
def test_sd3_parity_with_diffusers_arguments(sd3_pipes, kwargs):
    _check_parity(*sd3_pipes, **kwargs)


def test_sd3_parity_with_dynamic_shift_mu():
    components = get_tiny_sd3_components()
    components["scheduler"] = components["scheduler"].__class__(use_dynamic_shifting=True)
    reference = StableDiffusion3Pipeline(**components)
    aligned = AlignedStableDiffusion3Pipeline.from_pipe(reference)
    for pipe in (reference, aligned):
        pipe.set_progress_bar_config(disable=True)
    images = _check_parity(reference, aligned, mu=0.8, num_inference_steps=3)
    assert _diff(images, _run(reference, mu=0.1, num_inference_steps=3).images) > 1e-4  # mu takes part


def test_sd3_parity_with_callback_and_embeds(sd3_pipes):
    reference, aligned = sd3_pipes
    seen = {"reference": [], "aligned": []}

    def make_callback(key):
        def callback(pipe, i, t, kwargs):
            seen[key].append({k: v.clone() for k, v in kwargs.items()})
            return {"latents": kwargs["latents"] * 0.99}

        return callback

    inputs = ["latents", "prompt_embeds", "pooled_prompt_embeds"]
    expected = _run(
        reference, callback_on_step_end=make_callback("reference"), callback_on_step_end_tensor_inputs=inputs
    ).images
    out = _run(aligned, callback_on_step_end=make_callback("aligned"), callback_on_step_end_tensor_inputs=inputs)
    assert _diff(out.images, expected) <= 1e-6
    assert len(seen["aligned"]) == 2
    for ours, theirs in zip(seen["aligned"], seen["reference"]):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    embeds, negative, pooled, negative_pooled = reference.encode_prompt("a cat", None, None, device="cpu")
    _check_parity(
        reference,
        aligned,
        prompt=None,
        latents=latents,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
    )


# --- FLUX ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_flux_dev_parity_with_diffusers(flux_pipes, output_type):
    """FLUX.1-dev style: the guidance scale is an input of the transformer, one pass per step."""
    images = _check_parity(*flux_pipes, guidance_scale=3.5, output_type=output_type)
    if output_type == "latent":
        assert images.shape == (1, 16 * 16, 4)  # packed 2x2 patches
    assert _diff(images, _run(flux_pipes[0], guidance_scale=7.0, output_type=output_type).images) > 1e-5


@pytest.mark.parametrize("steps", [1, 4])
def test_flux_schnell_parity_with_diffusers(steps):
    """FLUX.1-schnell style: no guidance embedding, one to four steps."""
    reference, aligned = _pipes("flux", guidance_embeds=False)
    _check_parity(reference, aligned, num_inference_steps=steps, guidance_scale=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(negative_prompt="a blurry cat", true_cfg_scale=4.0),
        dict(
            prompt=["a red circle", "two blue squares"],
            num_images_per_prompt=2,
            prompt_2=["red", "blue"],
            negative_prompt=["a cat", "a dog"],
            negative_prompt_2=["x", "y"],
            true_cfg_scale=2.0,
        ),
        dict(prompt=["a red circle", "two blue squares"], num_images_per_prompt=2, max_sequence_length=16),
        dict(sigmas=[1.0, 0.6, 0.3]),
        dict(height=32, width=48),
    ],
    ids=["true-cfg", "true-cfg-batches", "batches-max-sequence-length", "sigmas", "non-square"],
)
def test_flux_parity_with_diffusers_arguments(flux_pipes, kwargs):
    _check_parity(*flux_pipes, **kwargs)


def test_flux_parity_with_callback_and_embeds(flux_pipes):
    reference, aligned = flux_pipes
    seen = {"reference": [], "aligned": []}

    def make_callback(key):
        def callback(pipe, i, t, kwargs):
            seen[key].append({k: v.clone() for k, v in kwargs.items()})
            return {"latents": kwargs["latents"] * 0.99}

        return callback

    inputs = ["latents", "prompt_embeds"]
    expected = _run(
        reference, callback_on_step_end=make_callback("reference"), callback_on_step_end_tensor_inputs=inputs
    ).images
    out = _run(aligned, callback_on_step_end=make_callback("aligned"), callback_on_step_end_tensor_inputs=inputs)
    assert _diff(out.images, expected) <= 1e-6 and len(seen["aligned"]) == 2
    for ours, theirs in zip(seen["aligned"], seen["reference"]):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    embeds, pooled, _ = reference.encode_prompt("a cat", None, device="cpu")
    latents = torch.randn(1, 256, 4, generator=torch.Generator().manual_seed(3))
    _check_parity(reference, aligned, prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents)


# --- both ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_return_dict_false_and_unknown_arguments(family, sd3_pipes, flux_pipes):
    reference, aligned = sd3_pipes if family == "sd3" else flux_pipes
    (images,) = _run(aligned, return_dict=False)
    assert _diff(images, _run(reference).images) <= 1e-6
    with pytest.raises(TypeError, match="guidance_scal"):
        aligned("a cat", guidance_scal=3.0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_from_pipe_from_pretrained_and_components(family, tmp_path):
    parent, aligned_class, components = FAMILIES[family]
    reference, aligned = _pipes(family)
    names = ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
    for name in names + (["text_encoder_3", "tokenizer_3"] if family == "sd3" else []):
        assert getattr(aligned, name) is getattr(reference, name)
    reference.save_pretrained(tmp_path)
    loaded = aligned_class.from_pretrained(tmp_path)
    loaded_parent = parent.from_pretrained(tmp_path)
    for pipe in (loaded, loaded_parent):
        pipe.set_progress_bar_config(disable=True)
    assert isinstance(loaded, aligned_class)
    assert _diff(_run(loaded).images, _run(loaded_parent).images) <= 1e-6
    assert _diff(_run(loaded).images, _run(reference).images) <= 1e-6  # the locally built tokenizers round-trip
    built = aligned_class(**components())
    built.set_progress_bar_config(disable=True)
    assert _diff(_run(built).images, _run(reference).images) <= 1e-6


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_align_wraps_and_sets_default_methods(family):
    reference, _ = _pipes(family)
    parent, aligned_class, _ = FAMILIES[family]

    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    aligned = ttalign.align(reference, [BestOfN(reward=brightness, n=2)])
    assert isinstance(aligned, aligned_class) and aligned.transformer is reference.transformer
    aligned.set_progress_bar_config(disable=True)
    assert _run(aligned).traces["best_of_n"]["scores"].shape == (1, 2)
    assert _diff(_run(aligned, alignment=[]).images, _run(reference).images) <= 1e-6
    assert aligned.family.name == {"sd3": "Stable Diffusion 3", "flux": "FLUX"}[family]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_loads_a_flow_folder(family, tmp_path):
    from PIL import Image

    from ttalign.cli import main
    from ttalign.loading import load_pipeline

    reference, _ = _pipes(family)
    folder = tmp_path / family
    reference.save_pretrained(folder)
    assert isinstance(load_pipeline(str(folder)), FAMILIES[family][1])
    out = tmp_path / "x.png"
    code = main(
        [
            "generate",
            "a red circle",
            "--model",
            str(folder),
            "--steps",
            "2",
            "--seed",
            "0",
            "--out",
            str(out),
            "--height",
            "32",
            "--width",
            "32",
            "--align",
            "best_of_n:n=2,reward=jpeg_incompressibility",
        ]
    )
    assert code == 0 and Image.open(out).size == (32, 32)


def test_size_multiples_of_the_real_layouts():
    """SD3 and FLUX need multiples of 16 (an 8x VAE, then 2x2 patches); the command line says so before any compute."""
    from ttalign.cli import _check_size

    sd3 = AlignedStableDiffusion3Pipeline(**get_tiny_sd3_components(layout="sd3"))
    flux = AlignedFluxPipeline(**get_tiny_flux_components(layout="flux"))
    assert sd3.family.size_multiple == 16 and flux.family.size_multiple == 16
    assert _check_size(flux, {"height": 512, "width": 768}) is flux
    with pytest.raises(ValueError, match="--width must be a multiple of 16 for AlignedStableDiffusion3P.*, got 520"):
        _check_size(sd3, {"height": 512, "width": 520})
