"""Drop-in aligned pipelines, one file per model family (packaged as `ttalign.pipelines`)."""

from .stable_diffusion import AlignedPipelineOutput, AlignedStableDiffusionPipeline

__all__ = ["AlignedPipelineOutput", "AlignedStableDiffusionPipeline"]
