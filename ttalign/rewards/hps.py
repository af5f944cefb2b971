"""HPSv2 and HPSv2.1 (Wu et al. 2023, https://arxiv.org/abs/2306.09341): human preference scores from an open_clip
ViT-H-14 fine-tuned on HPD v2.

The score is the plain cosine of the image and text embeddings (about 0.25-0.35). Images are resized on their
longest side and zero-padded to a square, as in the reference, in tensor space so that gradients reach the pixels.
The checkpoints (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt` in the hub repository `xswu/HPSv2`) are
state dicts of the open_clip model; they load into upstream open_clip (the `rewards` extra), with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, center_crop, resize_longest_side

CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2(Reward):
    """HPSv2 / HPSv2.1 reward (see the module docstring).

    Example:

    ```py
    >>> from ttalign.rewards import HPSv2
    >>> reward = HPSv2.from_pretrained("v2.1")  # downloads HPS_v2.1_compressed.pt from xswu/HPSv2
    >>> reward(images, prompts)
    ```
    """

    differentiable = True
    native_range = (0.2, 0.35)
    license = "Apache-2.0 (HPSv2 weights)"

    def __init__(self, model, tokenizer, image_size: int = 224):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.image_size = tokenizer, image_size
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        version: str = "v2.1",
        checkpoint: str | None = None,
        repo_id: str = "xswu/HPSv2",
        arch: str = "ViT-H-14",
        device: str | None = None,
    ):
        """Builds the open_clip `arch` without pretrained weights and loads the HPS state dict: from `checkpoint`
        (a local file) or from `repo_id` on the hub."""
        try:
            import open_clip
        except ImportError:
            raise ImportError("HPSv2 needs open_clip: pip install 'ttalign[rewards]'.") from None
        if version not in CHECKPOINTS:
            raise ValueError(f"Unknown HPS version {version!r}; expected one of {sorted(CHECKPOINTS)}.")
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download(repo_id, CHECKPOINTS[version])
        model = open_clip.create_model(arch, pretrained=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        reward = cls(model, open_clip.get_tokenizer(arch), image_size=image_size)
        return reward.to(device) if device else reward

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tokens = self.tokenizer(missing).to(next(self.model.parameters()).device)
            with torch.no_grad():
                self._text_cache.update(zip(missing, F.normalize(self.model.encode_text(tokens).float(), dim=-1)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` in `[0, 1]` -> longest side resized, zero-padded square, normalized."""
        x = center_crop(resize_longest_side(images, self.image_size).clamp(0, 1), self.image_size, self.image_size)
        mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device, dtype=x.dtype)[None, :, None, None]
        std = torch.tensor(OPENAI_CLIP_STD, device=x.device, dtype=x.dtype)[None, :, None, None]
        return (x - mean) / std

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        param = next(self.model.parameters())
        image = F.normalize(
            self.model.encode_image(self.preprocess(images).to(param.device, param.dtype)).float(), dim=-1
        )
        return (image * self.text_embeds(prompts).to(image.device)).sum(-1)
