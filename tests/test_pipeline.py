"""The aligned pipeline without methods is diffusers' pipeline: same images, same arguments, same modules."""

import numpy as np
import pytest
import torch
from diffusers import (
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TorchAoConfig,
    UNet2DConditionModel,
)

from ttalign import AlignedPipelineOutput, AlignedStableDiffusionPipeline, align
from ttalign.methods import BestOfN
from ttalign.testing import (
    get_tiny_components,
    get_tiny_flux_components,
    get_tiny_scheduler,
    get_tiny_sd3_components,
    get_tiny_sdxl_components,
)


def _run(pipe, **kwargs):
    kwargs.setdefault("prompt", "a red circle left of a blue square")
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "np")
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs)


def _max_diff(a, b):
    if isinstance(a, list):  # PIL images
        a, b = (
            np.stack([np.asarray(x, dtype=np.float32) for x in a]),
            np.stack([np.asarray(x, dtype=np.float32) for x in b]),
        )
    if isinstance(a, torch.Tensor):
        return (a - b).abs().max().item()
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_parity_with_diffusers(pipes, guidance_scale, output_type):
    reference, aligned = pipes
    expected = _run(reference, guidance_scale=guidance_scale, output_type=output_type).images
    out = _run(aligned, guidance_scale=guidance_scale, output_type=output_type)
    assert isinstance(out, AlignedPipelineOutput)
    assert type(out.images) is type(expected)
    assert _max_diff(out.images, expected) <= 1e-6
    assert out.rewards is None


def test_parity_multiple_images_and_prompts(pipes):
    reference, aligned = pipes
    kwargs = dict(
        prompt=["a red circle", "two blue squares"], num_images_per_prompt=2, negative_prompt=["a triangle", ""]
    )
    expected = _run(reference, **kwargs).images
    out = _run(aligned, **kwargs).images
    assert out.shape == (4, 64, 64, 3)
    assert _max_diff(out, expected) <= 1e-6


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "pndm"])
def test_parity_other_schedulers(tiny_components, scheduler):
    components = dict(tiny_components, scheduler=get_tiny_scheduler(scheduler))
    reference = StableDiffusionPipeline(**components)
    aligned = AlignedStableDiffusionPipeline(**dict(components, scheduler=get_tiny_scheduler(scheduler)))
    for pipe in (reference, aligned):
        pipe.set_progress_bar_config(disable=True)
    assert _max_diff(_run(aligned).images, _run(reference).images) <= 1e-6


def test_parity_with_user_callback_and_guidance_rescale(pipes):
    reference, aligned = pipes
    seen = {"reference": [], "aligned": []}

    def make_callback(key):
        def callback(pipe, i, t, kwargs):
            seen[key].append((i, int(t), kwargs["latents"].clone()))
            return {"latents": kwargs["latents"] * 0.99}  # the callback may change the latents

        return callback

    expected = _run(reference, callback_on_step_end=make_callback("reference"), guidance_rescale=0.5).images
    out = _run(aligned, callback_on_step_end=make_callback("aligned"), guidance_rescale=0.5).images
    assert _max_diff(out, expected) <= 1e-6
    assert len(seen["aligned"]) == 3
    for (i, t, lat), (j, s, ref) in zip(seen["aligned"], seen["reference"]):
        assert (i, t) == (j, s) and torch.equal(lat, ref)


def test_parity_with_user_latents_and_prompt_embeds(pipes):
    reference, aligned = pipes
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(4))
    kwargs = dict(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), latents=latents)
    assert _max_diff(_run(aligned, **kwargs).images, _run(reference, **kwargs).images) <= 1e-6


def test_return_dict_false_returns_parent_tuple(pipes):
    reference, aligned = pipes
    images, nsfw = _run(aligned, return_dict=False)
    assert nsfw is None
    assert _max_diff(images, _run(reference).images) <= 1e-6


