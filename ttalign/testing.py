"""Tiny real components, built locally without any network access.

These are the same model classes that a Stable Diffusion (1.x, 2.x, XL) checkpoint loads (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``, ``CLIPTextModelWithProjection``, ``CLIPTokenizer``), at a size that runs in
milliseconds on a CPU. Tests,
docs and benchmarks use them wherever a real checkpoint is out of reach. The tokenizer is built from a generated
vocabulary: whole-word tokens for :data:`DEFAULT_WORDS`, and single characters (with and without the ``</w>``
end-of-word marker) so that any other word still tokenizes, as sub-word pieces.

Example:

```py
>>> from ttalign import AlignedStableDiffusionPipeline
>>> from ttalign.testing import get_tiny_components
>>> pipe = AlignedStableDiffusionPipeline(**get_tiny_components())
>>> image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
```
"""

from __future__ import annotations

import inspect
import json
import os
import string
import tempfile

import torch

from ttalign.rewards.base import Reward

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

#: Whole-word tokens of the generated vocabulary: the shapes world's words plus a few common ones.
DEFAULT_WORDS: tuple[str, ...] = (
    # shapes world
    "a",
    "an",
    "the",
    "one",
    "two",
    "three",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "circle",
    "circles",
    "square",
    "squares",
    "triangle",
    "triangles",
    "left",
    "right",
    "of",
    "above",
    "below",
    "and",
    "photo",
    "image",
    "picture",
    "small",
    "large",
    "big",
    "on",
    "with",
    "next",
    "to",
    "is",
    # common words used in tests and docs
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "bird",
    "sitting",
    "bench",
    "park",
    "sky",
    "in",
    "at",
    "by",
    "man",
    "woman",
    "painting",
    "sunset",
    "beach",
    "mountain",
    "city",
    "street",
    "night",
    "portrait",
    "astronaut",
    "riding",
    "horse",
    "apple",
    "banana",
    "table",
    "chair",
    "flower",
    "garden",
    "river",
    "boat",
    "snow",
)


def _pieces(word: str) -> list[str]:
    """Initial BPE symbols of a word, the last one carrying the end-of-word marker (as CLIP's BPE does)."""
    return list(word[:-1]) + [word[-1] + "</w>"]


