"""Reward-model evaluation: pairwise preference accuracy on data in the Pick-a-Pic / HPDv2 layout.

A preference set is a list of records `(prompt, image_0, image_1, label)` with `label` 0 when `image_0` is preferred,
1 when `image_1` is, and 0.5 for a tie (ties are left out of the accuracy). Two storage forms are read:

- a folder with `pairs.jsonl` (one JSON object per line, image paths relative to the folder);
- through 🤗 `datasets` (when installed): a dataset saved with `save_to_disk` or a hub dataset id (`name:split`),
  with the same columns (images as `Image` features or encoded bytes), or with Pick-a-Pic's own columns
  (`caption`, `jpg_0`, `jpg_1`, `label_0`), as in `yuvalkirstain/pickapic_v2`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch
from PIL import Image

FIELDS = ("prompt", "image_0", "image_1", "label")


@dataclasses.dataclass
class PreferencePair:
    prompt: str
    image_0: Image.Image
    image_1: Image.Image
    label: float


def _check(record, where: str) -> None:
    if not isinstance(record, dict) or any(k not in record for k in FIELDS):
        raise ValueError(f"{where}: a record needs the fields {FIELDS}, got {record!r:.200}.")
    if record["label"] not in (0, 1, 0.5):
        raise ValueError(f"{where}: label must be 0, 1 or 0.5, got {record['label']!r}.")


def iter_jsonl(file: str):
    """Yields `(where, record)` for each non-empty line of a JSONL file, `where` naming the file and line; a line that
    is not JSON raises `ValueError` naming it."""
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file}, line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg}).") from None


def load_pairs(path: str, limit: int | None = None) -> list[PreferencePair]:
    """Reads a preference set (see the module docstring); a malformed record raises `ValueError` naming it."""
    jsonl = os.path.join(path, "pairs.jsonl")
    pairs = []
    if os.path.isfile(jsonl):
        for where, record in iter_jsonl(jsonl):
            _check(record, where)
            images = []
            for key in ("image_0", "image_1"):
                file = os.path.join(path, record[key])
                if not os.path.isfile(file):
                    raise ValueError(f"{where}: {key} file {record[key]!r} does not exist.")
                images.append(Image.open(file).convert("RGB"))
            pairs.append(PreferencePair(record["prompt"], *images, float(record["label"])))
            if limit and len(pairs) >= limit:
                break
        return pairs
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path!r} has no pairs.jsonl, and reading a dataset needs `datasets`.") from None
    if os.path.isdir(path):
        dataset = datasets.load_from_disk(path)
    else:  # a hub dataset, "name" or "name:split" (default split "test")
        name, _, split = path.partition(":")
        dataset = datasets.load_dataset(name, split=split or "test")
    for index, record in enumerate(dataset):
        record = _from_pickapic(record)
        _check(record, f"{path}, record {index}")
        images = [_decode(record[key], f"{path}, record {index}, {key}") for key in ("image_0", "image_1")]
        pairs.append(PreferencePair(record["prompt"], *images, float(record["label"])))
        if limit and len(pairs) >= limit:
            break
    return pairs


def _from_pickapic(record: dict) -> dict:
    """Pick-a-Pic's own columns (`caption`, `jpg_0`, `jpg_1`, `label_0`: 1 when image 0 wins, 0.5 for a tie) ->
    `(prompt, image_0, image_1, label)`; other records are returned unchanged."""
    if isinstance(record, dict) and "caption" in record and "jpg_0" in record and "label_0" in record:
        return {
            "prompt": record["caption"],
            "image_0": record["jpg_0"],
            "image_1": record["jpg_1"],
            "label": 1 - record["label_0"],
        }
    return record


def _decode(image, where: str) -> Image.Image:
    """A PIL image, encoded bytes, or a `datasets` image dict -> RGB PIL image."""
    import io

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    try:
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, str):
            image = Image.open(image)
    except OSError as err:
        raise ValueError(f"{where}: cannot decode the image ({err}).") from None
    if not isinstance(image, Image.Image):
        raise ValueError(f"{where}: expected an image, got {type(image).__name__}.")
    return image.convert("RGB")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


@torch.no_grad()
def pairwise_accuracy(reward, pairs: list[PreferencePair], batch_size: int = 32) -> dict:
    """The fraction of non-tied pairs in which the reward scores the preferred image higher (a tie in scores
    counts half)."""
    decided = [p for p in pairs if p.label in (0.0, 1.0)]
    if not decided:
        raise ValueError("The preference set has no pair with a winner.")
    hits = 0.0
    for start in range(0, len(decided), batch_size):
        chunk = decided[start : start + batch_size]
        prompts = [p.prompt for p in chunk]
        first = reward(torch.stack([_to_tensor(p.image_0) for p in chunk]), prompts)
        second = reward(torch.stack([_to_tensor(p.image_1) for p in chunk]), prompts)
        if not (torch.isfinite(first).all() and torch.isfinite(second).all()):
            raise ValueError(f"The reward returned non-finite scores on pairs {start}..{start + len(chunk) - 1}.")
        labels = torch.tensor([p.label for p in chunk])
        prefers_second = (second > first).float() + 0.5 * (second == first).float()
        hits += float((prefers_second * labels + (1 - prefers_second) * (1 - labels)).sum())
    return {"pairs": len(decided), "ties_skipped": len(pairs) - len(decided), "accuracy": hits / len(decided)}
