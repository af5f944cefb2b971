"""The bookkeeping shared by the shapes world's training scripts (diffusion models, CLIP, VQA model): a timestamped
log written as it goes, and an output folder replaced only once everything in it is written."""

from __future__ import annotations

import json
import os
import shutil
import time


class TrainingLog:
    """Prints timestamped lines and appends them to `path` as they come, so that a long run's log survives a crash."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the run, closed by `close`
        self.start = time.time()

    def __call__(self, message: str) -> None:
        line = f"[{time.time() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def publish(staging: str, out: str, settings: dict, log: TrainingLog, workdir: str) -> None:
    """Writes the run's `settings` (`training_args.json`) and its log (`training_log.txt`) into the saved model's
    `staging` folder, then puts that folder at `out`, replacing what was there: no half-written model is ever left
    behind. `workdir` (the run's scratch folder, holding `staging`) is removed."""
    with open(os.path.join(staging, "training_args.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    log(f"done: saved to {out}")
    log.close()
    shutil.copy(log.path, os.path.join(staging, "training_log.txt"))
    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.move(staging, out)
    shutil.rmtree(workdir, ignore_errors=True)


def parse_training_args(description: str, defaults: dict, argv=None):
    """`--out` (required) and one `--option` per entry of `defaults` (typed like its default value)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True)
    for key, value in defaults.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    return parser.parse_args(argv)


def warmup_cosine(optimizer, warmup: int, steps: int):
    """A linear warm-up over `warmup` steps, then a cosine decay to 0 at `steps`."""
    import math

    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