def _apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the lowest-ranked adjacent pair, every occurrence at once."""
    symbols = _pieces(word)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), (a, b)) for a, b in zip(symbols[:-1], symbols[1:])]
        rank, best = min(pairs)
        if rank == float("inf"):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_clip_vocab(words: tuple[str, ...] | list[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """Builds a CLIP BPE vocabulary and merge list in which each of `words` is a single token.

    Returns `(vocab, merges)`: `vocab` maps tokens to ids (``<|startoftext|>`` is 0, ``<|endoftext|>`` is 1),
    `merges` lists merge rules as ``"left right"`` strings in rank order.
    """
    vocab: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for ch in string.ascii_lowercase + string.digits + ".,:;!?()'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        if not word.isalpha():
            raise ValueError(f"Vocabulary words must be alphabetic, got {word!r}.")
        # A merge added later has a higher rank than every earlier one, so it never changes how an earlier
        # word is split: each earlier word always has a lower-ranked merge available until it is one token.
        symbols = _apply_bpe(word, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1]] + symbols[2:]
    return vocab, [f"{a} {b}" for a, b in merges]


def get_tiny_tokenizer(
    words: tuple[str, ...] | list[str] = DEFAULT_WORDS, model_max_length: int = 77, pad_token: str | None = None
):
    """A real `CLIPTokenizer` built from a generated vocabulary (see :func:`build_clip_vocab`). `pad_token` defaults to
    the end token, as SD's tokenizer; SDXL's second tokenizer pads with `"!"`."""
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_vocab(words)
    extra = {"pad_token": pad_token} if pad_token is not None else {}
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5
        return CLIPTokenizer(
            vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=model_max_length, **extra
        )
    with tempfile.TemporaryDirectory() as tmp:  # transformers 4.x reads files
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(
            os.path.join(tmp, "vocab.json"),
            os.path.join(tmp, "merges.txt"),
            model_max_length=model_max_length,
            **extra,
        )


class Redness(Reward):
    """A cheap differentiable reward for tests: the mean of the red channel minus the mean of the green one."""

    differentiable = True

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images[:, 0].mean((1, 2)) - images[:, 1].mean((1, 2))  # [B]


def get_tiny_text_encoder(
    vocab_size: int = 1000,
    hidden_size: int = 32,
    seed: int = 0,
    projection: bool = False,
    hidden_act: str = "quick_gelu",
):
    """A 5-layer `CLIPTextModel` with hidden size 32 (the size of diffusers' own pipeline tests); with `projection`, a
    `CLIPTextModelWithProjection` (SDXL's second text encoder, whose projected output is the pooled embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        hidden_act=hidden_act,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def get_tiny_unet(cross_attention_dim: int = 32, sample_size: int = 32, seed: int = 0):
    """A two-level `UNet2DConditionModel` (block channels 32, 64) with cross-attention at both levels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
        attention_head_dim=8,
    ).eval()


def get_tiny_vae(seed: int = 0):
    """A two-level `AutoencoderKL` (8x downsampling is not needed: it downsamples 2x, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
    ).eval()


def get_sd_shaped_unet(cross_attention_dim: int = 32, seed: int = 0):
    """A `UNet2DConditionModel` with Stable Diffusion 1.x's layout at a tiny width: four levels (channels 32, 32, 64,
    64), cross-attention at the first three and in the mid block, two layers per block, 8 heads, `sample_size` 64
    (512 px images). Its attention runs at 64x64, 32x32, 16x16 and 8x8, as in SD 1.x."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
        attention_head_dim=8,
    ).eval()


def get_sd_shaped_vae(seed: int = 0):
    """An `AutoencoderKL` with Stable Diffusion's 8x downsampling (four levels) at a tiny width."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 32, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=512,
    ).eval()


def get_tiny_scheduler(name: str = "ddim"):
    """A scheduler with Stable Diffusion's noise schedule: `"ddim"`, `"euler"`, `"euler_a"`, `"pndm"` or `"lcm"`."""
    from diffusers import (
        DDIMScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        PNDMScheduler,
    )

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **common)
    if name == "euler":
        return EulerDiscreteScheduler(steps_offset=1, **common)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(steps_offset=1, **common)
    if name == "pndm":
        return PNDMScheduler(skip_prk_steps=True, steps_offset=1, **common)
    if name == "lcm":
        return LCMScheduler(**common)
    raise ValueError(f"Unknown scheduler name {name!r}; expected one of 'ddim', 'euler', 'euler_a', 'pndm', 'lcm'.")


