"""Drop-in aligned pipelines and their model families, one file per family (packaged as `ttalign.pipelines`)."""

from .family import FAMILIES, Conditioning, FamilyEntry, ModelFamily, TextStream, family_entry, family_for
from .flux import AlignedFluxPipeline, FluxFamily
from .stable_diffusion import AlignedPipelineOutput, AlignedStableDiffusionPipeline, StableDiffusionFamily
from .stable_diffusion_3 import AlignedStableDiffusion3Pipeline, StableDiffusion3Family
from .stable_diffusion_xl import AlignedStableDiffusionXLPipeline, StableDiffusionXLFamily


def aligned_class_for(model: str):
    """The aligned pipeline class of a diffusers folder or hub id, from the `_class_name` of its `model_index.json`
    (diffusers' class or an aligned one); an unsupported class raises `ValueError` naming it."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(model)
    name = config.get("_class_name")
    by_name = {entry.pipeline_class.__name__: entry.aligned_class for entry in FAMILIES.values()}
    by_name.update({entry.aligned_class.__name__: entry.aligned_class for entry in FAMILIES.values()})
    if name not in by_name:
        raise ValueError(f"{model!r} holds a {name} (model_index.json); supported: {', '.join(sorted(by_name))}.")
    return by_name[name]


__all__ = [
    "FAMILIES",
    "AlignedFluxPipeline",
    "AlignedPipelineOutput",
    "AlignedStableDiffusion3Pipeline",
    "AlignedStableDiffusionPipeline",
    "AlignedStableDiffusionXLPipeline",
    "Conditioning",
    "FamilyEntry",
    "FluxFamily",
    "ModelFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "TextStream",
    "aligned_class_for",
    "family_entry",
    "family_for",
]