def test_unknown_keyword_argument_raises(pipes):
    _, aligned = pipes
    with pytest.raises(TypeError, match="guidance_scal"):
        aligned("a cat", guidance_scal=3.0)


def test_from_pipe_shares_modules(pipes):
    reference, aligned = pipes
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(aligned, name) is getattr(reference, name)


PARENTS = {
    "sd": (StableDiffusionPipeline, get_tiny_components),
    "sdxl": (StableDiffusionXLPipeline, get_tiny_sdxl_components),
    "sd3": (StableDiffusion3Pipeline, get_tiny_sd3_components),
    "flux": (FluxPipeline, get_tiny_flux_components),
}


@pytest.mark.parametrize("family", PARENTS)
def test_align_keeps_each_components_dtype(family):
    """diffusers' `from_pipe` casts the shared components to float32 unless a dtype is given (diffusers#12754):
    `align` leaves a bfloat16 pipeline with a float32 VAE, the caller's own, as it was; `dtype` still casts."""
    parent, components = PARENTS[family]
    pipe = parent(**components()).to(dtype=torch.bfloat16)
    pipe.vae.to(torch.float32)
    modules = [name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)]
    expected = {name: torch.float32 if name == "vae" else torch.bfloat16 for name in modules}
    aligned = align(pipe)
    assert {name: getattr(aligned, name).dtype for name in modules} == expected
    assert {name: getattr(pipe, name).dtype for name in modules} == expected
    cast = type(aligned).from_pipe(pipe, dtype=torch.float32)
    assert {getattr(cast, name).dtype for name in modules} == {torch.float32}


def test_align_wraps_a_pipeline_with_a_quantized_denoiser(tmp_path):
    """A torchao-quantized UNet refuses any cast (diffusers' `from_pipe` casts); `align` wraps its pipeline as it
    is, and renders diffusers' images."""
    from torchao.quantization import Int8WeightOnlyConfig

    pipe = StableDiffusionPipeline(**get_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.save_pretrained(tmp_path)
    quantized = UNet2DConditionModel.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.float32
    )
    pipe.register_modules(unet=quantized)
    aligned = align(pipe)
    assert aligned.unet is quantized
    assert _max_diff(_run(aligned).images, _run(pipe).images) <= 1e-6


def test_from_pretrained_round_trip(tmp_path):
    pipe = AlignedStableDiffusionPipeline(**get_tiny_components())
    pipe.save_pretrained(tmp_path)
    loaded = AlignedStableDiffusionPipeline.from_pretrained(tmp_path)
    loaded_parent = StableDiffusionPipeline.from_pretrained(tmp_path)
    for p in (loaded, loaded_parent):
        p.set_progress_bar_config(disable=True)
    assert isinstance(loaded, AlignedStableDiffusionPipeline)
    assert _max_diff(_run(loaded).images, _run(loaded_parent).images) <= 1e-6


def test_compute_trace(pipes):
    _, aligned = pipes
    out = _run(aligned, prompt=["a cat", "a dog"], num_images_per_prompt=2)
    compute = out.traces["compute"]
    assert compute["denoiser_calls"] == 3
    assert compute["nfe"] == 3 * 4
    assert compute["vae_decodes"] == 4
    assert compute["wall_time_s"] > 0 and compute["peak_memory_mb"] > 0


def test_align_wraps_and_sets_default_methods(pipes):
    reference, _ = pipes

    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    aligned = align(reference, [BestOfN(reward=brightness, n=3)])
    assert isinstance(aligned, AlignedStableDiffusionPipeline)
    assert aligned.unet is reference.unet
    aligned.set_progress_bar_config(disable=True)
    out = _run(aligned)
    assert out.traces["best_of_n"]["scores"].shape == (1, 3)
    # an explicit empty list switches the defaults off: diffusers' images again
    plain = _run(aligned, alignment=[])
    assert _max_diff(plain.images, _run(reference).images) <= 1e-6


def test_align_refuses_unsupported_pipeline():
    with pytest.raises(TypeError, match="does not support int"):
        align(3, [])
