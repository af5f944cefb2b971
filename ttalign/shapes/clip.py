"""A small CLIP of the shapes world: transformers' `CLIPModel` trained contrastively on rendered scenes.

```
python -m ttalign.shapes.clip --out ttalign/shapes/clip --steps 1500 --seed 0
```

The model is saved in the standard transformers layout (`config.json`, `model.safetensors`, tokenizer and image
processor files), so `CLIPModel.from_pretrained(path)` loads it as any CLIP checkpoint, and CLIP-style rewards run
on it unchanged. Training uses the symmetric InfoNCE loss of CLIP (Radford et al. 2021,
https://arxiv.org/abs/2103.00020) on batches of rendered scenes, so each batch holds many near-miss captions
(same shapes in other colours or places). The held-out pairwise accuracy (true caption against the caption of
another scene) is written to the log.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from ttalign.rewards.clip import CLIPEmbedder, CLIPScore
from ttalign.shapes.runs import TrainingLog, parse_training_args, publish, warmup_cosine
from ttalign.shapes.world import IMAGE_SIZE, VOCABULARY, sample_batch

#: Image normalization of the model (OpenAI CLIP's constants).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
#: Folder of the embedded shapes CLIP, shipped inside the package.
CLIP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip")
DEFAULTS = dict(seed=0, steps=1500, batch_size=128, lr=1e-3, warmup=100, dataset_size=60000, threads=2)


def build_clip(vocab_size: int):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=IMAGE_SIZE,
            patch_size=4,
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        projection_dim=64,
    )
    return CLIPModel(config)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Images `[B, 3, 32, 32]` in `[0, 1]` to the model's input (differentiable)."""
    mean = torch.tensor(MEAN, device=images.device, dtype=images.dtype)[None, :, None, None]
    std = torch.tensor(STD, device=images.device, dtype=images.dtype)[None, :, None, None]
    return (images - mean) / std


def _embed_text(model, ids: torch.Tensor) -> torch.Tensor:
    out = model.text_model(input_ids=ids)
    return F.normalize(model.text_projection(out.pooler_output), dim=-1)


def _embed_images(model, images: torch.Tensor) -> torch.Tensor:
    out = model.vision_model(pixel_values=normalize(images))
    return F.normalize(model.visual_projection(out.pooler_output), dim=-1)


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, n: int = 1000, seed: int = 99) -> float:
    """How often the true caption scores above another scene's caption, on fresh scenes."""
    images, captions = sample_batch(np.random.default_rng(seed), n)
    ids = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    img, txt = _embed_images(model, torch.from_numpy(images)), _embed_text(model, ids)
    true = (img * txt).sum(-1)
    other = (img * txt.roll(1, 0)).sum(-1)
    different = torch.tensor([a != b for a, b in zip(captions, captions[-1:] + captions[:-1])])
    return float((true > other)[different].float().mean())


class ShapesCLIPScore(CLIPScore):
    """CLIPScore under the shapes CLIP: `100 * cos(image, text)`, differentiable, text embeddings cached per prompt.

    Args:
        path (`str`, *optional*): a folder in the `CLIPModel` layout (default: the embedded shapes CLIP).
    """

    native_range = (-100.0, 100.0)
    license = "Apache-2.0"

    def __init__(self, path: str | None = None):
        path = path or CLIP_DIR
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"No shapes CLIP at {path!r}; train one with `python -m ttalign.shapes.clip`.")
        super().__init__(CLIPEmbedder.from_pretrained(path))


def train(args) -> None:
    from transformers import CLIPImageProcessor

    from ttalign.testing import get_tiny_tokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = get_tiny_tokenizer(VOCABULARY, model_max_length=16)
    model = build_clip(len(tokenizer))
    workdir = tempfile.mkdtemp(prefix="shapes-clip-")
    log = TrainingLog(os.path.join(workdir, "training_log.txt"))

    log(f"settings {json.dumps(vars(args))}")
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = warmup_cosine(opt, args.warmup, args.steps)
    all_images, all_captions = sample_batch(np.random.default_rng(args.seed), args.dataset_size)
    all_images = torch.from_numpy(all_images)
    all_ids = tokenizer(all_captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
    log(f"rendered {args.dataset_size} scenes")
    gen = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, args.dataset_size, (args.batch_size,), generator=gen)
        images, ids = all_images[idx], all_ids[idx]
        captions = [all_captions[i] for i in idx.tolist()]
        img, txt = _embed_images(model, images), _embed_text(model, ids)
        logits = model.logit_scale.exp() * img @ txt.T  # [B, B]
        # identical captions in one batch are all positives of each other
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == 1:
            log(f"step {step}/{args.steps} loss {loss.item():.4f}")
    model.eval()
    log(f"held-out pairwise accuracy {pairwise_accuracy(model, tokenizer):.4f}")

    staging = os.path.join(workdir, "clip")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(MEAN),
        image_std=list(STD),
    ).save_pretrained(staging)
    publish(staging, args.out, vars(args), log, workdir)


def main(argv=None) -> None:
    train(parse_training_args(__doc__.split("\n")[0], DEFAULTS, argv))


if __name__ == "__main__":
    main()
