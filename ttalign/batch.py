"""Offline batch generation: a prompt file -> images and a JSONL manifest, sharded across processes.

Started once, or by `accelerate launch` / `torchrun` for several processes: `PartialState().split_between_processes`
gives each process its share of the prompts. Each item (prompt `i`) has its own seed (`seed + i`) and generator, so
its image does not depend on how the items were sharded or batched; the global generators (torch, NumPy, `random`),
which some methods draw from, are seeded per batch from `(seed, first item)`, so each process draws its own stream.
Every image and its record are written atomically (a temporary file renamed into place), and the record holds the
image's size and SHA-256, so a run that was stopped resumes where it stopped: an item is skipped only when its record
matches its image file, and generated again otherwise. The main process finally gathers the records into
`manifest.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import torch


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a JSONL file of `{"prompt": ...}` objects."""
    if not os.path.isfile(path):
        raise ValueError(f"No prompt file at {path!r}.")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                try:
                    record = json.loads(line)
                except ValueError:
                    raise ValueError(f"{path}, line {number}: not valid JSON.") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{path}, line {number}: a record needs a string `prompt`.")
                line = record["prompt"]
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path!r} holds no prompt.")
    return prompts


def _atomic_write(path: str, write) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def generate_batch(
    pipe,
    prompts: list[str],
    out_dir: str,
    alignment=(),
    seed: int = 0,
    batch_size: int = 4,
    call_kwargs: dict | None = None,
    image_format: str = "png",
) -> dict:
    """Generates one image per prompt into `out_dir` (`00000.png`, ... and a `.json` record each), this process's
    share only, then (main process) writes `manifest.jsonl`. Returns `{"written", "skipped", "manifest"}`."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())
    pipe.set_progress_bar_config(disable=True)  # one bar over the items instead of one per call
    os.makedirs(out_dir, exist_ok=True)
    width = max(5, len(str(len(prompts) - 1)))
    names = [f"{i:0{width}d}" for i in range(len(prompts))]

    def done(i: int) -> bool:
        base = os.path.join(out_dir, names[i])
        return _finished(f"{base}.{image_format}", f"{base}.json", prompts[i], seed + i)

    written = skipped = 0
    with state.split_between_processes(list(range(len(prompts)))) as mine:
        todo = [i for i in mine if not done(i)]
        skipped = len(mine) - len(todo)
        bar = tqdm(
            total=len(mine),
            initial=skipped,
            desc=f"generate (process {state.process_index})",
            disable=not state.is_main_process,
        )
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            _seed_globals(seed, chunk[0])
            generators = [torch.Generator().manual_seed(seed + i) for i in chunk]
            out = pipe(
                [prompts[i] for i in chunk],
                generator=generators,
                output_type="pil",
                alignment=list(alignment),
                **(call_kwargs or {}),
            )
            compute = out.traces["compute"]
            for k, i in enumerate(chunk):
                base = os.path.join(out_dir, names[i])
                image = out.images[k]
                _atomic_write(f"{base}.{image_format}", lambda tmp, image=image: image.save(tmp, format=image_format))
                size, digest = _file_digest(f"{base}.{image_format}")
                record = {
                    "index": i,
                    "prompt": prompts[i],
                    "seed": seed + i,
                    "image": f"{names[i]}.{image_format}",
                    "bytes": size,
                    "sha256": digest,
                    "reward": None if out.rewards is None else float(out.rewards[k]),
                    "compute": {
                        "nfe_per_image": compute["nfe"] / len(chunk),
                        "wall_time_s": compute["wall_time_s"],
                        "batch": len(chunk),
                    },
                    "process": state.process_index,
                }
                _atomic_write(f"{base}.json", lambda tmp, record=record: _write_json(tmp, record))
                written += 1
            bar.update(len(chunk))
        bar.close()
    state.wait_for_everyone()
    manifest = os.path.join(out_dir, "manifest.jsonl")
    if state.is_main_process:
        records = []
        for name in names:
            path = os.path.join(out_dir, f"{name}.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    records.append(json.load(f))
        _atomic_write(manifest, lambda tmp: _write_lines(tmp, records))
    state.wait_for_everyone()
    return {"written": written, "skipped": skipped, "manifest": manifest}


def _seed_globals(seed: int, first: int) -> None:
    """Seeds torch's, NumPy's and Python's global generators from `(seed, first)`: a stream per batch, so processes
    (whose batches start at different items) never share one."""
    state = np.random.SeedSequence([seed, first]).generate_state(2)
    value = int(state[0]) << 32 | int(state[1])
    torch.manual_seed(value)
    np.random.seed(int(state[0]))
    random.seed(value)


def _file_digest(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return os.path.getsize(path), digest.hexdigest()


def _finished(image_path: str, record_path: str, prompt: str, seed: int) -> bool:
    """Whether an item is finished: its record parses, is for this prompt and seed, and its image has the size and
    SHA-256 the record holds (an image that was truncated, replaced or is missing is generated again)."""
    if not (os.path.isfile(image_path) and os.path.isfile(record_path)):
        return False
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("prompt") != prompt or record.get("seed") != seed:
        return False
    if record.get("bytes") != os.path.getsize(image_path):
        return False
    return record.get("sha256") == _file_digest(image_path)[1]


def _write_json(path: str, record: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f)


def _write_lines(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
