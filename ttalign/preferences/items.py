"""Labelling items from a pipeline: one image per system (a method list, or none for the plain call) for every prompt,
from the same seed, written as PNGs and a JSON-lines items file that `ttalign serve --label-items` imports."""

from __future__ import annotations

import json
import os
import tempfile

import torch


def make_label_items(pipe, prompts: list[str], systems: dict, out: str, seed: int = 0, **call_kwargs) -> str:
    """Generates, for each prompt, one image with each of `systems` (`{name: [methods]}`, two or four of them; `[]`
    is the plain call), all from the generator seeded `seed + prompt index`; writes `out/{k}_{name}.png` and
    `out/items.jsonl` (`prompt`, `images`, `systems`; the order of the images shuffled per prompt with that seed, so
    no system always shows on the left). Returns the items file."""
    if len(systems) not in (2, 4):
        raise ValueError(f"Labelling compares two or four systems, got {len(systems)}: {sorted(systems)}.")
    for name in systems:
        if not name or not all(c.isalnum() or c in "_-." for c in name):
            raise ValueError(f"A system name is letters, digits, _ - or ., got {name!r}.")
    os.makedirs(out, exist_ok=True)
    lines = []
    for k, prompt in enumerate(prompts):
        names = []
        for name, methods in systems.items():
            generator = torch.Generator().manual_seed(seed + k)
            image = pipe(prompt, generator=generator, alignment=list(methods), output_type="pil", **call_kwargs).images
            names.append(f"{k:05d}_{name}.png")
            image[0].save(os.path.join(out, names[-1]))
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed + k)).tolist()
        system_names = list(systems)
        lines.append(
            json.dumps(
                {"prompt": prompt, "images": [names[i] for i in order], "systems": [system_names[i] for i in order]}
            )
        )
    path = os.path.join(out, "items.jsonl")
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".items-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
