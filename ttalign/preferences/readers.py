"""Readers for public preference sets in the layout they ship, as :class:`~ttalign.rewards.evaluation.PreferencePair`
records (`label` 0 when image 0 is preferred, 1 when image 1 is, 0.5 for a tie)."""

from __future__ import annotations

import glob
import io
import os
import re
from dataclasses import dataclass

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


def _image(path: str, where: str) -> Image.Image:
    if not os.path.isfile(path):
        raise ValueError(f"{where}: image {path!r} does not exist.")
    return Image.open(path).convert("RGB")


def _ranking_pairs(prompt: str, files: list[str], ranks: list, where: str) -> list[PreferencePair]:
    """Every pair of a ranked group (lower rank = preferred; equal ranks tie), images loaded from `files`."""
    if len(files) != len(ranks):
        raise ValueError(f"{where}: {len(files)} images but {len(ranks)} ranks.")
    images = [_image(f, where) for f in files]
    pairs = []
    for a in range(len(files)):
        for b in range(a + 1, len(files)):
            label = 0.5 if ranks[a] == ranks[b] else (0.0 if ranks[a] < ranks[b] else 1.0)
            pairs.append(PreferencePair(prompt, images[a], images[b], label))
    return pairs


def read_hpdv2(root: str, split: str = "test", limit: int | None = None) -> list[PreferencePair]:
    """HPD v2 (Wu et al. 2023, https://arxiv.org/abs/2306.09341) as it ships: `{root}/{split}.json` and the images
    under `{root}/{split}/`. A training record holds two `image_path`s and `human_preference`, one-hot on the
    preferred image; a test record holds a group of `image_path`s and their `rank` (1 = preferred), read as every pair
    of the group."""
    import json

    file = os.path.join(root, f"{split}.json")
    if not os.path.isfile(file):
        raise ValueError(f"No HPD v2 annotations at {file!r}.")
    with open(file, encoding="utf-8") as f:
        records = json.load(f)
    pairs = []
    for index, record in enumerate(records):
        where = f"{file}, record {index}"
        if not isinstance(record, dict) or "prompt" not in record or "image_path" not in record:
            raise ValueError(f"{where}: an HPD v2 record needs prompt and image_path, got {record!r:.200}.")
        files = [os.path.join(root, split, p) for p in record["image_path"]]
        if "rank" in record:
            pairs += _ranking_pairs(record["prompt"], files, record["rank"], where)
        elif "human_preference" in record:
            pref = record["human_preference"]
            if len(files) != 2 or len(pref) != 2:
                raise ValueError(f"{where}: a training record has two images and two preferences, got {pref!r}.")
            label = 0.5 if pref[0] == pref[1] else (0.0 if pref[0] > pref[1] else 1.0)
            pairs.append(PreferencePair(record["prompt"], _image(files[0], where), _image(files[1], where), label))
        else:
            raise ValueError(f"{where}: neither rank nor human_preference.")
        if limit and len(pairs) >= limit:
            return pairs[:limit]
    return pairs


def _table_rows(path: str) -> list[dict]:
    """Rows of a parquet file, a JSON list or a JSON-lines file."""
    import json

    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def read_imagerewarddb(root: str, split: str = "test", limit: int | None = None) -> list[PreferencePair]:
    """ImageRewardDB (Xu et al. 2023, https://arxiv.org/abs/2304.05977) as it ships: a metadata file
    (`metadata-{split}.parquet`, or `.json` / `.jsonl`) with one row per image (`prompt_id`, `prompt`, `image_path`
    relative to `root`, `rank`: 1 = preferred within its prompt), read as every pair of each prompt's images."""
    candidates = [os.path.join(root, f"metadata-{split}.{ext}") for ext in ("parquet", "json", "jsonl")]
    file = next((c for c in candidates if os.path.isfile(c)), None)
    if file is None:
        raise ValueError(f"No ImageRewardDB metadata for split {split!r} in {root!r} (looked for {candidates}).")
    groups: dict[str, dict] = {}
    for index, row in enumerate(_table_rows(file)):
        missing = {"prompt_id", "prompt", "image_path", "rank"} - set(row)
        if missing:
            raise ValueError(f"{file}, row {index}: no {sorted(missing)}.")
        group = groups.setdefault(str(row["prompt_id"]), {"prompt": row["prompt"], "files": [], "ranks": []})
        group["files"].append(os.path.join(root, row["image_path"]))
        group["ranks"].append(row["rank"])
    pairs = []
    for prompt_id, group in groups.items():
        pairs += _ranking_pairs(group["prompt"], group["files"], group["ranks"], f"{file}, prompt {prompt_id}")
        if limit and len(pairs) >= limit:
            return pairs[:limit]
    return pairs


