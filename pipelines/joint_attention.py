"""The attention control of the transformer families (SD3, FLUX): joint attention over image and text tokens.

SD3's blocks attend over the sequence [image, text] and FLUX's over [text, image] (FLUX's single-stream blocks get the
two already joined); neither stock processor materialises attention probabilities (SDPA / attention dispatch). A
:class:`JointControlProcessor` on every attention module delegates to the module's own processor unless a hook of the
call's :class:`~ttalign.attention.AttentionControl` wants the call. The hooks see two views of the image queries, as
the UNet's cross- and self-attention layers would: over the text keys (`ctx.is_cross`, `[B * heads, image tokens,
text tokens]`) and over the image keys, normalized over all joint keys. Recorders and probability hooks see the text
view of the probabilities; logit hooks may change the scores of either view before the softmax. When every hook is on
the text view (recording maps, token and region re-weighting), the lean path never forms the joint score matrix (see
`JointControlProcessor._attend_lean`); a hook on the image view or an attention mask takes the explicit path.
Everything else (projections, norms, rotary embeddings, output projections) is the stock processor's computation.
"""

from __future__ import annotations

import torch


class _AttentionWithLSE(torch.autograd.Function):
    """Softmax attention of `query`, `key`, `value` `[B, heads, S, d]` through PyTorch's CPU flash kernel, returning
    the output and each query row's `lse = logsumexp_j(scale q_i . k_j)` `[B, heads, S]`, differentiable in both
    without an `S x S` matrix.

    The kernel's backward takes the gradient of the output only; the lse's is folded into it exactly. The backward's
    scores see `dS_ij = P_ij (dO_i . v_j - D_i)` with `D_i = dO_i . O_i`, and the lse adds `g_i P_ij`, i.e. `D_i - g_i`
    in place of `D_i`. Padding every head with one more channel (zero in `q`, `k`, `v`; `-g_i` in `O`, 1 in `dO`)
    leaves the scores and `dO_i . v_j` unchanged and makes the kernel's `D_i` exactly `D_i - g_i`."""

    @staticmethod
    def forward(ctx, query, key, value, scale: float):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = flash(query, key, value, 0.0, False, scale=scale)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None
        ctx.scale = scale
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        import torch.nn.functional as F

        query, key, value, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        if grad_lse is None:
            grads = backward(grad_out.contiguous(), query, key, value, out, lse, 0.0, False, scale=ctx.scale)
            return (*grads, None)
        pad = [F.pad(x, (0, 1)).contiguous() for x in (query, key, value)]  # [B, heads, S, d + 1]
        out = torch.cat([out, -grad_lse[..., None].to(out.dtype)], dim=-1).contiguous()
        grad_out = torch.cat([grad_out, torch.ones_like(grad_out[..., :1])], dim=-1).contiguous()
        grads = backward(grad_out, *pad, out, lse, 0.0, False, scale=ctx.scale)
        return (*(g[..., :-1] for g in grads), None)


