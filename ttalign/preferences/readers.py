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


FORMATS = ("auto", "pairs", "pickapic", "hpdv2", "imagerewarddb")


def read_preference_set(path: str, format: str = "auto", split: str = "test", limit: int | None = None) -> list:
    """Any preference set the project reads, as :class:`PreferencePair` records: `format` is `"pairs"` (a folder
    with `pairs.jsonl`, or a `datasets` set; :func:`~ttalign.rewards.evaluation.load_pairs`), `"pickapic"`,
    `"hpdv2"`, `"imagerewarddb"` (`split` picks theirs), or `"auto"` (told apart by their files)."""
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
        elif path.endswith(".parquet") or (os.path.isdir(path) and glob.glob(os.path.join(path, "**", "*.parquet"))):
            format = "pickapic"
        else:
            format = "pairs"
    if format == "pickapic":
        return read_pickapic(path, limit)
    if format == "hpdv2":
        return read_hpdv2(path, split, limit)
    if format == "imagerewarddb":
        return read_imagerewarddb(path, split, limit)
    return load_pairs(path, limit)