def read_diffusiondb_prompts(path: str, limit: int | None = None, allow_nsfw: bool = False) -> list[str]:
    """DiffusionDB's prompts (Wang et al. 2022, https://arxiv.org/abs/2210.14896) from its `metadata.parquet` (or
    `metadata-large.parquet`): distinct, non-empty, in file order; prompts flagged NSFW (`prompt_nsfw` >= 0.5) are
    left out unless `allow_nsfw`."""
    import pyarrow.parquet as pq

    file = path
    if os.path.isdir(path):
        file = next(
            (
                os.path.join(path, n)
                for n in ("metadata.parquet", "metadata-large.parquet")
                if os.path.isfile(os.path.join(path, n))
            ),
            None,
        )
    if not file or not os.path.isfile(file):
        raise ValueError(f"No DiffusionDB metadata parquet at {path!r}.")
    table = pq.read_table(file, columns=[c for c in ("prompt", "prompt_nsfw") if c in pq.read_schema(file).names])
    if "prompt" not in table.column_names:
        raise ValueError(f"{file}: not DiffusionDB's layout, no prompt column.")
    prompts = table.column("prompt").to_pylist()
    nsfw = table.column("prompt_nsfw").to_pylist() if "prompt_nsfw" in table.column_names else [0.0] * len(prompts)
    out, seen = [], set()
    for prompt, flag in zip(prompts, nsfw):
        if not prompt or not prompt.strip() or prompt in seen or (flag is not None and flag >= 0.5 and not allow_nsfw):
            continue
        seen.add(prompt)
        out.append(prompt)
        if limit and len(out) >= limit:
            break
    return out


# --- RichHF-18K: TFRecord files of tf.train.Example, read without TensorFlow -------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of one protobuf message: varints as int, length-delimited as bytes, fixed32
    as 4 bytes, fixed64 as 8 bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
            if len(value) != size:
                raise ValueError("truncated field")
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _feature_values(feature: bytes) -> list:
    """The values of one `tf.train.Feature`: a bytes list (1), a float list (2) or an int64 list (3), packed or not."""
    import struct

    for kind, _, values in _fields(feature):
        out: list = []
        for _, wire, value in _fields(values):
            if kind == 1:
                out.append(value)
            elif kind == 2:
                out += list(struct.unpack(f"<{len(value) // 4}f", value))
            elif kind == 3 and wire == 0:
                out.append(value - (1 << 64) if value >= 1 << 63 else value)
            elif kind == 3:  # packed varints
                pos = 0
                while pos < len(value):
                    item, pos = _varint(value, pos)
                    out.append(item - (1 << 64) if item >= 1 << 63 else item)
        return out
    return []


def parse_tf_example(record: bytes) -> dict[str, list]:
    """The features of a serialized `tf.train.Example` as `{name: [values]}` (bytes, floats or ints)."""
    features: dict[str, list] = {}
    for number, _, message in _fields(record):
        if number != 1:
            continue
        for entry_number, _, entry in _fields(message):
            if entry_number != 1:
                continue
            name, feature = None, b""
            for field, _, value in _fields(entry):
                if field == 1:
                    name = value.decode("utf-8")
                elif field == 2:
                    feature = value
            if name is not None:
                features[name] = _feature_values(feature)
    return features


def read_tfrecord(path: str):
    """The records of a TFRecord file, in order. Each record's length header is checked against the file's size; the
    CRCs are not verified."""
    import struct

    with open(path, "rb") as f:
        index = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise ValueError(f"{path}: record {index} is truncated (a {len(header)}-byte header).")
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                raise ValueError(f"{path}: record {index} is truncated ({len(data)} of {length} bytes).")
            yield data
            index += 1


