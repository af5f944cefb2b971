"""Drop-in aligned pipelines and their model families, one file per family (packaged as `ttalign.pipelines`)."""

from .family import Conditioning, ModelFamily, TextStream, family_for
from .stable_diffusion import AlignedPipelineOutput, AlignedStableDiffusionPipeline, StableDiffusionFamily
from .stable_diffusion_xl import AlignedStableDiffusionXLPipeline, StableDiffusionXLFamily

#: diffusers pipeline class -> its aligned subclass (used by `ttalign.align` and the command line).
ALIGNED_PIPELINES = {
    StableDiffusionFamily.pipeline_class: AlignedStableDiffusionPipeline,
    StableDiffusionXLFamily.pipeline_class: AlignedStableDiffusionXLPipeline,
}

__all__ = [
    "ALIGNED_PIPELINES",
    "AlignedPipelineOutput",
    "AlignedStableDiffusionPipeline",
    "AlignedStableDiffusionXLPipeline",
    "Conditioning",
    "ModelFamily",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "TextStream",
    "family_for",
]
