"""Batched reward scoring with cached text embeddings against one image at a time.

Uses a small random CLIP built locally at the real input geometry (224 px, patch 16), so the ratio reflects
the call pattern, not a particular checkpoint. Both variants run interleaved in one process.

    python benchmarks/rewards.py [--images 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_results  # noqa: E402

from ttalign.rewards import CLIPScore  # noqa: E402
from ttalign.testing import get_tiny_tokenizer  # noqa: E402


def build_clip(path: str) -> None:
    from transformers import CLIPConfig, CLIPModel

    tokenizer = get_tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=224,
            patch_size=16,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        projection_dim=128,
    )
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        build_clip(tmp)
        reward = CLIPScore.from_pretrained(tmp)
    images = torch.rand(args.images, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    prompts = [f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square")] * (args.images // 4)

    def batched():
        with torch.no_grad():
            return reward(images, prompts)

    def one_at_a_time():
        out = []
        with torch.no_grad():
            for i in range(args.images):
                reward.embedder._text_cache.clear()  # no cache: the text is encoded with every image
                out.append(reward(images[i : i + 1], prompts[i : i + 1]))
        return torch.cat(out)

    batched()  # warm-up (fills the cache, as in a real loop over steps or candidates)
    one_at_a_time()
    times = {"batched_cached": [], "one_at_a_time": []}
    for _ in range(args.rounds):
        for name, fn in (("batched_cached", batched), ("one_at_a_time", one_at_a_time)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    assert torch.allclose(batched(), one_at_a_time(), atol=1e-4)
    medians = {k: statistics.median(v) for k, v in times.items()}
    speedup = medians["one_at_a_time"] / medians["batched_cached"]
    command = f"python benchmarks/rewards.py --images {args.images} --rounds {args.rounds}"
    data = {
        "benchmark": "rewards",
        "command": command,
        "images": args.images,
        "median_s": medians,
        "speedup": speedup,
        "scores_equal": True,
        "environment": environment(),
    }
    markdown = (
        "# Reward scoring: batched with cached text embeddings vs one image at a time\n\n"
        f"`{command}`: CLIPScore on a random CLIP at 224 px (patch 16, width 128, 4 layers per tower), "
        f"{args.images} images of 256 px, 4 distinct prompts, CPU, median of {args.rounds} interleaved rounds.\n\n"
        "| variant | median time (s) |\n|---|---|\n"
        f"| one image per call, text encoded every call | {medians['one_at_a_time']:.3f} |\n"
        f"| one batched call, text embeddings cached | {medians['batched_cached']:.3f} |\n\n"
        f"Speed-up: **{speedup:.1f}x**, same scores (within 1e-4).\n"
    )
    write_results("rewards", data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
