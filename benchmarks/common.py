"""Helpers shared by the benchmark scripts: environment facts and writing results as JSON and Markdown."""

from __future__ import annotations

import json
import os
import platform

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
