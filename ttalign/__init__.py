"""ttalign: inference-time alignment for diffusers pipelines."""

from __future__ import annotations

from ttalign.hooks import AlignmentMethod, GenerationState, Stage
from ttalign.pipelines import (
    FAMILIES,
    AlignedFluxPipeline,
    AlignedPipelineOutput,
    AlignedStableDiffusion3Pipeline,
    AlignedStableDiffusionPipeline,
    AlignedStableDiffusionXLPipeline,
    family_entry,
)

__version__ = "0.1.0"


def align(pipe, methods=None):
    """Wraps a diffusers pipeline (Stable Diffusion 1.x/2.x, XL, 3; FLUX) into its aligned subclass, sharing its
    modules (each in the dtype it has: no float32 cast, unlike diffusers' `from_pipe` without `torch_dtype`), with
    default `methods`.

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
    entry = family_entry(pipe)
    if entry is None:
        supported = ", ".join(sorted(e.pipeline_class.__name__ for e in FAMILIES.values()))
        raise TypeError(f"ttalign.align does not support {type(pipe).__name__}; supported: {supported}.")
    aligned = pipe if isinstance(pipe, entry.aligned_class) else entry.aligned_class.from_pipe(pipe)
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
