"""Two-process DPO: `torchrun --nproc_per_node 2 tests/dpo_ddp.py PAIRS OUTPUT_DIR`; each process writes its final
LoRA weights and process count to OUTPUT_DIR/rank<k>.pt."""

import os
import sys

import torch

from ttalign.testing import get_tiny_pipeline
from ttalign.training import DiffusionDPOTrainer, DPOConfig

if __name__ == "__main__":
    pairs, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same LoRA initialization in both processes
    config = DPOConfig(
        max_steps=3,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        checkpointing_steps=2,
        output_dir=out,
        learning_rate=1e-3,
        beta=500.0,
        resolution=32,
    )
    trainer = DiffusionDPOTrainer(get_tiny_pipeline(), config, train_dataset=pairs)
    trainer.train()
    state = {k: v.detach().cpu() for k, v in trainer.lora_state().items()}
    rank = trainer.accelerator.process_index
    torch.save(
        {"lora": state, "num_processes": trainer.accelerator.num_processes, "step": trainer.step},
        os.path.join(out, f"rank{rank}.pt"),
    )