@dataclass
class RichFeedback:
    """One RichHF-18K image (Liang et al. 2024, https://arxiv.org/abs/2312.10240): its four scores, its artifact and
    misalignment heatmaps (512x512, 0-255) and its prompt's per-word misalignment labels (0: misaligned word, 1:
    aligned). `prompt` and `image` are filled in from Pick-a-Pic when the reader is given its parquet files."""

    filename: str
    aesthetics_score: float
    artifact_score: float
    misalignment_score: float
    overall_score: float
    artifact_map: Image.Image | None
    misalignment_map: Image.Image | None
    misalignment_labels: list[int]
    prompt: str | None = None
    image: Image.Image | None = None

    def word_labels(self) -> list[tuple[str, int]]:
        """The prompt's words (split on spaces and `,.?!":;`, as RichHF-18K's own matching does) with their labels."""
        if self.prompt is None:
            raise ValueError(f"{self.filename}: no prompt; give the reader Pick-a-Pic's parquet files (`pickapic=`).")
        words = [w for w in re.split(r"[,.?!\":; ]", self.prompt) if w]
        if len(words) != len(self.misalignment_labels):
            raise ValueError(
                f"{self.filename}: {len(self.misalignment_labels)} misalignment labels for the {len(words)} words of "
                f"{self.prompt!r}."
            )
        return list(zip(words, self.misalignment_labels))


def _pickapic_index(path: str) -> dict[str, tuple[str, bytes]]:
    """Pick-a-Pic's images by uid: `{uid: (caption, encoded image)}` from `image_{0,1}_uid` and `jpg_{0,1}`."""
    import pyarrow.parquet as pq

    index: dict[str, tuple[str, bytes]] = {}
    for file in _parquet_files(path):
        table = pq.read_table(file)
        missing = {"caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1"} - set(table.column_names)
        if missing:
            raise ValueError(f"{file}: not Pick-a-Pic's layout, no column(s) {sorted(missing)}.")
        for row in table.select(["caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1"]).to_pylist():
            for side in ("0", "1"):
                index[str(row[f"image_{side}_uid"])] = (row["caption"], row[f"jpg_{side}"])
    return index


def _heatmap(features: dict, name: str, where: str) -> Image.Image | None:
    if not features.get(name):
        return None
    try:
        return Image.open(io.BytesIO(features[name][0])).convert("L")
    except OSError as err:
        raise ValueError(f"{where}: {name} is not an encoded image ({err}).") from None


def read_richhf(
    path: str, split: str = "test", pickapic: str | None = None, limit: int | None = None, maps: bool = True
) -> list[RichFeedback]:
    """RichHF-18K as it ships: `{path}/{split}.tfrecord` (or a `.tfrecord` file), one `tf.train.Example` per image
    with `filename`, `aesthetics_score`, `artifact_score`, `misalignment_score`, `overall_score`, `artifact_map`,
    `misalignment_map` (encoded images) and `prompt_misalignment_label` (space-separated 0/1 per prompt word). The
    images and prompts are Pick-a-Pic's: with `pickapic` (its parquet file or folder), each record whose filename
    (a Pick-a-Pic image uid, with or without extension) is found there gets its `prompt` and `image`; records not
    found are kept without them. `maps=False` skips decoding the heatmaps."""
    file = path if os.path.isfile(path) else os.path.join(path, f"{split}.tfrecord")
    if not os.path.isfile(file):
        raise ValueError(f"No RichHF-18K TFRecord at {file!r}.")
    index = _pickapic_index(pickapic) if pickapic else {}
    records = []
    for number, raw in enumerate(read_tfrecord(file)):
        where = f"{file}, record {number}"
        try:
            features = parse_tf_example(raw)
        except ValueError as err:
            raise ValueError(f"{where}: not a tf.train.Example ({err}).") from None
        needed = {"filename", "aesthetics_score", "artifact_score", "misalignment_score", "overall_score"}
        needed |= {"prompt_misalignment_label"}
        missing = sorted(n for n in needed if not features.get(n))
        if missing:
            raise ValueError(f"{where}: not RichHF-18K's layout, no {missing}.")

        filename = features["filename"][0].decode("utf-8")
        label_text = features["prompt_misalignment_label"][0].decode("utf-8").split()
        if any(label not in ("0", "1") for label in label_text):
            raise ValueError(f"{where}: prompt_misalignment_label must be 0s and 1s, got {' '.join(label_text)!r}.")
        record = RichFeedback(
            filename,
            *(float(features[n][0]) for n in ("aesthetics_score", "artifact_score", "misalignment_score")),
            float(features["overall_score"][0]),
            _heatmap(features, "artifact_map", where) if maps else None,
            _heatmap(features, "misalignment_map", where) if maps else None,
            [int(label) for label in label_text],
        )
        found = index.get(os.path.splitext(os.path.basename(filename))[0]) or index.get(filename)
        if found:
            record.prompt = found[0]
            record.image = Image.open(io.BytesIO(found[1])).convert("RGB")
        records.append(record)
        if limit and len(records) >= limit:
            break
    return records


