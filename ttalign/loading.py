"""Loading an aligned pipeline by name: a diffusers folder or hub id, an embedded shapes-world model, or tiny random
components. The command line, the server and its Ray replicas load through here."""

from __future__ import annotations

#: Names `load_pipeline` takes besides folders and hub ids.
TINY_MODEL = "tiny"
SHAPES_MODEL = "shapes"
SHAPES_FLOW_MODEL = "shapes-flow"
#: The embedded shapes-world models by name, as `ttalign.shapes.load_pipeline` knows them (`-tuned`: with the shipped
#: tuned LoRA fused in).
SHAPES_MODELS = {
    SHAPES_MODEL: "sd",
    SHAPES_FLOW_MODEL: "flow",
    f"{SHAPES_MODEL}-tuned": "sd-tuned",
    f"{SHAPES_FLOW_MODEL}-tuned": "flow-tuned",
}


class ModelLoadError(ValueError):
    """A model that could not be loaded (the message names it and the first line of the cause)."""


def load_pipeline(model: str, dtype: str = "float32", device: str | None = None):
    """Loads the aligned pipeline of a diffusers folder or hub id (the class named in its `model_index.json`: Stable
    Diffusion 1.x/2.x, XL or 3, FLUX), `"shapes"` / `"shapes-flow"` (the embedded shapes-world models, with their
    sampling defaults; `"shapes-tuned"` / `"shapes-flow-tuned"` with their tuned LoRA fused in) or `"tiny"` (tiny
    random components), on `device` (CUDA when there is one). Raises :class:`ModelLoadError`."""
    import torch

    from ttalign.pipelines import AlignedStableDiffusionPipeline, aligned_class_for

    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ModelLoadError(f"Unknown dtype {dtype!r}; expected e.g. 'float32', 'float16' or 'bfloat16'.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model in SHAPES_MODELS:
        from ttalign.shapes import load_pipeline as load_shapes

        try:
            pipe = load_shapes(SHAPES_MODELS[model], device="cpu")  # cast before it moves
        except (OSError, ValueError) as err:  # a tuned LoRA that is not shipped, or peft missing to fuse it
            raise ModelLoadError(f"could not load model {model!r}: {str(err).splitlines()[0]}") from None
        return pipe.to(device, getattr(torch, dtype))
    if model == TINY_MODEL:
        from ttalign.testing import get_tiny_components

        pipe = AlignedStableDiffusionPipeline(**get_tiny_components())
    else:
        try:
            pipe = aligned_class_for(model).from_pretrained(model, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load model {model!r}: {str(err).splitlines()[0]}") from None
    return pipe.to(device)