def get_tiny_components(scheduler: str = "ddim", seed: int = 0, layout: str = "tiny") -> dict:
    """All components of a tiny Stable Diffusion pipeline, seeded: pass them to the pipeline constructor.

    `layout="tiny"`: diffusers' test sizes (two UNet levels, 2x VAE); `layout="sd"`: Stable Diffusion 1.x's layout
    at a tiny width (:func:`get_sd_shaped_unet`, :func:`get_sd_shaped_vae`; 512 px images, 64x64 latents)."""
    if layout not in ("tiny", "sd"):
        raise ValueError(f"Unknown layout {layout!r}; expected 'tiny' or 'sd'.")
    sd = layout == "sd"
    return {
        "unet": get_sd_shaped_unet(seed=seed) if sd else get_tiny_unet(seed=seed),
        "scheduler": get_tiny_scheduler(scheduler),
        "vae": get_sd_shaped_vae(seed=seed) if sd else get_tiny_vae(seed=seed),
        "text_encoder": get_tiny_text_encoder(seed=seed),
        "tokenizer": get_tiny_tokenizer(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def get_tiny_sdxl_unet(layout: str = "tiny", time_cond_proj_dim: int | None = None, seed: int = 0):
    """An SDXL `UNet2DConditionModel` (`addition_embed_type="text_time"`: pooled text and size conditioning).

    `layout="tiny"`: diffusers' own SDXL test sizes (channels 2, 4; cross-attention at the second level, 16x16 for
    64 px images). `layout="sdxl"`: SDXL's layout at a tiny width: three levels (channels 32, 64, 64), cross-attention
    at the second and third with 1, 2 and 10 transformer layers per block as in SDXL (10 layers at 64x64 and 60 at
    32x32 for 1024 px images, `sample_size` 128)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if layout == "tiny":
        return UNet2DConditionModel(
            block_out_channels=(2, 4),
            layers_per_block=2,
            time_cond_proj_dim=time_cond_proj_dim,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
            cross_attention_dim=64,  # 32 + 32: the two text encoders side by side
            norm_num_groups=1,
        ).eval()
    if layout == "sdxl":
        return UNet2DConditionModel(
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            time_cond_proj_dim=time_cond_proj_dim,
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2, 10),
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=32,
        ).eval()
    raise ValueError(f"Unknown layout {layout!r}; expected 'tiny' or 'sdxl'.")


def get_tiny_sdxl_components(
    scheduler: str = "ddim", seed: int = 0, layout: str = "tiny", time_cond_proj_dim: int | None = None
) -> dict:
    """All components of a tiny Stable Diffusion XL pipeline, seeded, as diffusers' own SDXL tests size them: two
    5-layer CLIP text encoders of width 32 (the second with projection), both tokenizers built locally (the second
    pads with `"!"`, as SDXL's), the UNet of :func:`get_tiny_sdxl_unet` and a 2x VAE (`layout="sdxl"`: 8x, 1024 px)."""
    if layout not in ("tiny", "sdxl"):
        raise ValueError(f"Unknown layout {layout!r}; expected 'tiny' or 'sdxl'.")
    return {
        "unet": get_tiny_sdxl_unet(layout, time_cond_proj_dim, seed),
        "scheduler": get_tiny_scheduler(scheduler),
        "vae": get_sd_shaped_vae(seed=seed) if layout == "sdxl" else get_tiny_vae(seed=seed),
        "text_encoder": get_tiny_text_encoder(seed=seed, hidden_act="gelu"),
        "tokenizer": get_tiny_tokenizer(),
        "text_encoder_2": get_tiny_text_encoder(seed=seed + 1, projection=True, hidden_act="gelu"),
        "tokenizer_2": get_tiny_tokenizer(pad_token="!"),
        "image_encoder": None,
        "feature_extractor": None,
    }


def get_tiny_sdxl_pipeline(scheduler: str = "ddim", seed: int = 0, disable_progress_bar: bool = True, **kwargs):
    """An :class:`~ttalign.AlignedStableDiffusionXLPipeline` on the tiny SDXL components (no watermarker)."""
    from ttalign.pipelines import AlignedStableDiffusionXLPipeline

    components = get_tiny_sdxl_components(scheduler=scheduler, seed=seed, **kwargs)
    pipe = AlignedStableDiffusionXLPipeline(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=disable_progress_bar)
    return pipe


def get_tiny_t5_tokenizer(words: tuple[str, ...] | list[str] = DEFAULT_WORDS, model_max_length: int = 512):
    """A real T5 tokenizer (sentencepiece-style unigram pieces `"▁word"`, `</s>` at the end, `<pad>` padding) built
    locally with the `tokenizers` library: one piece per word of `words`, and single characters (with and without the
    word-start marker) so that any other word still tokenizes, as sub-word pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    marker = "\u2581"
    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    for word in dict.fromkeys(w.lower() for w in words):
        scores.setdefault(marker + word, -1.0)
    scores.setdefault(marker, -3.0)
    for ch in string.ascii_letters + string.digits + ".,:;!?()'-":
        scores.setdefault(marker + ch, -5.0)
        scores.setdefault(ch, -6.0)
    tokenizer = Tokenizer(models.Unigram(list(scores.items()), unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=marker, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=marker, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def get_tiny_t5_encoder(vocab_size: int = 1000, seed: int = 0, d_model: int = 32):
    """A 2-layer `T5EncoderModel` (width 32 as diffusers' tiny test T5 by default), in eval mode (no dropout)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def get_tiny_flow_vae(latent_channels: int = 4, seed: int = 0, layout: str = "tiny"):
    """An `AutoencoderKL` with SD3 / FLUX's latent shift and scale: diffusers' test size (one level, no downsampling)
    or, with `layout` "sd3" / "flux", an 8x one at a tiny width with 16 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    if layout == "tiny":
        return AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(4,),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ).eval()
    return AutoencoderKL(
        sample_size=512,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609 if layout == "sd3" else 0.1159,
        scaling_factor=1.5305 if layout == "sd3" else 0.3611,
    ).eval()


def get_tiny_sd3_components(seed: int = 0, layout: str = "tiny", shift: float = 1.0) -> dict:
    """All components of a tiny Stable Diffusion 3 pipeline, seeded, as diffusers' own SD3 tests size them: an
    `SD3Transformer2DModel` (one joint block, or with `layout="sd3"` SD3-medium's 24 blocks and 2x2 patches at a tiny
    width), two CLIP text encoders with projection, a tiny T5 encoder, all three tokenizers built locally, a VAE and
    a `FlowMatchEulerDiscreteScheduler` (`shift`). As in SD3, the T5 is wider than the two CLIPs' features together
    (96 > 32 + 32), so their token rows are zero-padded to its width."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    if layout not in ("tiny", "sd3"):
        raise ValueError(f"Unknown layout {layout!r}; expected 'tiny' or 'sd3'.")
    torch.manual_seed(seed)
    if layout == "tiny":
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=96,
            pooled_projection_dim=64,
            out_channels=4,
        )
    else:
        transformer = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=96,
            pooled_projection_dim=64,
            out_channels=16,
            pos_embed_max_size=192,
        )
    return {
        "transformer": transformer.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift),
        "vae": get_tiny_flow_vae(4, seed, layout=layout),
        "text_encoder": get_tiny_text_encoder(seed=seed, projection=True, hidden_act="gelu"),
        "tokenizer": get_tiny_tokenizer(),
        "text_encoder_2": get_tiny_text_encoder(seed=seed + 1, projection=True, hidden_act="gelu"),
        "tokenizer_2": get_tiny_tokenizer(pad_token="!"),
        "text_encoder_3": get_tiny_t5_encoder(seed=seed + 2, d_model=96),
        "tokenizer_3": get_tiny_t5_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def get_tiny_flux_components(seed: int = 0, layout: str = "tiny", guidance_embeds: bool = False) -> dict:
    """All components of a tiny FLUX.1 pipeline, seeded, as diffusers' own FLUX tests size them: a
    `FluxTransformer2DModel` (one double- and one single-stream block; with `layout="flux"` FLUX.1's 19 + 38 blocks
    and 16-channel latents at a tiny width), `guidance_embeds` as FLUX.1-dev (schnell has none), a CLIP text encoder,
    a tiny T5 encoder, both tokenizers built locally, a VAE and a dynamically shifted flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if layout not in ("tiny", "flux"):
        raise ValueError(f"Unknown layout {layout!r}; expected 'tiny' or 'flux'.")
    torch.manual_seed(seed)
    if layout == "tiny":
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=guidance_embeds,
        )
    else:
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=guidance_embeds,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return {
        "transformer": transformer.eval(),
        "scheduler": scheduler,
        "vae": get_tiny_flow_vae(1, seed, layout=layout),
        "text_encoder": get_tiny_text_encoder(seed=seed, hidden_act="gelu"),
        "tokenizer": get_tiny_tokenizer(),
        "text_encoder_2": get_tiny_t5_encoder(seed=seed + 2),
        "tokenizer_2": get_tiny_t5_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def get_tiny_sd3_pipeline(seed: int = 0, disable_progress_bar: bool = True, **kwargs):
    """An :class:`~ttalign.AlignedStableDiffusion3Pipeline` on the tiny SD3 components."""
    from ttalign.pipelines import AlignedStableDiffusion3Pipeline

    pipe = AlignedStableDiffusion3Pipeline(**get_tiny_sd3_components(seed=seed, **kwargs))
    pipe.set_progress_bar_config(disable=disable_progress_bar)
    return pipe


def get_tiny_flux_pipeline(seed: int = 0, disable_progress_bar: bool = True, **kwargs):
    """An :class:`~ttalign.AlignedFluxPipeline` on the tiny FLUX components."""
    from ttalign.pipelines import AlignedFluxPipeline

    pipe = AlignedFluxPipeline(**get_tiny_flux_components(seed=seed, **kwargs))
    pipe.set_progress_bar_config(disable=disable_progress_bar)
    return pipe


def get_tiny_pipeline(scheduler: str = "ddim", seed: int = 0, disable_progress_bar: bool = True):
    """An :class:`~ttalign.AlignedStableDiffusionPipeline` on the tiny components."""
    from ttalign.pipelines import AlignedStableDiffusionPipeline

    pipe = AlignedStableDiffusionPipeline(**get_tiny_components(scheduler=scheduler, seed=seed))
    pipe.set_progress_bar_config(disable=disable_progress_bar)
    return pipe


#: Per registered model family (`ttalign.pipelines.FAMILIES`): the tiny aligned pipeline its shared method tests run
#: on (a family without one fails `tests/test_registry.py` until it gets one).
TINY_FAMILY_PIPELINES = {
    "sd": lambda: get_tiny_pipeline("ddim"),
    "sdxl": lambda: get_tiny_sdxl_pipeline("ddim"),
    "sd3": lambda: get_tiny_sd3_pipeline(shift=3.0),
    "flux": lambda: get_tiny_flux_pipeline(guidance_embeds=True),
}


def get_tiny_family_pipeline(key: str):
    """The tiny aligned pipeline of the registered family `key` (`"sd"`, `"sdxl"`, `"sd3"`, `"flux"`)."""
    if key not in TINY_FAMILY_PIPELINES:
        raise KeyError(f"No tiny pipeline for the model family {key!r}: add one to TINY_FAMILY_PIPELINES.")
    return TINY_FAMILY_PIPELINES[key]()


def save_tiny_image_reward(folder: str, seed: int = 0, vision_width: int = 128, text_width: int = 32) -> str:
    """Writes a randomly initialized ImageReward in the official layout to `folder`: `ImageReward.pt` (the BLIP
    key names, unused projection weights and the `position_ids` buffer included), `med_config.json`, and a BERT
    `vocab.txt` generated from :data:`DEFAULT_WORDS`. Returns `folder`."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    def norm(prefix, width):
        return {f"{prefix}.weight": 1 + rand(width, scale=0.1), f"{prefix}.bias": rand(width, scale=0.1)}

    def linear(prefix, n_in, n_out):
        return {f"{prefix}.weight": rand(n_out, n_in, scale=n_in**-0.5), f"{prefix}.bias": rand(n_out, scale=0.1)}

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *DEFAULT_WORDS, *string.ascii_lowercase]
    vocab += [f"##{c}" for c in string.ascii_lowercase]
    patch, grid, depth, layers = 16, 2, 2, 2
    v, t = vision_width, text_width
    state = {
        "blip.visual_encoder.cls_token": rand(1, 1, v),
        "blip.visual_encoder.pos_embed": rand(1, grid * grid + 1, v),
        "blip.visual_encoder.patch_embed.proj.weight": rand(v, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
        "blip.visual_encoder.patch_embed.proj.bias": rand(v, scale=0.1),
        **norm("blip.visual_encoder.norm", v),
        "blip.text_encoder.embeddings.word_embeddings.weight": rand(len(vocab) + 2, t),
        "blip.text_encoder.embeddings.position_embeddings.weight": rand(40, t),
        "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],
        **norm("blip.text_encoder.embeddings.LayerNorm", t),
        **linear("blip.vision_proj", v, 16),
        **linear("blip.text_proj", t, 16),
    }
    for i in range(depth):
        block = f"blip.visual_encoder.blocks.{i}"
        state |= norm(f"{block}.norm1", v) | norm(f"{block}.norm2", v)
        state |= linear(f"{block}.attn.qkv", v, 3 * v) | linear(f"{block}.attn.proj", v, v)
        state |= linear(f"{block}.mlp.fc1", v, 4 * v) | linear(f"{block}.mlp.fc2", 4 * v, v)
    for i in range(layers):
        layer = f"blip.text_encoder.encoder.layer.{i}"
        for attn, kv_width in (("attention", t), ("crossattention", v)):
            state |= linear(f"{layer}.{attn}.self.query", t, t)
            state |= linear(f"{layer}.{attn}.self.key", kv_width, t) | linear(
                f"{layer}.{attn}.self.value", kv_width, t
            )
            state |= linear(f"{layer}.{attn}.output.dense", t, t) | norm(f"{layer}.{attn}.output.LayerNorm", t)
        state |= linear(f"{layer}.intermediate.dense", t, 2 * t)
        state |= linear(f"{layer}.output.dense", 2 * t, t) | norm(f"{layer}.output.LayerNorm", t)
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((t, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        state |= linear(f"mlp.layers.{i}", n_in, n_out)
    med_config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": t,
        "initializer_range": 0.02,
        "intermediate_size": 2 * t,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "model_type": "bert",
        "num_attention_heads": 2,
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(vocab) + 2,
        "encoder_width": 768,
        "add_cross_attention": True,
    }
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, "ImageReward.pt"))
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump(med_config, f, indent=2)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    return folder


def save_tiny_gpt2(folder: str, seed: int = 0) -> str:
    """Writes a randomly initialized 2-layer `GPT2LMHeadModel` and a byte-level BPE tokenizer (GPT-2's layout:
    `vocab.json` + `merges.txt`, the 256 byte symbols plus a few merges) to `folder`, for Promptist tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2's reversible byte -> printable character table
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    symbols = [table[b] for b in range(256)]
    merges = [("Ġ", "a"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "r"), ("e", "d"), ("Ġr", "ed")]
    vocab = {s: i for i, s in enumerate(symbols)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    eos = vocab["<|endoftext|>"]
    config = GPT2Config(
        vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=eos, eos_token_id=eos
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": 128,
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            },
            f,
        )
    return folder


#: Chat templates in the layout of the real checkpoints' (Qwen2.5-VL's turns; LLaVA-1.5's `USER: ... ASSISTANT:`), for
#: the tiny vision-language models and the shapes VQA model.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] != 'user' %}</s>{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
#: Words of the tiny vision-language models' vocabulary (beyond :data:`DEFAULT_WORDS`).
VLM_WORDS: tuple[str, ...] = (
    "Does",
    "this",
    "figure",
    "show",
    "Please",
    "answer",
    "Yes",
    "No",
    "or",
    "yes",
    "no",
    "Is",
    "Are",
    "there",
    "exactly",
    "user",
    "assistant",
    "system",
    "USER",
    "ASSISTANT",
    "?",
    ".",
    ":",
    '"',
    ",",
)
TINY_VLM_ARCHITECTURES = ("qwen2_5_vl", "llava")


def word_level_tokenizer(
    words, specials: list[str], bos: str | None, eos: str, pad: str, unk: str, model_max_length: int = 512
):
    """A `PreTrainedTokenizerFast` over whole `words` and single punctuation marks (`<unk>` for anything else), with
    `specials` as special tokens that are never split (the chat and image tokens); no tokens are added around the
    text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [unk, pad, eos, *([bos] if bos else []), *specials, *words, *string.punctuation]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens([t for t in dict.fromkeys([unk, pad, eos, *([bos] if bos else []), *specials])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=unk,
        pad_token=pad,
        eos_token=eos,
        bos_token=bos,
        model_max_length=model_max_length,
    )


def save_tiny_vlm(folder: str, architecture: str = "qwen2_5_vl", seed: int = 0, image_size: int = 56) -> str:
    """Writes a randomly initialized tiny vision-language model and its processor to `folder`, in the layout of the
    real checkpoints (`config.json`, `model.safetensors`, tokenizer, image processor, chat template), for
    :class:`~ttalign.rewards.VQAScore` tests: `"qwen2_5_vl"` (`Qwen2_5_VLForConditionalGeneration`, its image and
    video processors) or `"llava"` (`LlavaForConditionalGeneration`: a CLIP vision tower and a Llama language model,
    `CLIPImageProcessor`). Images are resized to `image_size` px (a multiple of 28)."""
    if architecture not in TINY_VLM_ARCHITECTURES:
        raise ValueError(f"architecture must be one of {TINY_VLM_ARCHITECTURES}, got {architecture!r}.")
    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28, got {image_size}.")
    torch.manual_seed(seed)
    if architecture == "qwen2_5_vl":
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
            Qwen2VLImageProcessor,
            Qwen2VLVideoProcessor,
        )

        specials = [
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ]
        tokenizer = word_level_tokenizer(
            VLM_WORDS + DEFAULT_WORDS, specials, None, "<|im_end|>", "<|endoftext|>", "<unk>"
        )
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
        config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 512,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                "bos_token_id": None,
                "eos_token_id": ids["<|im_end|>"],
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 4,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "out_hidden_size": 32,
                "window_size": 56,
                "fullatt_block_indexes": [1],
            },
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
        pixels = image_size * image_size
        size = {"shortest_edge": pixels, "longest_edge": pixels}
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(size=size),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(size=size),
            chat_template=QWEN_CHAT_TEMPLATE,
        )
    else:
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        tokenizer = word_level_tokenizer(VLM_WORDS + DEFAULT_WORDS, ["<image>"], "<s>", "</s>", "<pad>", "<unk>")
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=14,
            projection_dim=32,
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=(image_size // 14) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
            ),
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
