"""Readers for public preference sets in the layout they ship, as :class:`~ttalign.rewards.evaluation.PreferencePair`
records (`label` 0 when image 0 is preferred, 1 when image 1 is, 0.5 for a tie)."""

from __future__ import annotations

import glob
import io
import os

from PIL import Image

from ttalign.rewards.evaluation import PreferencePair


def _parquet_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ValueError(f"No parquet file or folder at {path!r}.")
    if not files:
        raise ValueError(f"{path!r} holds no parquet file.")
    return files


def read_pickapic(path: str, limit: int | None = None, keep_ties: bool = True) -> list[PreferencePair]:
    """Pick-a-Pic (v1 / v2) as it ships: parquet files (one file or a folder of them, e.g. `data/test-*.parquet`)
    with `caption`, `jpg_0` and `jpg_1` (encoded image bytes) and `label_0` (1 when image 0 won, 0.5 for a tie).
    Rows without a label (`has_label` false) are skipped, ties too unless `keep_ties`."""
    import pyarrow.parquet as pq

    pairs = []
    for file in _parquet_files(path):
        table = pq.read_table(file)
        missing = {"caption", "jpg_0", "jpg_1", "label_0"} - set(table.column_names)
        if missing:
            raise ValueError(f"{file}: not Pick-a-Pic's layout, no column(s) {sorted(missing)}.")
        for index, row in enumerate(table.to_pylist()):
            if row.get("has_label") is False:
                continue
            label_0 = row["label_0"]
            if label_0 not in (0, 0.5, 1):
                raise ValueError(f"{file}, row {index}: label_0 must be 0, 0.5 or 1, got {label_0!r}.")
            if label_0 == 0.5 and not keep_ties:
                continue
            images = []
            for key in ("jpg_0", "jpg_1"):
                try:
                    images.append(Image.open(io.BytesIO(row[key])).convert("RGB"))
                except (OSError, TypeError) as err:
                    raise ValueError(f"{file}, row {index}: {key} is not an encoded image ({err}).") from None
            pairs.append(PreferencePair(row["caption"], *images, 1.0 - float(label_0)))
            if limit and len(pairs) >= limit:
                return pairs
    return pairs
