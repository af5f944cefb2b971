"""The shapes world: a synthetic text-to-image world with an exact verifier and a small trained model.

```py
>>> from ttalign.shapes import load_pipeline, verify, ShapesSoftVerifier
>>> pipe = load_pipeline()
>>> images = pipe("a red circle left of a blue square", output_type="pt").images  # its own sampling defaults
>>> verify(images, ["a red circle left of a blue square"]).passed
>>> flow = load_pipeline("flow")  # the flow-matching model on SD3's layout
>>> images = flow("a red circle left of a blue square", output_type="pt").images
```
"""

from __future__ import annotations

from .clip import CLIP_DIR, ShapesCLIPScore
from .models import (
    FLOW_MODEL_DIR,
    FLOW_SAMPLING_DEFAULTS,
    MODEL_DIR,
    SAMPLING_DEFAULTS,
    load_pipeline,
    sampling_defaults,
)
from .questions import shapes_questions
from .soft import ShapesSoftVerifier
from .verifier import ShapesVerifierReward, Verdict, Verification, detect, verify
from .vqa import VQA_DIR, ShapesQuestionScore, ShapesVQAScore
from .world import CATEGORIES, COLORS, RELATIONS, SHAPES, evaluation_prompts, parse_caption, render, sample_scene

__all__ = [
    "CATEGORIES",
    "CLIP_DIR",
    "FLOW_MODEL_DIR",
    "FLOW_SAMPLING_DEFAULTS",
    "ShapesCLIPScore",
    "ShapesQuestionScore",
    "ShapesVQAScore",
    "VQA_DIR",
    "COLORS",
    "MODEL_DIR",
    "RELATIONS",
    "SAMPLING_DEFAULTS",
    "SHAPES",
    "ShapesSoftVerifier",
    "ShapesVerifierReward",
    "Verdict",
    "Verification",
    "detect",
    "evaluation_prompts",
    "load_pipeline",
    "parse_caption",
    "render",
    "sample_scene",
    "sampling_defaults",
    "shapes_questions",
    "verify",
]
