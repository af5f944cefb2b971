"""Offline batch generation: images and a JSONL manifest, resumable, sharded across two processes by torchrun."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from ttalign.cli import main

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a cat", "a dog and a tree"]


def _images(folder) -> dict:
    return {
        f: np.asarray(Image.open(os.path.join(folder, f)), dtype=int)
        for f in sorted(os.listdir(folder))
        if f.endswith(".png")
    }


def _manifest(folder) -> list[dict]:
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_batch_generation_writes_a_manifest_and_resumes(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "out"
    args = [
        "generate",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seed",
        "7",
        "--align",
        "best_of_n:n=2,reward=jpeg_incompressibility",
    ]
    assert main(args) == 0
    records = _manifest(out)
    assert [r["prompt"] for r in records] == PROMPTS and [r["seed"] for r in records] == [7, 8, 9, 10, 11]
    assert all(r["reward"] is not None and r["compute"]["nfe_per_image"] == 2 * 2 for r in records)
    first = _images(out)
    assert sorted(first) == [f"0000{i}.png" for i in range(5)]
    assert "wrote 5 images" in capsys.readouterr().out
    # a rerun skips everything; a lost image is drawn again, the same as before
    os.remove(out / "00003.png")
    assert main(args) == 0
    assert "wrote 1 images" in capsys.readouterr().out
    again = _images(out)
    assert all(np.abs(again[k] - first[k]).max() <= 1 for k in first)
    assert len(_manifest(out)) == 5 and not [f for f in os.listdir(out) if f.startswith(".")]  # no leftovers
    # each record holds its image's size and hash; an image cut short, or replaced, is drawn again too
    for record in _manifest(out):
        data = (out / record["image"]).read_bytes()
        assert record["bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    data = (out / "00001.png").read_bytes()
    (out / "00001.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (64, 64)).save(out / "00004.png")
    assert main(args) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    again = _images(out)
    assert all(np.abs(again[k] - first[k]).max() <= 1 for k in first)


def test_each_batch_seeds_the_global_generators_from_its_first_item():
    import random

    import torch

    from ttalign.batch import _seed_globals

    def draw(seed, first):
        _seed_globals(seed, first)
        return torch.rand(3).tolist(), float(np.random.rand()), random.random()

    assert draw(1, 0) == draw(1, 0)
    assert all(a != b for a, b in zip(draw(1, 0), draw(1, 3)))  # another process's batch, another stream
    assert all(a != b for a, b in zip(draw(1, 0), draw(2, 0)))


def test_two_processes_share_the_prompts(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    single, double = tmp_path / "single", tmp_path / "double"
    common = ["--prompts", str(prompts), "--model", "tiny", "--steps", "2", "--batch-size", "3", "--seed", "1"]
    assert main(["generate", *common, "--out", str(single)]) == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            "-m",
            "ttalign.cli",
            "generate",
            *common,
            "--out",
            str(double),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        env=env,
    )
    records = _manifest(double)
    assert [r["index"] for r in records] == list(range(5)) and {r["process"] for r in records} == {0, 1}
    a, b = _images(single), _images(double)
    assert a.keys() == b.keys() and all(np.abs(a[k] - b[k]).max() <= 1 for k in a)  # sharding changes no image
