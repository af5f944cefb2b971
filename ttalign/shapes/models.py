"""The embedded shapes-world diffusion models: their folders, sampling settings and loading."""

from __future__ import annotations

import os

from ttalign.pipelines.base import read_sampling_defaults

_HERE = os.path.dirname(os.path.abspath(__file__))
#: Folder of the embedded model (diffusers layout), shipped inside the package.
MODEL_DIR = os.path.join(_HERE, "model")
#: Folder of the embedded flow-matching model (SD3's layout).
FLOW_MODEL_DIR = os.path.join(_HERE, "flow_model")
#: Sampling settings the embedded model is evaluated with (its folder's `ttalign_sampling.json`, which its pipeline
#: loads as `sampling_defaults`: a plain `pipe(prompt)` uses them).
SAMPLING_DEFAULTS = read_sampling_defaults(MODEL_DIR)
#: Sampling settings of the flow model; `max_sequence_length` is the length its T5 was trained on.
FLOW_SAMPLING_DEFAULTS = read_sampling_defaults(FLOW_MODEL_DIR)

_MODELS = {"sd": (MODEL_DIR, ""), "flow": (FLOW_MODEL_DIR, " --family flow")}
#: Folder of the tuned LoRAs shipped with the package: `tuned/<model>/pytorch_lora_weights.safetensors` (diffusers'
#: format) and `tuned/<model>/training.json` (the command that trained it and its verified success).
TUNED_DIR = os.path.join(_HERE, "tuned")


def sampling_defaults(pipe) -> dict:
    """The sampling settings of a shapes-world pipeline: its own `sampling_defaults` (from its folder), else
    :data:`FLOW_SAMPLING_DEFAULTS` for a flow-matching family and :data:`SAMPLING_DEFAULTS` otherwise."""
    from ttalign.pipelines import family_for

    own = getattr(pipe, "sampling_defaults", None)
    if own:
        return dict(own)
    return dict(FLOW_SAMPLING_DEFAULTS if "flow_matching" in family_for(pipe).features else SAMPLING_DEFAULTS)


def fuse_lora(pipe, folder: str, scale: float = 1.0) -> None:
    """Loads the LoRA in `folder` (diffusers' format) with `pipe.load_lora_weights` and fuses it into the weights at
    `scale` (diffusers' `lora_scale`: the LoRA's update times `scale`): the pipeline keeps no adapter layers. Needs
    peft (`pip install ttalign[train]`)."""
    from ttalign.pipelines.base import diffusers_errors_only

    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    with diffusers_errors_only():  # a denoiser-only LoRA has no text-encoder keys, which diffusers would warn about
        pipe.load_lora_weights(folder)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go


def load_pipeline(model: str = "sd", device: str | None = None, path: str | None = None):
    """Loads an embedded shapes-world model through the ordinary `from_pretrained` path, from `path` or the folder
    shipped with the package: `model="sd"`, the Stable Diffusion 1.x-style model, as an
    :class:`~ttalign.AlignedStableDiffusionPipeline`; `model="flow"`, the flow-matching model on SD3's layout, as an
    :class:`~ttalign.AlignedStableDiffusion3Pipeline`. With `path`, the class is read from the folder's
    `model_index.json`. `model="sd-tuned"` / `"flow-tuned"`: the same model with its tuned LoRA (:data:`TUNED_DIR`,
    trained on the shapes world's captions away from the evaluation set) fused into the denoiser's weights. The
    pipeline's `sampling_defaults` are the folder's (:data:`SAMPLING_DEFAULTS` /
    :data:`FLOW_SAMPLING_DEFAULTS` for the shipped models), so `pipe(prompt)` samples as the model was evaluated."""
    import torch

    from ttalign.pipelines import aligned_class_for

    base, tuned = model.removesuffix("-tuned"), model.endswith("-tuned")
    if base not in _MODELS:
        raise ValueError(f"Unknown shapes-world model {model!r}; expected 'sd', 'flow', 'sd-tuned' or 'flow-tuned'.")
    default, family = _MODELS[base]
    path = path or default
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"No shapes-world model at {path!r}; train one with `python -m ttalign.shapes.train{family} --out {path}`."
        )
    lora = os.path.join(TUNED_DIR, base)
    if tuned and not os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors")):
        raise FileNotFoundError(
            f"No tuned LoRA for the {base!r} shapes model in {lora!r}; train and install one with `python "
            "benchmarks/run.py tuned_loras` (docs/training.md)."
        )
    pipe = aligned_class_for(path).from_pretrained(path)
    if tuned:
        fuse_lora(pipe, lora)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
