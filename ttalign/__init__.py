"""ttalign: inference-time alignment for diffusers pipelines."""

from __future__ import annotations

from ttalign.hooks import AlignmentMethod, GenerationState, Stage
from ttalign.pipelines import (
    ALIGNED_PIPELINES,
    AlignedFluxPipeline,
    AlignedPipelineOutput,
    AlignedStableDiffusion3Pipeline,
    AlignedStableDiffusionPipeline,
    AlignedStableDiffusionXLPipeline,
)

__version__ = "0.1.0"


def _aligned_classes() -> dict:
    return dict(ALIGNED_PIPELINES)


def align(pipe, methods=None):
    """Wraps a diffusers pipeline (Stable Diffusion 1.x/2.x, XL, 3; FLUX) into its aligned subclass, sharing its
    modules, with default `methods`.

    The returned pipeline applies `methods` on every call that passes no `alignment` of its own. An aligned
    pipeline is returned as is (with its default methods replaced).

    Example:

    ```py
    >>> from diffusers import StableDiffusionPipeline
    >>> import ttalign
    >>> from ttalign.methods import BestOfN
    >>> pipe = ttalign.align(StableDiffusionPipeline.from_pretrained(...), [BestOfN(reward=my_reward, n=4)])
    >>> images = pipe("a cat and a dog").images
    ```
    """
    from ttalign.hooks import AlignmentRunner

    runner = AlignmentRunner(methods)  # refuses bad combinations now rather than at the first call
    aligned_types = tuple(_aligned_classes().values())
    if isinstance(pipe, aligned_types):
        aligned = pipe
    else:
        for base, aligned_cls in _aligned_classes().items():
            if type(pipe) is base:
                aligned = aligned_cls.from_pipe(pipe)
                break
        else:
            supported = ", ".join(base.__name__ for base in _aligned_classes())
            raise TypeError(f"ttalign.align does not support {type(pipe).__name__}; supported: {supported}.")
    aligned.alignment = runner.methods
    return aligned


__all__ = [
    "AlignedFluxPipeline",
    "AlignedPipelineOutput",
    "AlignedStableDiffusion3Pipeline",
    "AlignedStableDiffusionPipeline",
    "AlignedStableDiffusionXLPipeline",
    "AlignmentMethod",
    "GenerationState",
    "Stage",
    "align",
]
