"""The shapes world: a synthetic text-to-image world with an exact verifier and a small trained model.

```py
>>> from ttalign.shapes import load_pipeline, verify, ShapesSoftVerifier
>>> pipe = load_pipeline()
>>> images = pipe("a red circle left of a blue square", **SAMPLING_DEFAULTS, output_type="pt").images
>>> verify(images, ["a red circle left of a blue square"]).passed
```
"""

from __future__ import annotations

import os

from .clip import CLIP_DIR, ShapesCLIPScore
from .soft import ShapesSoftVerifier
from .verifier import Verdict, Verification, detect, verify
from .world import CATEGORIES, COLORS, RELATIONS, SHAPES, evaluation_prompts, parse_caption, render, sample_scene

#: Folder of the embedded model (diffusers layout), shipped inside the package.
MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
#: Sampling settings the embedded model is evaluated with.
SAMPLING_DEFAULTS = {"num_inference_steps": 25, "guidance_scale": 3.0}


def load_pipeline(device: str | None = None, path: str | None = None):
    """Loads the embedded shapes-world model as an :class:`~ttalign.AlignedStableDiffusionPipeline`.

    It goes through the ordinary `from_pretrained` path, from `path` or the folder shipped with the package.
    """
    import torch

    from ttalign.pipelines import AlignedStableDiffusionPipeline

    path = path or MODEL_DIR
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"No shapes-world model at {path!r}; train one with `python -m ttalign.shapes.train --out {path}`."
        )
    pipe = AlignedStableDiffusionPipeline.from_pretrained(path)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


__all__ = [
    "CATEGORIES",
    "CLIP_DIR",
    "ShapesCLIPScore",
    "COLORS",
    "MODEL_DIR",
    "RELATIONS",
    "SAMPLING_DEFAULTS",
    "SHAPES",
    "ShapesSoftVerifier",
    "Verdict",
    "Verification",
    "detect",
    "evaluation_prompts",
    "load_pipeline",
    "parse_caption",
    "render",
    "sample_scene",
    "verify",
]
