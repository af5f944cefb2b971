"""Attention control shared by the attention methods: one processor per attention layer, installed for one call.

diffusers allows one processor per attention module, and the fast SDPA path never materializes attention
probabilities. :func:`attention_control` installs, for the duration of a call, a :class:`ControlProcessor` on every
attention layer of the UNet that delegates to the layer's own processor (SDPA, LoRA-aware, IP-Adapter...) unless a
method has asked for something at that layer: recording cross-attention maps at one resolution (Attend-and-Excite),
modulating attention logits (region re-weighting) or probabilities (token re-weighting). Only then does the layer
compute its probabilities explicitly. The pipeline restores the original processors after the call, also on error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class LayerContext:
    """What a hook knows about the attention call it is asked about.

    Attributes:
        name (`str`): the processor name (`"down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"`).
        is_cross (`bool`): cross-attention (keys are text tokens) or self-attention.
        height, width (`int`): the spatial size of the layer's feature map.
        cfg (`bool`): whether the batch is `[unconditional; conditional]` (classifier-free guidance).
        step_index (`int`), timestep: the denoising step of the call.
        rows (`list[int]`, *optional*): the images of the call that this UNet batch holds, in order (`None`: all of
            them). A method's own forward may hold some of them only (Attend-and-Excite refining some images).
    """

    name: str
    is_cross: bool
    height: int
    width: int
    cfg: bool
    step_index: int
    timestep: torch.Tensor | None
    rows: list[int] | None = None

    def per_image(self, values: torch.Tensor) -> torch.Tensor:
        """Per-image data of the call `[N, ...]` -> the rows of this UNet batch `[n, ...]`."""
        return values if self.rows is None else values[self.rows]

    def heads(self, batch: int, images: int) -> int:
        """The attention heads in a `[batch, q, k]` score tensor of `images` images (twice as many rows with CFG).
        Raises `RuntimeError` when the batch does not hold that many images, rather than mixing up their data."""
        rows = 2 * images if self.cfg else images
        if images == 0 or batch % rows:
            raise RuntimeError(
                f"Attention batch of {batch} rows at {self.name} does not hold {images} images"
                f"{' with CFG' if self.cfg else ''}: a UNet call ran outside the control's `record(rows=...)`."
            )
        return batch // rows


@dataclass
class AttentionControl:
    """The per-call registry of attention hooks (see the module docstring).

    - `recorders`: `f(ctx, probs [B * heads, hw, L]) -> None`, called when `recording` is on.
    - `logit_hooks`: `f(ctx, scores [B * heads, q, k]) -> scores | None` (scaled logits, before the softmax).
    - `prob_hooks`: `f(ctx, probs) -> probs | None` (after the softmax).
    A hook that returns `None` leaves the tensor as it is (it only looks, in the pipeline's own UNet calls too).
    Each hook also provides `wants(ctx) -> bool`; a layer takes the explicit path only when some hook wants it. Hooks
    with per-image data select the images of the current UNet batch with `ctx.per_image(...)` (see `record`).
    """

    latent_size: tuple[int, int] = (64, 64)
    cfg: bool = False
    step_index: int = -1
    timestep: torch.Tensor | None = None
    recording: bool = False
    rows: list[int] | None = None
    recorders: list = field(default_factory=list)
    logit_hooks: list = field(default_factory=list)
    prob_hooks: list = field(default_factory=list)

    def context(self, name: str, is_cross: bool, query_len: int) -> LayerContext:
        h, w = self.latent_size
        factor = math.sqrt(h * w / query_len)
        return LayerContext(name, is_cross, round(h / factor), round(w / factor), self.cfg, self.step_index,
                            self.timestep, self.rows)  # fmt: skip

    @contextlib.contextmanager
    def record(self, cfg: bool = False, rows: list[int] | None = None):
        """Records maps (for `recorders`) during the UNet calls made inside the block; `cfg` and `rows` (the images
        of the call in the batch, `None` for all) tell the hooks the layout of the batch."""
        old = self.recording, self.cfg, self.rows
        self.recording, self.cfg, self.rows = True, cfg, rows
        try:
            yield
        finally:
            self.recording, self.cfg, self.rows = old


class ControlProcessor:
    """Attention processor for one layer: the layer's original processor unless a hook wants this call."""

    def __init__(self, original, name: str, control: AttentionControl):
        self.original, self.name, self.control = original, name, control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        control = self.control
        is_cross = encoder_hidden_states is not None
        if hidden_states.ndim == 4:
            query_len = hidden_states.shape[-1] * hidden_states.shape[-2]
        else:
            query_len = hidden_states.shape[1]
        ctx = control.context(self.name, is_cross, query_len)
        recorders = [f for f in control.recorders if control.recording and f.wants(ctx)]
        logit_hooks = [f for f in control.logit_hooks if f.wants(ctx)]
        prob_hooks = [f for f in control.prob_hooks if f.wants(ctx)]
        if not (recorders or logit_hooks or prob_hooks):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return self.explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb, ctx, recorders,
                             logit_hooks, prob_hooks)  # fmt: skip

    @staticmethod
    def explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb, ctx, recorders, logit_hooks,
                 prob_hooks):  # fmt: skip
        """diffusers' classic `AttnProcessor` computation, with the hooks on the logits and probabilities."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))  # [B * heads, n, d]

        if logit_hooks:
            scores = attn.scale * query @ key.transpose(-1, -2)  # [B * heads, q, k]
            if attention_mask is not None:
                scores = scores + attention_mask
            if attn.upcast_softmax:
                scores = scores.float()
            for hook in logit_hooks:
                changed = hook(ctx, scores)
                scores = scores if changed is None else changed
            probs = scores.softmax(dim=-1).to(query.dtype)
        else:
            probs = attn.get_attention_scores(query, key, attention_mask)
        for hook in prob_hooks:
            changed = hook(ctx, probs)
            probs = probs if changed is None else changed
        for recorder in recorders:
            recorder(ctx, probs)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_control(state) -> AttentionControl:
    """The call's :class:`AttentionControl`, installing the control processors on first use (at the `attention`
    stage). The pipeline's component snapshot restores the original processors after the call."""
    control = state.scratch.get("attention_control")
    if control is None:
        unet = state.pipe.unet
        control = AttentionControl(latent_size=tuple(state.latents.shape[-2:]),
                                   cfg=bool(state.pipe.do_classifier_free_guidance))  # fmt: skip
        originals = unet.attn_processors
        unet.set_attn_processor({name: ControlProcessor(proc, name, control) for name, proc in originals.items()})
        state.scratch["attention_control"] = control
    return control


def sync_step(state) -> None:
    """Tells the control which step the pipeline's next UNet call belongs to (and that it runs with CFG)."""
    control = state.scratch.get("attention_control")
    if control is not None:
        control.step_index, control.timestep = state.step_index, state.timestep
        control.cfg = bool(state.pipe.do_classifier_free_guidance)


Hook = Callable[[LayerContext, torch.Tensor], torch.Tensor]
