"""Drop-in aligned pipelines and their model families, one file per family (packaged as `ttalign.pipelines`)."""

from .family import Conditioning, ModelFamily, TextStream, family_for
from .flux import AlignedFluxPipeline, FluxFamily
from .stable_diffusion import AlignedPipelineOutput, AlignedStableDiffusionPipeline, StableDiffusionFamily
from .stable_diffusion_3 import AlignedStableDiffusion3Pipeline, StableDiffusion3Family
from .stable_diffusion_xl import AlignedStableDiffusionXLPipeline, StableDiffusionXLFamily

#: diffusers pipeline class -> its aligned subclass (used by `ttalign.align` and the command line).
ALIGNED_PIPELINES = {
    StableDiffusionFamily.pipeline_class: AlignedStableDiffusionPipeline,
    StableDiffusionXLFamily.pipeline_class: AlignedStableDiffusionXLPipeline,
    StableDiffusion3Family.pipeline_class: AlignedStableDiffusion3Pipeline,
    FluxFamily.pipeline_class: AlignedFluxPipeline,
}


def aligned_class_for(model: str):
    """The aligned pipeline class of a diffusers folder or hub id, from the `_class_name` of its `model_index.json`
    (diffusers' class or an aligned one); an unsupported class raises `ValueError` naming it."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(model)
    name = config.get("_class_name")
    by_name = {base.__name__: aligned for base, aligned in ALIGNED_PIPELINES.items()}
    by_name.update({aligned.__name__: aligned for aligned in ALIGNED_PIPELINES.values()})
    if name not in by_name:
        raise ValueError(f"{model!r} holds a {name} (model_index.json); supported: {', '.join(sorted(by_name))}.")
    return by_name[name]


__all__ = [
    "ALIGNED_PIPELINES",
    "AlignedFluxPipeline",
    "AlignedPipelineOutput",
    "AlignedStableDiffusion3Pipeline",
    "AlignedStableDiffusionPipeline",
    "AlignedStableDiffusionXLPipeline",
    "Conditioning",
    "FluxFamily",
    "ModelFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "TextStream",
    "aligned_class_for",
    "family_for",
]
