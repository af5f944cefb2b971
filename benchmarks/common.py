"""Helpers shared by the benchmark scripts: environment facts and writing results as JSON and Markdown."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np
import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment() -> dict:
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def write_results(name: str, data: dict, markdown: str) -> None:
    """Writes `results/<name>.json` and `results/<name>.md`, each atomically."""
    os.makedirs(RESULTS, exist_ok=True)
    for ext, text in (("json", json.dumps(data, indent=2) + "\n"), ("md", markdown)):
        path = os.path.join(RESULTS, f"{name}.{ext}")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")


def run_sides(script: str, sides: tuple[str, ...], argv: list[str]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Runs `script --one SIDE PATH *argv` for each side, each in a fresh process (so that each one's peak memory is
    its own). Returns the JSON row each printed last, and the array each saved to PATH."""
    rows, arrays = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            path = os.path.join(tmp, f"{side}.npy")
            cmd = [sys.executable, script, "--one", side, path, *argv]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            arrays[side] = np.load(path)
            print(rows[-1], flush=True)
    return rows, arrays
