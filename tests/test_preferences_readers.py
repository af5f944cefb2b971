"""Readers of the public preference sets, on tiny fixtures written in the layout each set ships in."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ttalign.preferences import read_diffusiondb_prompts, read_hpdv2, read_imagerewarddb, read_pickapic


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _save(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(_png(value))


def _gray(image) -> float:
    return float(np.asarray(image).mean())


def test_pickapic_parquet_shards(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = {
        "caption": ["a cat", "a dog", "a fox"],
        "jpg_0": [_png(10), _png(30), _png(50)],
        "jpg_1": [_png(20), _png(40), _png(60)],
        "label_0": [1.0, 0.5, 0.0],
        "label_1": [0.0, 0.5, 1.0],
        "has_label": [True, True, False],
    }
    pq.write_table(pa.table(rows), folder / "test-00000-of-00001.parquet")
    pairs = read_pickapic(str(tmp_path))
    assert [(p.prompt, p.label) for p in pairs] == [("a cat", 0.0), ("a dog", 0.5)]  # the unlabelled row is skipped
    assert _gray(pairs[0].image_0) == 10 and _gray(pairs[0].image_1) == 20
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not Pick-a-Pic's layout"):
        read_pickapic(str(tmp_path / "other.parquet"))


def test_hpdv2_train_pairs_and_test_rankings(tmp_path):
    for name, value in (("a.jpg", 10), ("b.jpg", 20)):
        _save(tmp_path / "train" / name, value)
    for name, value in (("c.jpg", 30), ("d.jpg", 40), ("e.jpg", 50)):
        _save(tmp_path / "test" / name, value)
    train = [{"prompt": "a cat", "image_path": ["a.jpg", "b.jpg"], "human_preference": [0, 1]}]
    test = [{"prompt": "a dog", "image_path": ["c.jpg", "d.jpg", "e.jpg"], "rank": [2, 1, 3]}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    (pair,) = read_hpdv2(str(tmp_path), "train")
    assert pair.label == 1.0 and _gray(pair.image_1) == 20  # the second image was preferred
    pairs = read_hpdv2(str(tmp_path), "test")
    # (c, d): d ranked first -> label 1; (c, e): c -> 0; (d, e): d -> 0
    assert [(_gray(p.image_0), _gray(p.image_1), p.label) for p in pairs] == [
        (30, 40, 1.0),
        (30, 50, 0.0),
        (40, 50, 0.0),
    ]
    with pytest.raises(ValueError, match="No HPD v2 annotations"):
        read_hpdv2(str(tmp_path), "validation")


def test_imagerewarddb_metadata_groups_by_prompt(tmp_path):
    rows = []
    for k, (prompt_id, rank, value) in enumerate([("p1", 1, 10), ("p1", 2, 20), ("p2", 2, 30), ("p2", 2, 40)]):
        path = f"images/test/{k}.webp"
        os.makedirs(tmp_path / "images" / "test", exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(tmp_path / path, format="WEBP", lossless=True)
        rows.append({"image_path": path, "prompt_id": prompt_id, "prompt": f"prompt {prompt_id}", "rank": rank})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "metadata-test.parquet")
    pairs = read_imagerewarddb(str(tmp_path), "test")
    assert [(p.prompt, p.label) for p in pairs] == [("prompt p1", 0.0), ("prompt p2", 0.5)]
    (tmp_path / "metadata-test.parquet").unlink()
    (tmp_path / "metadata-test.json").write_text(json.dumps(rows[:2]))
    assert len(read_imagerewarddb(str(tmp_path), "test")) == 1
    (tmp_path / "metadata-test.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="no \\['image_path', 'prompt_id', 'rank'\\]"):
        read_imagerewarddb(str(tmp_path), "test")


def test_diffusiondb_prompts(tmp_path):
    table = pa.table(
        {
            "image_name": ["a.png", "b.png", "c.png", "d.png", "e.png"],
            "prompt": ["a castle", "a castle", "", "nsfw thing", "a lake at dawn"],
            "prompt_nsfw": [0.01, 0.01, 0.0, 0.9, 0.2],
        }
    )
    pq.write_table(table, tmp_path / "metadata.parquet")
    assert read_diffusiondb_prompts(str(tmp_path)) == ["a castle", "a lake at dawn"]
    assert read_diffusiondb_prompts(str(tmp_path), allow_nsfw=True, limit=2) == ["a castle", "nsfw thing"]
    with pytest.raises(ValueError, match="No DiffusionDB"):
        read_diffusiondb_prompts(str(tmp_path / "missing"))
