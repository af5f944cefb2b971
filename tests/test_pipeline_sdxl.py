"""The aligned SDXL pipeline without methods is diffusers' `StableDiffusionXLPipeline`: same images, same arguments,
same modules; `ttalign.align` and the command line recognise it."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import ttalign
from ttalign import AlignedPipelineOutput, AlignedStableDiffusionXLPipeline
from ttalign.methods import BestOfN
from ttalign.testing import get_tiny_scheduler, get_tiny_sdxl_components


@pytest.fixture(scope="module")
def sdxl_components():
    return get_tiny_sdxl_components("euler")


@pytest.fixture
def sdxl_pipes(sdxl_components):
    """diffusers' `StableDiffusionXLPipeline` and the aligned one on the very same modules."""
    reference = StableDiffusionXLPipeline(**sdxl_components, add_watermarker=False)
    aligned = AlignedStableDiffusionXLPipeline.from_pipe(reference)
    for pipe in (reference, aligned):
        pipe.set_progress_bar_config(disable=True)
    return reference, aligned


def _run(pipe, **kwargs):
    kwargs.setdefault("prompt", "a red circle left of a blue square")
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs)


def _diff(a, b):
    if isinstance(a, list):  # PIL images
        a = np.stack([np.asarray(x, dtype=np.float32) for x in a])
        b = np.stack([np.asarray(x, dtype=np.float32) for x in b])
    if isinstance(a, torch.Tensor):
        return (a - b).abs().max().item()
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_parity_with_diffusers(sdxl_pipes, guidance_scale, output_type):
    reference, aligned = sdxl_pipes
    expected = _run(reference, guidance_scale=guidance_scale, output_type=output_type).images
    out = _run(aligned, guidance_scale=guidance_scale, output_type=output_type)
    assert isinstance(out, AlignedPipelineOutput) and out.nsfw_content_detected is None
    assert type(out.images) is type(expected)
    assert _diff(out.images, expected) <= 1e-6
    if output_type == "np":
        assert np.abs(expected).max() > 0 and out.images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(
            prompt=["a red circle", "two blue squares"],
            num_images_per_prompt=2,
            negative_prompt=["a cat", ""],
            negative_prompt_2=["a dog", "a tree"],
            prompt_2=["a big red circle", "blue squares"],
        ),
        dict(num_inference_steps=4, denoising_end=0.5),
        dict(
            prompt=["a cat", "a dog"],
            num_images_per_prompt=2,
            original_size=(96, 80),
            crops_coords_top_left=(4, 8),
            target_size=(64, 64),
            negative_original_size=(32, 32),
            negative_crops_coords_top_left=(2, 2),
            negative_target_size=(48, 48),
        ),
        dict(guidance_rescale=0.7, clip_skip=1, num_inference_steps=3),
        dict(height=48, width=80),
    ],
    ids=["batches-and-second-prompts", "denoising-end", "size-conditioning", "rescale-clip-skip", "non-square"],
)
def test_parity_with_diffusers_arguments(sdxl_pipes, kwargs):
    reference, aligned = sdxl_pipes
    expected = _run(reference, **kwargs).images
    out = _run(aligned, **kwargs).images
    assert out.shape == expected.shape
    assert _diff(out, expected) <= 1e-6


def test_parity_with_callback_latents_and_embeds(sdxl_pipes):
    reference, aligned = sdxl_pipes
    seen = {"reference": [], "aligned": []}

    def make_callback(key):
        def callback(pipe, i, t, kwargs):
            seen[key].append({k: v.clone() for k, v in kwargs.items()})
            return {"latents": kwargs["latents"] * 0.99, "add_text_embeds": kwargs["add_text_embeds"] * 1.01}

        return callback

    inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    expected = _run(
        reference, callback_on_step_end=make_callback("reference"), callback_on_step_end_tensor_inputs=inputs
    ).images
    out = _run(aligned, callback_on_step_end=make_callback("aligned"), callback_on_step_end_tensor_inputs=inputs)
    assert _diff(out.images, expected) <= 1e-6
    assert len(seen["aligned"]) == 2
    for ours, theirs in zip(seen["aligned"], seen["reference"]):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    embeds, negative, pooled, negative_pooled = reference.encode_prompt("a cat", device="cpu")
    kwargs = dict(
        prompt=None,
        latents=latents,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
    )
    assert _diff(_run(aligned, **kwargs).images, _run(reference, **kwargs).images) <= 1e-6


def _load_tiny_ip_adapter(unet):
    """Random IP-Adapter weights in diffusers' layout (image projection + per-layer image key/value projections)."""
    from diffusers.models.embeddings import ImageProjection

    torch.manual_seed(0)
    dim = unet.config.cross_attention_dim
    adapter, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")[0]
        if block == "mid_block":
            hidden = unet.config.block_out_channels[-1]
        elif block == "up_blocks":
            hidden = list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])]
        else:
            hidden = unet.config.block_out_channels[int(name.split(".")[1])]
        adapter[f"{key}.to_k_ip.weight"] = torch.randn(hidden, dim) * 0.1
        adapter[f"{key}.to_v_ip.weight"] = torch.randn(hidden, dim) * 0.1
        key += 2
    projection = ImageProjection(cross_attention_dim=dim, image_embed_dim=dim, num_image_text_embeds=4).state_dict()
    image_proj = {
        "proj.weight": projection["image_embeds.weight"],
        "proj.bias": projection["image_embeds.bias"],
        "norm.weight": projection["norm.weight"],
        "norm.bias": projection["norm.bias"],
    }
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": adapter}])


