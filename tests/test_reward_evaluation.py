"""Pairwise preference accuracy and the eval-reward command, on a verifier-labelled shapes-world set."""

import json
import re

import pytest

from ttalign.cli import main
from ttalign.rewards import JpegIncompressibility
from ttalign.rewards.evaluation import load_pairs, pairwise_accuracy
from ttalign.shapes import ShapesSoftVerifier
from ttalign.shapes.pairs import make_shapes_preference_set


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return make_shapes_preference_set(str(tmp_path_factory.mktemp("prefs")), n=40, seed=1)


def test_shapes_preference_set_and_accuracy(pairs_dir):
    pairs = load_pairs(pairs_dir)
    assert len(pairs) == 40 and {p.label for p in pairs} == {0.0, 1.0}
    assert pairwise_accuracy(ShapesSoftVerifier(), pairs)["accuracy"] >= 0.9

    def flipped(images, prompts):
        return -ShapesSoftVerifier()(images, prompts)

    soft = pairwise_accuracy(ShapesSoftVerifier(), pairs)["accuracy"]
    assert pairwise_accuracy(flipped, pairs)["accuracy"] == pytest.approx(1 - soft)
    assert len(load_pairs(pairs_dir, limit=5)) == 5


def test_eval_reward_command(pairs_dir, capsys):
    assert main(["eval-reward", "--reward", "shapes_soft", "--pairs", pairs_dir]) == 0
    assert "shapes_soft: accuracy" in capsys.readouterr().out
    assert main(["eval-reward", "--reward", "nope", "--pairs", pairs_dir]) == 2


def test_ties_are_skipped(pairs_dir, tmp_path):
    lines = tmp_path / "pairs.jsonl"
    records = [json.loads(line) for line in open(f"{pairs_dir}/pairs.jsonl")][:4]
    for record in records:
        for key in ("image_0", "image_1"):
            record[key] = f"{pairs_dir}/{record[key]}"
    records[0]["label"] = 0.5
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    result = pairwise_accuracy(JpegIncompressibility(), load_pairs(str(tmp_path)))
    assert result["pairs"] == 3 and result["ties_skipped"] == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"prompt": "a circle", "image_0": "x.png", "label": 0}', "line 2: a record needs the fields"),
        ('{"prompt": "a circle", "image_0": "a.png", "image_1": "a.png", "label": 2}', "line 2: label must be"),
        ('{"prompt": "a circle", "image_0": "a.png", "image_1": "missing.png", "label": 0}', "missing.png"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, line, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = '{"prompt": "a circle", "image_0": "a.png", "image_1": "a.png", "label": 0}'
    (tmp_path / "pairs.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_pairs(str(tmp_path))
    assert "pairs.jsonl" in str(err.value)


@pytest.mark.parametrize("layout", ["ours", "pickapic"])
def test_pairs_read_through_datasets(pairs_dir, tmp_path, layout):
    import io

    import datasets
    import numpy as np

    reference = load_pairs(pairs_dir, limit=6)
    if layout == "ours":
        columns = {
            "prompt": [p.prompt for p in reference],
            "image_0": [p.image_0 for p in reference],
            "image_1": [p.image_1 for p in reference],
            "label": [p.label for p in reference],
        }
        features = datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "image_0": datasets.Image(),
                "image_1": datasets.Image(),
                "label": datasets.Value("float32"),
            }
        )
    else:  # Pick-a-Pic v2: caption, encoded jpg_0 / jpg_1 bytes, label_0 = 1 when image 0 wins

        def png(image):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()

        columns = {
            "caption": [p.prompt for p in reference],
            "jpg_0": [png(p.image_0) for p in reference],
            "jpg_1": [png(p.image_1) for p in reference],
            "label_0": [1.0 - p.label for p in reference],
            "label_1": [p.label for p in reference],
        }
        features = None
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp_path / "set"))
    pairs = load_pairs(str(tmp_path / "set"))
    assert [p.prompt for p in pairs] == [p.prompt for p in reference]
    assert [p.label for p in pairs] == [p.label for p in reference] and {p.label for p in pairs} == {0.0, 1.0}
    for got, want in zip(pairs, reference):
        assert np.array_equal(np.asarray(got.image_0), np.asarray(want.image_0))
        assert np.array_equal(np.asarray(got.image_1), np.asarray(want.image_1))
    assert main(["eval-reward", "--reward", "shapes_soft", "--pairs", str(tmp_path / "set")]) == 0


def test_malformed_dataset_records_are_named(tmp_path):
    import datasets

    datasets.Dataset.from_dict(
        {"prompt": ["a"], "image_0": [b"not an image"], "image_1": [b"x"], "label": [0.0]}
    ).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"record 0, image_0: cannot decode"):
        load_pairs(str(tmp_path / "bad"))