class JointControlProcessor:
    """Attention processor for one joint-attention module of SD3 (`text_first=False`) or FLUX (`text_first=True`)."""

    def __init__(self, original, name: str, control, text_first: bool, part: str):
        self.original, self.name, self.control = original, name, control
        self.text_first, self.part = text_first, part

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        control = self.control
        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            n_image = hidden_states.shape[1]
        elif self.text_first and control.text_length:  # FLUX's single-stream blocks: [text, image] already joined
            n_text = control.text_length
            n_image = hidden_states.shape[1] - n_text
        else:  # an image-only self-attention (SD3.5's second attention): no text keys
            n_text, n_image = 0, hidden_states.shape[1]
        cross = control.context(self.name, True, n_image, self.part) if n_text else None
        self_ctx = control.context(self.name, False, n_image, self.part)
        views = [(c, h) for c, h in ((cross, True), (self_ctx, False)) if c is not None]
        recorders = [f for f in control.recorders if control.recording and cross is not None and f.wants(cross)]
        prob_hooks = [f for f in control.prob_hooks if cross is not None and f.wants(cross)]
        logit_hooks = [(f, c) for c, _ in views for f in control.logit_hooks if f.wants(c)]
        if not (recorders or prob_hooks or logit_hooks):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if self.text_first:
            out = self._flux(
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                n_text,
                n_image,
                cross,
                recorders,
                prob_hooks,
                logit_hooks,
                **kwargs,
            )
        else:
            out = self._sd3(
                attn, hidden_states, encoder_hidden_states, n_image, cross, recorders, prob_hooks, logit_hooks
            )
        control.check_stop(self.name)
        return out

    # --- the explicit attention -------------------------------------------------------------------------------------

    #: Hooks that read or change only the text view take the lean path (no full score matrix); `False` forces the
    #: explicit one everywhere (the parity tests compare the two).
    lean = True
    #: On the CPU, the lean path takes the lse from the flash kernel (:class:`_AttentionWithLSE`); `False` computes it
    #: in chunks as on other devices (the parity tests run both).
    kernel_lse = True
    #: Elements of one chunk of image-query scores over all keys on the lean path (`[B, heads, chunk, S]`).
    chunk_elements = 1 << 24

    def _attend(self, query, key, value, mask, image, text, cross, recorders, prob_hooks, logit_hooks):
        """Attention of `query`, `key`, `value` `[B, heads, S, d]` with the hooks; `image` and `text` are the
        positions (slices) of the two kinds of tokens in the joint sequence. Returns `[B, heads, S, d]`."""
        if self.lean and mask is None and all(ctx.is_cross for _, ctx in logit_hooks):
            return self._attend_lean(query, key, value, image, text, cross, recorders, prob_hooks, logit_hooks)
        return self._attend_explicit(query, key, value, mask, image, text, cross, recorders, prob_hooks, logit_hooks)

    def _attend_lean(self, query, key, value, image, text, cross, recorders, prob_hooks, logit_hooks):
        """The same attention without the `S x S` score matrix, for hooks on the text view only: the output is SDPA's,
        the text block of the image queries' probabilities is `exp(s_txt - lse)` with `lse` (over all keys) the one
        the CPU flash kernel computes with the output (:class:`_AttentionWithLSE`), or on other devices computed in
        checkpointed chunks of image queries, and the hooks' changes reach the output exactly as a correction on
        the image queries' rows, `exp(lse - lse') out + (P' - exp(s_txt - lse')) @ V_txt`, where `lse'` is the
        normalizer after the logit hooks (`lse' = lse` without them) and `P'` the text block after the hooks. When
        the only hooks are recorders that each read some text positions (their `tokens`), only those columns of the
        text block are computed."""
        import torch.nn.functional as F

        batch, heads = query.shape[:2]
        scale = query.shape[-1] ** -0.5
        q_image, k_text, v_text = query[:, :, image], key[:, :, text], value[:, :, text]
        if self.kernel_lse and query.device.type == "cpu":  # the CPU flash kernel computes every row's lse too
            out, lse = _AttentionWithLSE.apply(query, key, value, scale)  # [B, heads, S, d], [B, heads, S]
            lse = lse[:, :, image].float()  # [B, heads, N]
        else:
            out = F.scaled_dot_product_attention(query, key, value)  # [B, heads, S, d]
            lse = self._image_lse(q_image, key, scale)  # [B, heads, N]
        wanted = [getattr(f, "tokens", None) for f in recorders]
        if recorders and not (prob_hooks or logit_hooks) and all(t is not None for t in wanted):
            # recorders only, each reading some text positions: the text view holds their union only
            cross.tokens = sorted(t for t in set().union(*wanted) if 0 <= t < k_text.shape[2])
            columns = torch.as_tensor(cross.tokens, device=key.device)
            k_text = k_text.index_select(2, columns)  # [B, heads, K, d]
        scores_text = (q_image @ k_text.transpose(-1, -2) * scale).float()  # [B, heads, N, T] (or K)
        new_scores, changed = scores_text, False
        for hook, ctx in logit_hooks:  # the text view as the UNet hooks know it: [B * heads, image queries, tokens]
            result = hook(ctx, new_scores.to(query.dtype).flatten(0, 1))
            if result is not None:
                new_scores, changed = result.unflatten(0, (batch, heads)).float(), True
        new_lse = lse
        if changed:  # the normalizer with the text block's new logits: exp(lse) - sum exp(old) + sum exp(new)
            image_part = lse + torch.log(-torch.expm1((torch.logsumexp(scores_text, -1) - lse).clamp(max=0)))
            new_lse = torch.logaddexp(image_part, torch.logsumexp(new_scores, -1))
        text_view = (new_scores - new_lse[..., None]).exp().to(query.dtype).flatten(0, 1)  # [B * heads, N, T]
        for hook in prob_hooks:
            result = hook(cross, text_view)
            if result is not None:
                text_view, changed = result, True
        for recorder in recorders:
            recorder(cross, text_view)
        if not changed:
            return out
        delta = text_view.unflatten(0, (batch, heads)).float() - (scores_text - new_lse[..., None]).exp()
        rows = (lse - new_lse).exp()[..., None] * out[:, :, image].float() + delta @ v_text.float()  # [B, heads, N, d]
        out = out.clone()
        out[:, :, image] = rows.to(out.dtype)
        return out

    def _image_lse(self, q_image, key, scale) -> torch.Tensor:
        """`logsumexp` over all keys of the image queries' scores, `[B, heads, N]` float32, a chunk of queries at a
        time; each chunk under non-reentrant checkpointing when gradients flow (its scores are recomputed in the
        backward instead of kept), unless the whole block is checkpointed already (its backward holds one block's
        chunks at a time)."""
        from torch.utils.checkpoint import checkpoint

        def chunk_lse(q, k):
            return torch.logsumexp((q @ k.transpose(-1, -2) * scale).float(), dim=-1)

        batch, heads, n = q_image.shape[:3]
        size = max(1, self.chunk_elements // max(1, batch * heads * key.shape[2]))
        grads = torch.is_grad_enabled() and (q_image.requires_grad or key.requires_grad)
        recompute = grads and not self.control.blocks_checkpointed
        parts = []
        for start in range(0, n, size):
            q = q_image[:, :, start : start + size]
            parts.append(checkpoint(chunk_lse, q, key, use_reentrant=False) if recompute else chunk_lse(q, key))
        return torch.cat(parts, dim=2)

    def _attend_explicit(self, query, key, value, mask, image, text, cross, recorders, prob_hooks, logit_hooks):
        """The explicit attention: the whole `[B, heads, S, S]` score matrix, for masks and image-view hooks."""
        batch, heads = query.shape[:2]
        scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5  # [B, heads, S, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        for hook, ctx in logit_hooks:  # each view as the UNet hooks know it: [B * heads, image queries, keys]
            keys = text if ctx.is_cross else image
            view = scores[:, :, image, keys].flatten(0, 1)
            changed = hook(ctx, view)
            if changed is not None:
                scores = scores.clone()
                scores[:, :, image, keys] = changed.unflatten(0, (batch, heads))
        probs = scores.float().softmax(dim=-1).to(query.dtype)  # over all joint keys
        if cross is not None and (prob_hooks or recorders):
            text_view = probs[:, :, image, text].flatten(0, 1)  # [B * heads, image tokens, text tokens]
            for hook in prob_hooks:
                changed = hook(cross, text_view)
                if changed is not None:
                    probs = probs.clone()
                    probs[:, :, image, text] = changed.unflatten(0, (batch, heads))
                    text_view = probs[:, :, image, text].flatten(0, 1)
            for recorder in recorders:
                recorder(cross, text_view)
        return probs @ value

    def _sd3(self, attn, hidden_states, encoder_hidden_states, n_image, cross, recorders, prob_hooks, logit_hooks):
        """diffusers' `JointAttnProcessor2_0` with the explicit attention: sequence [image, text]."""
        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            context = [
                attn.add_q_proj(encoder_hidden_states),
                attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states),
            ]
            context = [x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in context]
            if attn.norm_added_q is not None:
                context[0] = attn.norm_added_q(context[0])
            if attn.norm_added_k is not None:
                context[1] = attn.norm_added_k(context[1])
            query, key, value = (torch.cat([x, c], dim=2) for x, c in zip((query, key, value), context))
        image, text = slice(0, n_image), slice(n_image, None)
        out = self._attend(query, key, value, None, image, text, cross, recorders, prob_hooks, logit_hooks)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            n = residual.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :n], hidden_states[:, n:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _flux(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        attention_mask,
        n_text,
        n_image,
        cross,
        recorders,
        prob_hooks,
        logit_hooks,
        image_rotary_emb=None,
        **kwargs,
    ):
        """diffusers' `FluxAttnProcessor` with the explicit attention: sequence [text, image]."""
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))  # [B, S, heads, d]
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value)
            )
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        mask = None
        if attention_mask is not None:
            mask = attention_mask if attention_mask.ndim == 4 else attention_mask[:, None]
        text, image = slice(0, n_text), slice(n_text, n_text + n_image)
        out = self._attend(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            mask,
            image,
            text,
            cross,
            recorders,
            prob_hooks,
            logit_hooks,
        )
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def install_joint_control(denoiser, control, text_first: bool, part_of) -> None:
    """Puts a :class:`JointControlProcessor` on every attention module of a transformer; `part_of(name)` names the
    block kind a processor belongs to."""
    originals = denoiser.attn_processors
    denoiser.set_attn_processor(
        {
            name: JointControlProcessor(proc, name, control, text_first, part_of(name))
            for name, proc in originals.items()
        }
    )
