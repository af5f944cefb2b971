"""CLIP-family rewards on transformers' `CLIPModel`: CLIPScore and the LAION aesthetic predictor v2.

Both preprocess in tensor space (:mod:`ttalign.rewards.preprocess`), so gradients reach the pixels.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .base import Reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess


def _image_settings(path: str) -> dict:
    """Resize, crop and normalization of a checkpoint's image processor (OpenAI CLIP's when it has none)."""
    from transformers import CLIPImageProcessor

    try:
        processor = CLIPImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        return {}
    size = processor.size.get("shortest_edge") if isinstance(processor.size, dict) else processor.size.shortest_edge
    crop = processor.crop_size["height"] if isinstance(processor.crop_size, dict) else processor.crop_size.height
    return {"size": size, "crop_size": crop, "mean": tuple(processor.image_mean), "std": tuple(processor.image_std)}


class CLIPEmbedder(torch.nn.Module):
    """Normalized CLIP image and text embeddings from a `CLIPModel`, with text embeddings cached per prompt."""

    def __init__(
        self,
        model,
        tokenizer,
        size: int = 224,
        crop_size: int | None = None,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.size, self.crop_size, self.mean, self.std = size, crop_size or size, tuple(mean), tuple(std)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: str | None = None):
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        embedder = cls(model, AutoTokenizer.from_pretrained(path), **_image_settings(path))
        return embedder.to(device) if device else embedder

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` in `[0, 1]` -> unit-norm `[B, D]`."""
        pixels = clip_preprocess(images, self.size, self.crop_size, self.mean, self.std)
        param = next(self.model.parameters())
        out = self.model.vision_model(pixel_values=pixels.to(param.device, param.dtype))
        return F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm `[B, D]`, computed once per distinct prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
            ids = self.tokenizer(
                missing, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            ).input_ids
            with torch.no_grad():
                out = self.model.text_model(input_ids=ids.to(next(self.model.parameters()).device))
                embeds = F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)
            self._text_cache.update(zip(missing, embeds))
        return torch.stack([self._text_cache[p] for p in prompts])


class CLIPScore(Reward):
    """CLIPScore (Hessel et al. 2021, https://arxiv.org/abs/2104.08718): `100 * cos(image, text)` under CLIP, or
    Hessel's `2.5 * max(cos, 0)` with `hessel=True`. Differentiable, unlike torchmetrics' version.

    Example:

    ```py
    >>> from ttalign.rewards import CLIPScore
    >>> reward = CLIPScore.from_pretrained("openai/clip-vit-large-patch14")
    >>> reward(images, ["a photo of a cat"] * len(images))
    ```
    """

    differentiable = True
    native_range = (0.0, 100.0)
    license = "MIT (OpenAI CLIP weights)"

    def __init__(self, embedder: CLIPEmbedder, hessel: bool = False):
        super().__init__()
        self.embedder, self.hessel = embedder, hessel

    @classmethod
    def from_pretrained(cls, path: str = "openai/clip-vit-large-patch14", hessel: bool = False, **kwargs):
        return cls(CLIPEmbedder.from_pretrained(path, **kwargs), hessel=hessel)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = self.embedder.image_embeds(images)
        cos = (image * self.embedder.text_embeds(prompts).to(image.device)).sum(-1)  # [B]
        return 2.5 * cos.clamp_min(0) if self.hessel else 100 * cos


class PickScore(Reward):
    """PickScore (Kirstain et al. 2023, https://arxiv.org/abs/2305.01569): `logit_scale.exp() * cos(image, text)`
    under the PickScore CLIP-H. The raw score (about 18-24), not the reference's softmax across candidates, so
    images are scored independently.

    `from_pretrained()` loads the model `yuvalkirstain/PickScore_v1` with the tokenizer and image processor of
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, as the reference does.
    """

    differentiable = True
    native_range = (15.0, 25.0)
    license = "MIT (PickScore_v1 weights)"

    def __init__(self, embedder: CLIPEmbedder):
        super().__init__()
        self.embedder = embedder

    @classmethod
    def from_pretrained(
        cls,
        path: str = "yuvalkirstain/PickScore_v1",
        processor_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        dtype=None,
        device=None,
    ):
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        embedder = CLIPEmbedder(
            model, AutoTokenizer.from_pretrained(processor_path), **_image_settings(processor_path)
        )
        return cls(embedder.to(device) if device else embedder)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = self.embedder.image_embeds(images)
        cos = (image * self.embedder.text_embeds(prompts).to(image.device)).sum(-1)
        return self.embedder.model.logit_scale.exp().float() * cos


class AestheticMLP(torch.nn.Sequential):
    """The LAION aesthetic predictor v2 head: 768-1024-128-64-16-1 linear layers (dropout, no activations); its
    state-dict keys (`layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`) follow the released file."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


class LaionAesthetic(Reward):
    """LAION aesthetic predictor v2 (https://github.com/christophschuhmann/improved-aesthetic-predictor): the MLP
    on the L2-normalized CLIP ViT-L/14 image embedding, scores about 1-10. Differentiable (the reference
    normalizes in numpy, which is not).

    `from_pretrained(mlp_path)` loads `sac+logos+ava1-l14-linearMSE.pth` (with `torch.load(weights_only=True)`)
    from a local file, or from the hub with `repo_id`.
    """

    differentiable = True
    native_range = (1.0, 10.0)
    license = "MIT (predictor) + MIT (OpenAI CLIP weights)"
    MLP_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"

    def __init__(self, embedder: CLIPEmbedder, mlp: AestheticMLP):
        super().__init__()
        self.embedder, self.mlp = embedder, mlp.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        mlp_path: str | None = None,
        clip_path: str = "openai/clip-vit-large-patch14",
        repo_id: str | None = None,
        **kwargs,
    ):
        if mlp_path is None or not os.path.isfile(mlp_path):
            if repo_id is None:
                raise FileNotFoundError(f"No aesthetic MLP file at {mlp_path!r}; pass a local path or `repo_id`.")
            from huggingface_hub import hf_hub_download

            mlp_path = hf_hub_download(repo_id, mlp_path or cls.MLP_FILENAME)
        embedder = CLIPEmbedder.from_pretrained(clip_path, **kwargs)
        mlp = AestheticMLP(embedder.model.config.projection_dim)
        mlp.load_state_dict(torch.load(mlp_path, map_location="cpu", weights_only=True))
        return cls(embedder, mlp.to(next(embedder.model.parameters()).device))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.mlp(self.embedder.image_embeds(images)).squeeze(-1)