def test_parity_with_ip_adapter_embeds():
    components = get_tiny_sdxl_components("euler")
    _load_tiny_ip_adapter(components["unet"])
    reference = StableDiffusionXLPipeline(**components, add_watermarker=False)
    aligned = AlignedStableDiffusionXLPipeline.from_pipe(reference)
    for pipe in (reference, aligned):
        pipe.set_progress_bar_config(disable=True)
    image_embeds = [torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(5))]  # [negative; positive]
    expected = _run(reference, ip_adapter_image_embeds=image_embeds).images
    out = _run(aligned, ip_adapter_image_embeds=image_embeds)
    assert _diff(out.images, expected) <= 1e-6
    plain = _run(reference, ip_adapter_image_embeds=[torch.zeros(2, 1, 64)]).images
    assert _diff(plain, expected) > 1e-4  # the adapter takes part


@pytest.mark.parametrize("scheduler,steps,guidance", [("lcm", 2, 5.0), ("euler_a", 1, 0.0), ("ddim", 3, 5.0)])
def test_parity_with_turbo_and_lcm_schedules(scheduler, steps, guidance):
    """One- to few-step schedules as SDXL-Turbo (Euler ancestral, no guidance) and LCM (a UNet distilled with a
    guidance embedding) use them."""
    components = get_tiny_sdxl_components(scheduler, time_cond_proj_dim=256 if scheduler == "lcm" else None)
    reference = StableDiffusionXLPipeline(**components, add_watermarker=False)
    aligned = AlignedStableDiffusionXLPipeline.from_pipe(reference)
    for pipe in (reference, aligned):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, eta=1.0)
    assert _diff(_run(aligned, **kwargs).images, _run(reference, **kwargs).images) <= 1e-6


def test_return_dict_false_and_unknown_arguments(sdxl_pipes):
    reference, aligned = sdxl_pipes
    (images,) = _run(aligned, return_dict=False)
    assert _diff(images, _run(reference).images) <= 1e-6
    with pytest.raises(TypeError, match="guidance_scal"):
        aligned("a cat", guidance_scal=3.0)


def test_from_pipe_from_pretrained_and_components(sdxl_components, sdxl_pipes, tmp_path):
    reference, aligned = sdxl_pipes
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert getattr(aligned, name) is getattr(reference, name)
    reference.save_pretrained(tmp_path)
    loaded = AlignedStableDiffusionXLPipeline.from_pretrained(tmp_path)
    loaded_parent = StableDiffusionXLPipeline.from_pretrained(tmp_path, add_watermarker=False)
    for pipe in (loaded, loaded_parent):
        pipe.set_progress_bar_config(disable=True)
    assert isinstance(loaded, AlignedStableDiffusionXLPipeline)
    assert _diff(_run(loaded).images, _run(loaded_parent).images) <= 1e-6
    built = AlignedStableDiffusionXLPipeline(**sdxl_components, add_watermarker=False)
    built.set_progress_bar_config(disable=True)
    assert _diff(_run(built).images, _run(reference).images) <= 1e-6


def test_align_wraps_sdxl_and_sets_default_methods(sdxl_pipes):
    reference, _ = sdxl_pipes

    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    aligned = ttalign.align(reference, [BestOfN(reward=brightness, n=2)])
    assert isinstance(aligned, AlignedStableDiffusionXLPipeline) and aligned.unet is reference.unet
    aligned.set_progress_bar_config(disable=True)
    assert _run(aligned).traces["best_of_n"]["scores"].shape == (1, 2)
    assert _diff(_run(aligned, alignment=[]).images, _run(reference).images) <= 1e-6
    assert aligned.family.name == "Stable Diffusion XL"


def test_family_for_names_the_supported_pipelines():
    from ttalign.pipelines import family_for

    with pytest.raises(TypeError, match="no model family for int; supported pipelines: ") as error:
        family_for(3)
    for name in ["StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"]:
        assert name in str(error.value)


def test_cli_loads_an_sdxl_folder(sdxl_components, tmp_path):
    from PIL import Image

    from ttalign.cli import main
    from ttalign.loading import ModelLoadError, load_pipeline

    folder = tmp_path / "sdxl"
    components = dict(sdxl_components, scheduler=get_tiny_scheduler("ddim"))
    StableDiffusionXLPipeline(**components, add_watermarker=False).save_pretrained(folder)
    assert isinstance(load_pipeline(str(folder)), AlignedStableDiffusionXLPipeline)
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
            "--align",
            "best_of_n:n=2,reward=jpeg_incompressibility",
        ]
    )
    assert code == 0 and Image.open(out).size == (64, 64)
    other = tmp_path / "pixart"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    with pytest.raises(ModelLoadError, match="holds a PixArtAlphaPipeline .*supported: AlignedFluxPipeline"):
        load_pipeline(str(other))
