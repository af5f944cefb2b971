"""Readers of the public preference sets, on tiny fixtures written in the layout each set ships in."""

import dataclasses
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


# --- RichHF-18K: tf.train.Example records in a TFRecord file, written here byte by byte ------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _example(features: dict) -> bytes:
    """A serialized tf.train.Example: str -> bytes list, float -> float list (packed), int -> int64 list."""
    import struct

    entries = b""
    for name, value in features.items():
        if isinstance(value, bytes | str):
            raw = value.encode() if isinstance(value, str) else value
            feature = _field(1, _field(1, raw))
        elif isinstance(value, float):
            feature = _field(2, _field(1, struct.pack("<f", value)))
        else:
            feature = _field(3, _field(1, _varint(value)))
        entries += _field(1, _field(1, name.encode()) + _field(2, feature))
    return _field(1, entries)


def _tfrecord(path, records: list[bytes]) -> None:
    import struct

    with open(path, "wb") as f:
        for record in records:
            f.write(struct.pack("<Q", len(record)) + b"\0" * 4 + record + b"\0" * 4)


def _richhf_record(uid: str, overall: float, labels: str, heat: int = 100) -> bytes:
    heatmap = io.BytesIO()
    Image.fromarray(np.full((16, 16), heat, dtype=np.uint8)).save(heatmap, format="PNG")
    return _example(
        {
            "filename": f"{uid}.png",
            "aesthetics_score": 0.5,
            "artifact_score": 0.75,
            "misalignment_score": 0.25,
            "overall_score": overall,
            "artifact_map": heatmap.getvalue(),
            "misalignment_map": heatmap.getvalue(),
            "prompt_misalignment_label": labels,
            "count": 7,  # an int64 feature, read and ignored
        }
    )


def _pickapic_with_uids(path, rows) -> None:
    pq.write_table(
        pa.table(
            {
                "caption": [r[0] for r in rows],
                "image_0_uid": [r[1] for r in rows],
                "image_1_uid": [r[2] for r in rows],
                "jpg_0": [_png(r[3]) for r in rows],
                "jpg_1": [_png(r[4]) for r in rows],
                "label_0": [1.0] * len(rows),
            }
        ),
        path,
    )


def test_richhf_tfrecord_with_pickapic_images(tmp_path):
    from ttalign.preferences import read_preference_set, read_richhf, richhf_pairs

    _tfrecord(
        tmp_path / "test.tfrecord",
        [
            _richhf_record("u1", 0.8, "1 0 1", heat=200),
            _richhf_record("u2", 0.3, "1 1 1"),
            _richhf_record("u3", 0.6, "0 1"),
            _richhf_record("missing", 0.9, "1"),
        ],
    )
    rows = [("a red cat", "u1", "u2", 10, 20), ("blue dog", "u3", "u9", 30, 40)]
    _pickapic_with_uids(tmp_path / "pap.parquet", rows)
    records = read_richhf(str(tmp_path), "test", pickapic=str(tmp_path / "pap.parquet"))
    assert [r.filename for r in records] == ["u1.png", "u2.png", "u3.png", "missing.png"]
    first = records[0]
    assert (first.aesthetics_score, first.artifact_score, first.misalignment_score) == (0.5, 0.75, 0.25)
    assert abs(first.overall_score - 0.8) < 1e-6  # stored as float32
    assert first.artifact_map.size == (16, 16) and _gray(first.artifact_map) == 200
    assert first.prompt == "a red cat" and _gray(first.image) == 10
    assert first.word_labels() == [("a", 1), ("red", 0), ("cat", 1)]
    assert records[2].prompt == "blue dog" and _gray(records[2].image) == 30
    assert records[3].prompt is None and records[3].image is None
    with pytest.raises(ValueError, match="no prompt"):
        records[3].word_labels()
    with pytest.raises(ValueError, match="3 misalignment labels for the 2 words"):
        dataclasses.replace(first, prompt="red cat").word_labels()
    assert read_richhf(str(tmp_path / "test.tfrecord"), maps=False)[0].artifact_map is None

    # Pairs: the two images of "a red cat", the higher overall score preferred; one-image prompts give none.
    (pair,) = richhf_pairs(records)
    assert pair.prompt == "a red cat" and pair.label == 0.0
    assert _gray(pair.image_0) == 10 and _gray(pair.image_1) == 20
    assert richhf_pairs(records, "aesthetics_score")[0].label == 0.5  # equal scores tie
    (auto,) = read_preference_set(str(tmp_path), pickapic=str(tmp_path / "pap.parquet"))
    assert auto.label == 0.0
    with pytest.raises(ValueError, match="pass Pick-a-Pic's parquet files"):
        read_preference_set(str(tmp_path), "richhf")


def test_richhf_rejects_other_layouts_and_truncation(tmp_path):
    from ttalign.preferences import read_richhf

    with pytest.raises(ValueError, match="No RichHF-18K TFRecord"):
        read_richhf(str(tmp_path), "dev")
    _tfrecord(tmp_path / "test.tfrecord", [_example({"filename": "x.png", "overall_score": 1.0})])
    with pytest.raises(ValueError, match=r"not RichHF-18K's layout, no \['aesthetics_score'"):
        read_richhf(str(tmp_path))
    _tfrecord(tmp_path / "test.tfrecord", [_richhf_record("u1", 0.5, "1 2")])
    with pytest.raises(ValueError, match="must be 0s and 1s, got '1 2'"):
        read_richhf(str(tmp_path))
    _tfrecord(tmp_path / "test.tfrecord", [_richhf_record("u1", 0.5, "1")])
    data = (tmp_path / "test.tfrecord").read_bytes()
    (tmp_path / "test.tfrecord").write_bytes(data[:-40])
    with pytest.raises(ValueError, match="record 0 is truncated"):
        read_richhf(str(tmp_path))
