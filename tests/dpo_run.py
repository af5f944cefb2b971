"""Runs a small DPO training on the tiny components: `python tests/dpo_run.py PAIRS OUTPUT_DIR MAX_STEPS [KILL_AT]`.

With `KILL_AT`, the process kills itself (SIGKILL) while it writes checkpoint `KILL_AT`, after its files are written
and before the folder is renamed into place: the moment a crash could leave a half-written checkpoint.
"""

import os
import signal
import sys

import torch

from ttalign.testing import get_tiny_pipeline
from ttalign.training.dpo import DiffusionDPOTrainer, DPOConfig


def run(pairs: str, output_dir: str, max_steps: int):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pipe = get_tiny_pipeline()
    config = DPOConfig(
        max_steps=max_steps,
        train_batch_size=2,
        checkpointing_steps=2,
        checkpoints_total_limit=10,
        output_dir=output_dir,
        learning_rate=1e-3,
        beta=500.0,
        resolution=32,
    )
    trainer = DiffusionDPOTrainer(pipe, config, train_dataset=pairs)
    trainer.train()
    return trainer


def kill_while_saving(step: int) -> None:
    replace = os.replace

    def replace_or_die(src, dst):
        if os.path.basename(dst) == f"checkpoint-{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)

    os.replace = replace_or_die


if __name__ == "__main__":
    if len(sys.argv) > 4:
        kill_while_saving(int(sys.argv[4]))
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