def richhf_pairs(records: list[RichFeedback], score: str = "overall_score") -> list[PreferencePair]:
    """Every pair of RichHF-18K images of one prompt (those with a prompt and an image), the higher `score` preferred
    (equal scores tie): how a per-image rating set becomes pairs for `eval-reward`."""
    if score not in ("aesthetics_score", "artifact_score", "misalignment_score", "overall_score"):
        raise ValueError(f"score must be one of RichHF-18K's four scores, got {score!r}.")
    groups: dict[str, list[RichFeedback]] = {}
    for record in records:
        if record.prompt is not None and record.image is not None:
            groups.setdefault(record.prompt, []).append(record)
    pairs = []
    for prompt, group in groups.items():
        for a in range(len(group)):
            for b in range(a + 1, len(group)):
                sa, sb = getattr(group[a], score), getattr(group[b], score)
                label = 0.5 if sa == sb else (0.0 if sa > sb else 1.0)
                pairs.append(PreferencePair(prompt, group[a].image, group[b].image, label))
    return pairs


FORMATS = ("auto", "pairs", "pickapic", "hpdv2", "imagerewarddb", "richhf")


def read_preference_set(
    path: str, format: str = "auto", split: str = "test", limit: int | None = None, pickapic: str | None = None
) -> list:
    """Any preference set the project reads, as :class:`PreferencePair` records: `format` is `"pairs"` (a folder
    with `pairs.jsonl`, or a `datasets` set; :func:`~ttalign.rewards.evaluation.load_pairs`), `"pickapic"`,
    `"hpdv2"`, `"imagerewarddb"`, `"richhf"` (`split` picks theirs; RichHF-18K's images and prompts come from the
    Pick-a-Pic parquet files at `pickapic`, its pairs from :func:`richhf_pairs`), or `"auto"` (told apart by their
    files)."""
    from ttalign.rewards.evaluation import load_pairs

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    if format == "auto":
        if os.path.isfile(os.path.join(path, "pairs.jsonl")):
            format = "pairs"
        elif os.path.isfile(os.path.join(path, f"{split}.json")):
            format = "hpdv2"
        elif any(os.path.isfile(os.path.join(path, f"metadata-{split}.{e}")) for e in ("parquet", "json", "jsonl")):
            format = "imagerewarddb"
        elif path.endswith(".tfrecord") or os.path.isfile(os.path.join(path, f"{split}.tfrecord")):
            format = "richhf"
        elif path.endswith(".parquet") or (os.path.isdir(path) and glob.glob(os.path.join(path, "**", "*.parquet"))):
            format = "pickapic"
        else:
            format = "pairs"
    if format == "richhf":
        if not pickapic:
            raise ValueError("RichHF-18K holds no images or prompts: pass Pick-a-Pic's parquet files as `pickapic`.")
        pairs = richhf_pairs(read_richhf(path, split, pickapic, maps=False))
        if not pairs:
            raise ValueError(f"No RichHF-18K image in {path!r} was found in the Pick-a-Pic files at {pickapic!r}.")
        return pairs[:limit] if limit else pairs
    if format == "pickapic":
        return read_pickapic(path, limit)
    if format == "hpdv2":
        return read_hpdv2(path, split, limit)
    if format == "imagerewarddb":
        return read_imagerewarddb(path, split, limit)
    return load_pairs(path, limit)
