"""Preference sets from the shapes world, in the layout that :mod:`ttalign.rewards.evaluation` reads (a folder with
`pairs.jsonl` and PNGs): for measuring a reward's pairwise accuracy and for Diffusion-DPO on known-good labels."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from ttalign.shapes.verifier import verify
from ttalign.shapes.world import render, sample_scene


def make_shapes_preference_set(out: str, n: int = 200, seed: int = 0) -> str:
    """Writes a preference set from the shapes world to `out` (folder with `pairs.jsonl` and PNGs).

    Each pair shows a scene drawn for the prompt and a scene drawn for another caption; the exact verifier
    decides the winner (pairs where it does not pass exactly one image are skipped); sides are shuffled.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    lines = []
    while len(lines) < n:
        objects, prompt = sample_scene(rng)
        other, _ = sample_scene(rng)
        images = [render(objects), render(other)]
        passed = verify(np.stack(images), [prompt, prompt]).passed
        if passed.count(True) != 1:
            continue
        swap = bool(rng.integers(2))
        if swap:
            images, passed = images[::-1], passed[::-1]
        names = []
        for side, image in enumerate(images):
            name = f"{len(lines):05d}_{side}.png"
            Image.fromarray((image * 255).round().astype(np.uint8)).save(os.path.join(out, name))
            names.append(name)
        label = 0 if passed[0] else 1
        lines.append(json.dumps({"prompt": prompt, "image_0": names[0], "image_1": names[1], "label": label}))
    with open(os.path.join(out, "pairs.jsonl.tmp"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, "pairs.jsonl.tmp"), os.path.join(out, "pairs.jsonl"))
    return out
