"""Loading an aligned pipeline by name: a diffusers folder or hub id, an embedded shapes-world model, or tiny random
components. The command line, the server and its Ray replicas load through here."""

from __future__ import annotations

#: Names `load_pipeline` takes besides folders and hub ids.
TINY_MODEL = "tiny"
SHAPES_MODEL = "shapes"
SHAPES_FLOW_MODEL = "shapes-flow"


class ModelLoadError(ValueError):
    """A model that could not be loaded (the message names it and the first line of the cause)."""


def load_pipeline(model: str, dtype: str = "float32", device: str | None = None):
    """Loads the aligned pipeline of a diffusers folder or hub id (the class named in its `model_index.json`: Stable
    Diffusion 1.x/2.x, XL or 3, FLUX), `"shapes"` / `"shapes-flow"` (the embedded shapes-world models, with their
    sampling defaults) or `"tiny"` (tiny random components), on `device` (CUDA when there is one). Raises
    :class:`ModelLoadError`."""
    import torch

    from ttalign.pipelines import AlignedStableDiffusionPipeline, aligned_class_for

    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ModelLoadError(f"Unknown dtype {dtype!r}; expected e.g. 'float32', 'float16' or 'bfloat16'.")
    if model in (SHAPES_MODEL, SHAPES_FLOW_MODEL):
        from ttalign.shapes import FLOW_MODEL_DIR, MODEL_DIR

        model = FLOW_MODEL_DIR if model == SHAPES_FLOW_MODEL else MODEL_DIR
    if model == TINY_MODEL:
        from ttalign.testing import get_tiny_components

        pipe = AlignedStableDiffusionPipeline(**get_tiny_components())
    else:
        try:
            pipe = aligned_class_for(model).from_pretrained(model, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load model {model!r}: {str(err).splitlines()[0]}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)
