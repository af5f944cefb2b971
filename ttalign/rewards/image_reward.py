"""ImageReward (Xu et al. 2023, https://arxiv.org/abs/2304.05977): a BLIP model fine-tuned on 137k expert
comparisons of generated images.

Architecture: BLIP's ViT-L/16 image encoder (224 px) feeds, through cross-attention, a 12-layer BERT text encoder;
the text encoder's first-token feature goes through a linear MLP head `768-1024-128-64-16-1` (no activations), and
the score is standardized, `(r - 0.16717) / 1.03334`.

The official checkpoint (`ImageReward.pt` + `med_config.json` in the hub repository `THUDM/ImageReward`) is a state
dict of the original BLIP code (timm-style ViT, `med.py` BERT). The `image-reward` package breaks on recent
transformers, so the weights are mapped here onto transformers' own `BlipVisionModel` and `BlipTextModel`
(`convert_image_reward_state_dict`) and loaded with `torch.load(weights_only=True)`. Images are preprocessed in
tensor space (antialiased bicubic shortest-side resize to 224, centre crop, OpenAI CLIP mean and std, as the
reference's torchvision transform), so gradients reach the pixels.

Text cannot be embedded once per prompt here: every text token attends to the image. What is cached per prompt is
the tokenization (BERT uncased, padded to 35 tokens as in the reference).
"""

from __future__ import annotations

import json
import os
import re

import torch

from .base import Reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

REPO_ID = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
TOKENIZER_ID = "google-bert/bert-base-uncased"
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072

# Keys of the official checkpoint that scoring does not use (BLIP's contrastive projections, a saved buffer).
UNUSED_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")

# BLIP's timm-style ViT names -> transformers' BlipVisionModel names.
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def convert_image_reward_state_dict(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Splits an official ImageReward state dict into `{"vision": ..., "text": ..., "head": ...}` state dicts for
    `BlipVisionModel`, `BlipTextModel` (no pooler) and the MLP head. Raises `ValueError` naming unknown keys."""
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "head": {}}
    unknown = []
    for key, value in state.items():
        if UNUSED_KEYS.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            for pattern, repl in _VISION_RENAMES:
                new, n = re.subn(pattern, repl, name)
                if n:
                    out["vision"][new] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            out["text"][key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp.layers."):
            out["head"][key[len("mlp.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Not an ImageReward checkpoint: unexpected keys {unknown[:5]}.")
    return out


class ImageRewardHead(torch.nn.Module):
    """The reference MLP head, `input-1024-128-64-16-1` with dropouts between and no activations (the
    reference's ReLUs are commented out); module indices match the checkpoint (`layers.0/2/4/6/7`)."""

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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def _build_models(parts: dict[str, dict[str, torch.Tensor]], med_config: dict):
    """Builds the transformers modules sized from the weights (ViT) and from `med_config.json` (BERT)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision = parts["vision"]
    if "embeddings.class_embedding" not in vision or "embeddings.patch_embedding.weight" not in vision:
        raise ValueError("Not an ImageReward checkpoint: the BLIP image encoder weights are missing.")
    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    vision_config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=depth,
        num_attention_heads=width // 64,  # BLIP's ViT-B and ViT-L both use 64-dim heads
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # timm's partial(nn.LayerNorm, eps=1e-6)
        attention_dropout=0.0,
    )
    text_config = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=width,  # BLIP overrides med_config's encoder_width with the ViT's width
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=med_config["vocab_size"] - 2,  # BLIP appends [DEC] then [ENC] to BERT's vocabulary
        is_decoder=True,  # builds the cross-attention layers; scoring runs the encoder (bidirectional) mode
    )
    vision_model = BlipVisionModel(vision_config)
    text_model = BlipTextModel(text_config, add_pooling_layer=False)
    head = ImageRewardHead(med_config["hidden_size"])
    for name, module in (("vision", vision_model), ("text", text_model), ("head", head)):
        missing, unexpected = module.load_state_dict(parts[name], strict=False)
        if missing or unexpected:
            raise ValueError(
                f"ImageReward checkpoint does not fit the {name} model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}."
            )
    return vision_model, text_model, head


class ImageReward(Reward):
    """ImageReward (see the module docstring): standardized scores, about `[-2, 2]`, higher is better.

    Example:

    ```py
    >>> from ttalign.rewards import ImageReward
    >>> reward = ImageReward.from_pretrained()  # ImageReward.pt + med_config.json from THUDM/ImageReward
    >>> reward(images, ["a painting of a fox in the snow"] * len(images))
    ```
    """

    differentiable = True
    native_range = (-2.0, 2.0)
    license = "Apache-2.0 (ImageReward weights)"

    def __init__(self, vision_model, text_model, head, tokenizer, max_length: int = 35):
        super().__init__()
        self.vision_model = vision_model.eval().requires_grad_(False)
        self.text_model = text_model.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.image_size = vision_model.config.image_size
        self._token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str = REPO_ID,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Loads `ImageReward.pt` and `med_config.json` from `path`: a local folder or a hub repository id.

        The tokenizer is BLIP's, BERT uncased with `[DEC]` and `[ENC]` added: read from `path` when the folder
        holds one (`vocab.txt`), else from `tokenizer` (default `google-bert/bert-base-uncased`).
        """
        from transformers import BertTokenizer

        if os.path.isdir(path):
            checkpoint, config_file = os.path.join(path, CHECKPOINT), os.path.join(path, MED_CONFIG)
            for file in (checkpoint, config_file):
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"ImageReward folder {path!r} has no {os.path.basename(file)}.")
        else:
            from huggingface_hub import hf_hub_download

            checkpoint, config_file = hf_hub_download(path, CHECKPOINT), hf_hub_download(path, MED_CONFIG)
        with open(config_file) as f:
            med_config = json.load(f)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        vision_model, text_model, head = _build_models(convert_image_reward_state_dict(state), med_config)
        if tokenizer is None:
            has_vocab = os.path.isdir(path) and os.path.isfile(os.path.join(path, "vocab.txt"))
            tokenizer = path if has_vocab else TOKENIZER_ID
        tok = BertTokenizer.from_pretrained(tokenizer)
        tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        reward = cls(vision_model, text_model, head, tok)
        if dtype is not None:
            reward = reward.to(dtype)
        return reward.to(device) if device else reward

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids and attention masks `[B, 35]`, tokenized once per distinct prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._token_cache]
        if missing:
            enc = self.tokenizer(
                missing, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            self._token_cache.update(zip(missing, zip(enc.input_ids, enc.attention_mask)))
        ids, mask = zip(*(self._token_cache[p] for p in prompts))
        return torch.stack(ids), torch.stack(mask)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        param = next(self.vision_model.parameters())
        pixels = clip_preprocess(images, self.image_size, self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        image_embeds = self.vision_model(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state
        ids, mask = self.tokens(prompts)
        text = self.text_model(
            input_ids=ids.to(param.device),
            attention_mask=mask.to(param.device),
            encoder_hidden_states=image_embeds,  # [B, 1 + (224/16)^2, 1024]; every image token attended to
            is_decoder=False,
        ).last_hidden_state
        features = text[:, 0]  # [B, 768], the first ([CLS]) token
        rewards = self.head(features.to(self.head.layers[0].weight.dtype)).float().squeeze(-1)  # [B]
        return (rewards - SCORE_MEAN) / SCORE_STD
