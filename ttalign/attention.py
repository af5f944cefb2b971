"""Attention control shared by the attention methods: one processor per attention layer, installed for one call.

diffusers allows one processor per attention module, and the fast SDPA path never materializes attention
probabilities. :func:`attention_control` has the model family install, for the duration of a call, a control
processor on every attention layer of the denoiser (for the UNet families, :class:`ControlProcessor`) that delegates
to the layer's own processor (SDPA, LoRA-aware, IP-Adapter...) unless a method has asked for something at that layer:
recording cross-attention maps at one resolution (Attend-and-Excite), modulating attention logits (region
re-weighting) or probabilities (token re-weighting). Only then does the layer compute its probabilities explicitly.
The pipeline restores the original processors after the call, also on error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ttalign.hooks import block_checkpointing


@dataclass
class LayerContext:
    """What a hook knows about the attention call it is asked about.

    Attributes:
        name (`str`): the processor name (`"down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"`).
        is_cross (`bool`): cross-attention (keys are text tokens) or self-attention.
        height, width (`int`): the spatial size of the layer's feature map.
        cfg (`bool`): whether the batch is `[unconditional; conditional]` (classifier-free guidance).
        step_index (`int`), timestep: the denoising step of the call.
        rows (`list[int]`, *optional*): the images of the call that this denoiser batch holds, in order (`None`: all
            of them). A method's own forward may hold some of them only (Attend-and-Excite refining some images).
        part (`str`, *optional*): the part of the denoiser the layer is in (`"down"`, `"mid"` or `"up"` in a UNet).
        tokens (`list[int]`, *optional*): set for the recorders when the text view they get holds only some text
            positions, these in this order (the union of the recorders' own `tokens`); `None`: every text position.
    """

    name: str
    is_cross: bool
    height: int
    width: int
    cfg: bool
    step_index: int
    timestep: torch.Tensor | None
    rows: list[int] | None = None
    part: str | None = None
    tokens: list[int] | None = None

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


class StopForward(Exception):
    """Raised by the control processor of the layer named in :attr:`AttentionControl.stop_after`, once it has
    recorded: a forward run only for the maps it records needs nothing after that layer (Attend-and-Excite's loss
    passes)."""


@dataclass
class AttentionControl:
    """The per-call registry of attention hooks (see the module docstring).

    - `recorders`: `f(ctx, probs [B * heads, hw, L]) -> None`, called when `recording` is on. A recorder that reads
      some text positions only says which in a `tokens` attribute (sorted); where a layer can, it then computes those
      columns only and passes `[B * heads, hw, len(ctx.tokens)]` with `ctx.tokens` set (joint attention's lean path).
    - `logit_hooks`: `f(ctx, scores [B * heads, q, k]) -> scores | None` (scaled logits, before the softmax).
    - `prob_hooks`: `f(ctx, probs) -> probs | None` (after the softmax).
    A hook that returns `None` leaves the tensor as it is (it only looks, in the pipeline's own UNet calls too).
    Each hook also provides `wants(ctx) -> bool`; a layer takes the explicit path only when some hook wants it. Hooks
    with per-image data select the images of the current UNet batch with `ctx.per_image(...)` (see `record`).
    """

    latent_size: tuple[int, int] = (64, 64)
    #: The number of text tokens in the denoiser's sequence (joint attention: where the image tokens start or end).
    text_length: int = 0
    cfg: bool = False
    step_index: int = -1
    timestep: torch.Tensor | None = None
    recording: bool = False
    rows: list[int] | None = None
    recorders: list = field(default_factory=list)
    logit_hooks: list = field(default_factory=list)
    prob_hooks: list = field(default_factory=list)
    #: While recording: the layer after which the forward stops (:class:`StopForward`); `None` runs it whole.
    stop_after: str | None = None
    #: While a checkpointed block is recomputed in a backward (:meth:`checkpointed`): the layers take the path they
    #: took in the forward, but nothing is recorded again and nothing stops.
    replaying: bool = False
    #: Inside :meth:`checkpointed` (the denoiser's blocks checkpointed): a layer need not checkpoint its own parts.
    blocks_checkpointed: bool = False

    def context(self, name: str, is_cross: bool, query_len: int, part: str | None = None) -> LayerContext:
        h, w = self.latent_size
        factor = math.sqrt(h * w / query_len)
        return LayerContext(
            name,
            is_cross,
            round(h / factor),
            round(w / factor),
            self.cfg,
            self.step_index,
            self.timestep,
            self.rows,
            part,
        )

    @contextlib.contextmanager
    def paused(self):
        """No hook acts on the denoiser calls made inside the block (FLUX's separate unconditional pass: the attention
        methods act on the conditional branch, as in the families that batch both branches)."""
        saved = self.recorders, self.logit_hooks, self.prob_hooks
        self.recorders, self.logit_hooks, self.prob_hooks = [], [], []
        try:
            yield
        finally:
            self.recorders, self.logit_hooks, self.prob_hooks = saved

    @contextlib.contextmanager
    def record(self, cfg: bool = False, rows: list[int] | None = None, stop_after: str | None = None):
        """Records maps (for `recorders`) during the UNet calls made inside the block; `cfg` and `rows` (the images
        of the call in the batch, `None` for all) tell the hooks the layout of the batch. With `stop_after`, the
        denoiser call raises :class:`StopForward` once that layer has recorded: the caller, which wants only the
        maps, catches it and skips every later layer (and the memory their activations would keep for backward)."""
        old = self.recording, self.cfg, self.rows, self.stop_after
        self.recording, self.cfg, self.rows, self.stop_after = True, cfg, rows, stop_after
        try:
            yield
        finally:
            self.recording, self.cfg, self.rows, self.stop_after = old

    def check_stop(self, name: str) -> None:
        """Called by a control processor after its layer ran: raises :class:`StopForward` at `stop_after`."""
        if self.recording and not self.replaying and self.stop_after == name:
            raise StopForward(name)

    @contextlib.contextmanager
    def checkpointed(self, denoiser: torch.nn.Module):
        """Gradient checkpointing of the denoiser's blocks for the forwards made inside the block (diffusers' own
        `gradient_checkpointing` switches, with a checkpoint function of this control's): a forward whose backward
        is taken keeps only each block's inputs, and the backward recomputes one block at a time. A block recomputed
        in the backward sees the control as its forward did (the same layers take the explicit path), with
        :attr:`replaying` on: the maps are not recorded twice, and :class:`StopForward` is not raised inside the
        backward. The user's own checkpointing settings are restored on exit."""
        from torch.utils.checkpoint import checkpoint

        def run_checkpointed(module, *args):
            seen = self.recording, self.cfg, self.rows, self.stop_after, list(self.recorders)
            calls = []

            def run(*inputs):
                if not calls:  # the forward itself
                    calls.append(True)
                    return module(*inputs)
                old = self.recording, self.cfg, self.rows, self.stop_after, self.recorders, self.replaying
                self.recording, self.cfg, self.rows, self.stop_after = seen[:4]
                self.recorders = [_Silent(f) for f in seen[4]]
                self.replaying = True
                try:
                    return module(*inputs)
                finally:
                    self.recording, self.cfg, self.rows, self.stop_after, self.recorders, self.replaying = old

            return checkpoint(run, *args, use_reentrant=False)

        with block_checkpointing(denoiser, run_checkpointed) as switched:
            outer, self.blocks_checkpointed = self.blocks_checkpointed, switched or self.blocks_checkpointed
            try:
                yield
            finally:
                self.blocks_checkpointed = outer


class _Silent:
    """A recorder that wants what it wraps wants and records nothing (a block recomputed in a backward)."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.tokens = getattr(recorder, "tokens", None)

    def wants(self, ctx) -> bool:
        return self.recorder.wants(ctx)

    def __call__(self, ctx, probs) -> None:
        return None


def attention_control(state) -> AttentionControl:
    """The call's :class:`AttentionControl`, installing the control processors on first use (at the `attention`
    stage). The pipeline's component snapshot restores the original processors after the call."""
    control = state.scratch.get("attention_control")
    if control is None:
        text_length = 0 if state.prompt_embeds is None else state.prompt_embeds.shape[1]
        control = AttentionControl(
            latent_size=state.family.latent_grid(state.height, state.width),
            text_length=text_length,
            cfg=bool(state.do_classifier_free_guidance),
        )
        state.family.install_attention_control(control)
        state.scratch["attention_control"] = control
    return control


def sync_step(state) -> None:
    """Tells the control which step the pipeline's next UNet call belongs to (and that it runs with CFG)."""
    control = state.scratch.get("attention_control")
    if control is not None:
        control.step_index, control.timestep = state.step_index, state.timestep
        control.cfg = bool(state.do_classifier_free_guidance)


Hook = Callable[[LayerContext, torch.Tensor], torch.Tensor]


def token_spans(tokenizer, prompt: str, words: list[str]) -> list[list[int]]:
    """The positions of each word or phrase of `words` in `prompt` as the text encoder sees it (CLIP's start token at
    0, none for T5), sub-word pieces included: `[[2], [5, 6]]`. Raises `ValueError` naming a word that is not in the
    prompt."""
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)
    spans = []
    for word in words:
        pieces = tokenizer.tokenize(word)
        for start in range(len(tokens) - len(pieces) + 1):
            if pieces and tokens[start : start + len(pieces)] == pieces:
                spans.append(list(range(start, start + len(pieces))))
                break
        else:
            raise ValueError(
                f"Token {word!r} is not in the prompt {prompt!r} (its tokens: {tokenizer.tokenize(prompt)})."
            )
    return spans
