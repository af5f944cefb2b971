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
    "family_for",
]
