"""Attention control: Attend-and-Excite, token re-weighting and region re-weighting.

- `AttendAndExcite` (Chefer et al. 2023, https://arxiv.org/abs/2301.13826): at the early steps, moves the latents so
  that every subject token has a strong cross-attention peak somewhere. Same images as diffusers' deprecated
  Attend-and-Excite pipeline with the same settings, batched across samples, with attention maps
  materialized only in the layers at the chosen resolution.
- `TokenReweight`: `(word:1.3)` weights as in A1111 / Compel, on the token embeddings (A1111's rule) or on the
  cross-attention probabilities.
- `RegionReweight` (DenseDiffusion, Kim et al. 2023, https://arxiv.org/abs/2308.12964): modulates attention logits so
  that each phrase's tokens are attended inside its region, and pixels of one region attend to each other.

All three act through :mod:`ttalign.attention`: control processors installed for the call and restored afterwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ttalign.attention import StopForward, attention_control, sync_step, token_spans
from ttalign.hooks import AlignmentMethod, GenerationState, Stage, frozen
from ttalign.sampling import scale_model_input


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Attend-and-Excite's smoothing kernel `[size, size]`. Like the reference code, it is
    `exp(-((x - mean) / (2 sigma))^2)` (not the textbook `/ (2 sigma^2)`), normalized to sum 1."""
    grid = torch.arange(size, dtype=torch.float32)
    mean = (size - 1) / 2
    one = 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((grid - mean) / (2 * sigma)) ** 2))
    kernel = one[:, None] * one[None, :]
    return kernel / kernel.sum()


@dataclass(eq=False)
class AttendAndExcite(AlignmentMethod):
    """Attend-and-Excite with the official defaults.

    Args:
        tokens (`list[str]` or `Callable[[str], list[str]]`, *optional*): the subject words of every prompt (or a
            function giving them per prompt); mapped to token indices automatically, a word split into sub-word
            tokens counting as the sum of its tokens' maps.
        token_indices (`list[int]` or `list[list[int]]`, *optional*): explicit token indices (BOS is 0), one list
            for all prompts or one per prompt, as in diffusers' pipeline.
        max_iter_to_alter (`int`, defaults to 25): the latents are updated at steps `i < max_iter_to_alter`.
        thresholds (`dict[int, float]`, defaults to `{0: 0.05, 10: 0.5, 20: 0.8}`): at these steps, refine until
            every token's peak reaches the threshold (at most `max_refinement_steps` iterations).
        scale_factor (`float`, defaults to 20): step size `scale_factor * sqrt(linspace(1, 0.5, T)[i])`.
        attn_res (`tuple[int, int]`, *optional*): the resolution of the cross-attention maps used. By default the
            denoiser's cross-attention resolution nearest a quarter of the latents' size: 16x16 for SD 1.x at
            512 px (the reference's), 32x32 for SDXL at 1024 px.
        from_where (`tuple[str, ...]`, *optional*): the parts of the denoiser whose layers at that resolution are
            recorded; every other layer keeps its fast path. By default the family's: a UNet's `("up", "down", "mid")`
            (the reference averages all three), SD3's joint blocks `("joint",)`, FLUX's double-stream blocks
            `("double",)` (`"single"` adds the single-stream ones).
        smooth_attentions (`bool`), sigma (`float`), kernel_size (`int`): Gaussian smoothing of the maps.
        normalize_eot (`bool`, *optional*): softmax over the prompt's tokens only (drop EOT and padding), for SD 2.x
            text encoders; otherwise drop the first and last of the 77 positions, as the reference. By default the
            family's choice: off for SD 1.x/2.x (the reference), on for SDXL (padding excluded).
        max_refinement_steps (`int`, defaults to 20).
        gradient_checkpointing (`bool`, defaults to `True`): the loss passes keep only each denoiser block's inputs,
            and their backward recomputes one block at a time (the denoiser's own gradient checkpointing, for those
            passes only): peak memory near one block's activations instead of every block's, for one more forward of
            the recorded blocks per update. The images are the same either way. Either way the loss passes take the
            gradient of the latents alone: the denoiser's weights are frozen for them (no layer input is kept for a
            weight's gradient, none gets a `.grad`) and their flags are restored after.

    `out.traces["attend_and_excite"]` holds the loss of every sample at every altered step (`[steps, N]`) and the
    refinement iterations.

    Example:

    ```py
    >>> from ttalign.methods import AttendAndExcite
    >>> out = pipe("a cat and a frog", alignment=[AttendAndExcite(tokens=["cat", "frog"])])
    ```
    """

    tokens: list[str] | Callable[[str], list[str]] | None = None
    token_indices: list | None = None
    max_iter_to_alter: int = 25
    thresholds: dict = field(default_factory=lambda: {0: 0.05, 10: 0.5, 20: 0.8})
    scale_factor: float = 20.0
    attn_res: tuple | None = None
    from_where: tuple | None = None
    smooth_attentions: bool = True
    sigma: float = 0.5
    kernel_size: int = 3
    normalize_eot: bool | None = None
    max_refinement_steps: int = 20
    gradient_checkpointing: bool = True

    stages = (Stage.ATTENTION, Stage.STEP_START)
    costly_options = ("max_iter_to_alter", "max_refinement_steps")
    required_features = frozenset({"cross_attention"})

    def __post_init__(self):
        if (self.tokens is None) == (self.token_indices is None):
            raise ValueError("AttendAndExcite needs exactly one of `tokens` or `token_indices`.")
        if self.token_indices is not None:
            indices = self.token_indices
            per_prompt = isinstance(indices, (list, tuple)) and bool(indices) and isinstance(indices[0], (list, tuple))
            groups = indices if per_prompt else [indices]
            valid = isinstance(indices, (list, tuple)) and all(
                isinstance(g, (list, tuple)) and all(isinstance(i, int) and i >= 1 for i in g) for g in groups
            )
            if not valid:
                raise ValueError(
                    f"token_indices must be token positions >= 1 (one list, or one list per prompt), got "
                    f"{self.token_indices!r}."
                )
        if isinstance(self.tokens, str):
            self.tokens = [w.strip() for w in self.tokens.split("+") if w.strip()]
        if self.max_iter_to_alter < 0 or self.scale_factor <= 0 or self.max_refinement_steps < 0:
            raise ValueError(
                f"Bad AttendAndExcite settings: max_iter_to_alter={self.max_iter_to_alter}, "
                f"scale_factor={self.scale_factor}, max_refinement_steps={self.max_refinement_steps}."
            )
        if self.attn_res is not None:
            self.attn_res = tuple(self.attn_res)
        if self.from_where is not None:
            self.from_where = (self.from_where,) if isinstance(self.from_where, str) else tuple(self.from_where)
            if not self.from_where or set(self.from_where) - {"up", "down", "mid", "joint", "double", "single"}:
                raise ValueError(
                    f"from_where must name parts of the denoiser ('up', 'down', 'mid' of a UNet; 'joint' of SD3; "
                    f"'double', 'single' of FLUX), got {self.from_where!r}."
                )

    def _indices(self, state: GenerationState) -> list[list[list[int]]]:
        """Per sampled image: a list of token groups (each a list of indices)."""
        prompts = state.prompt or []
        if self.token_indices is not None:
            per_prompt = self.token_indices if isinstance(self.token_indices[0], (list, tuple)) else None
            if per_prompt is not None and len(per_prompt) != len(prompts):
                raise ValueError(f"token_indices has {len(per_prompt)} lists for {len(prompts)} prompts.")
            groups = [
                [[i] for i in (per_prompt[k] if per_prompt else self.token_indices)] for k in range(len(prompts))
            ]
        else:
            groups = []
            for prompt in prompts:
                words = self.tokens(prompt) if callable(self.tokens) else self.tokens
                groups.append(state.family.token_spans(prompt, list(words)))
        return [g for g in groups for _ in range(state.num_images_per_prompt)]

    def check_prompts(self, prompts: list[str], family=None) -> None:
        """Raises `ValueError` naming a subject word a prompt does not hold (with the family's tokenizer)."""
        if family is not None and self.tokens is not None and not callable(self.tokens):
            for prompt in prompts:
                family.token_spans(prompt, list(self.tokens))

    def on_attention(self, state: GenerationState) -> None:
        if state.prompt is None and self.token_indices is None:
            raise ValueError("AttendAndExcite with `tokens` needs `prompt` (not only `prompt_embeds`).")
        family = state.family
        control = attention_control(state)
        res = self.attn_res or self.default_resolution(family, *family.latent_grid(state.height, state.width))
        normalize_eot = self.normalize_eot
        if normalize_eot is None:
            normalize_eot = family.attention_defaults["normalize_eot"]
        parts = set(self.from_where or family.attention_defaults["from_where"])
        unknown = parts - set(family.attention_defaults["parts"])
        if unknown:
            raise ValueError(
                f"from_where names {sorted(unknown)}, which the {family.name} denoiser does not have; "
                f"its parts: {family.attention_defaults['parts']}."
            )
        if normalize_eot and state.prompt is None:
            raise ValueError("AttendAndExcite with `normalize_eot` needs `prompt` (not only `prompt_embeds`).")
        # per image: the text key positions its maps are normalized over (padding left out with normalize_eot)
        if state.prompt is None:  # explicit token indices on prompt_embeds: every position but the first and last
            positions = [family.attention_token_positions("", False)] * state.latents.shape[0]
        else:
            positions = [
                family.attention_token_positions(p, normalize_eot)
                for p in state.prompt
                for _ in range(state.num_images_per_prompt)
            ]
        store: dict = {
            "maps": [],  # (map, its columns' text positions or None for all of them) per recorded layer
            "groups": self._indices(state),
            "losses": [],
            "refinements": [],
            "res": res,
            "positions": positions,
            "layers": [],  # the layers recorded by the loss pass under way
            "last_layer": None,  # the last layer a loss pass records: later ones are skipped
        }
        state.scratch[self] = store

        class Recorder:
            #: the text positions any image's maps are normalized over: a layer may compute these columns only
            tokens = sorted(set().union(*positions))

            @staticmethod
            def wants(ctx):
                return ctx.is_cross and (ctx.height, ctx.width) == res and ctx.part in parts

            def __call__(self, ctx, probs):
                store["maps"].append((probs, ctx.tokens))
                store["layers"].append(ctx.name)

        control.recorders.append(Recorder())
        n_steps = len(state.timesteps)
        store["step_size"] = self.scale_factor * np.sqrt(np.linspace(1.0, 0.5, n_steps))
        state.traces["attend_and_excite"] = {"losses": store["losses"], "refinements": store["refinements"]}

    @staticmethod
    def default_resolution(family, latent_height: int, latent_width: int) -> tuple[int, int]:
        """The denoiser's cross-attention resolution nearest a quarter of the latents' size (larger on a tie)."""
        sizes = family.cross_attention_resolutions(latent_height, latent_width)
        if not sizes:
            raise ValueError(f"The {family.name} denoiser has no cross-attention layer: AttendAndExcite cannot run.")
        target = latent_height * latent_width / 16
        return min(sizes, key=lambda hw: (abs(math.log(hw[0] * hw[1] / target)), -hw[0] * hw[1]))

    def _max_attention(self, store: dict, rows: list[int]) -> list[torch.Tensor]:
        """The smoothed peak of every token group's map, one `[groups]` tensor per forwarded image (`rows`)."""
        recorded, store["maps"] = store["maps"], []
        # the text positions of the maps' columns: those the layers computed (`Recorder.tokens`, the same in every
        # layer that narrows; a layer that did not has those columns taken), or every position
        columns = next((c for _, c in recorded if c is not None), None)
        maps = [m if c is not None or columns is None else m[..., columns] for m, c in recorded]
        if not maps:
            raise ValueError(
                f"No cross-attention layer of {self.from_where} has resolution {store['res']}; pick another "
                "`attn_res` or `from_where`."
            )
        n = len(rows)
        per_layer = [m.reshape(n, -1, *store["res"], m.shape[-1]) for m in maps]  # [n, heads, h, w, L] each
        attention = torch.cat(per_layer, dim=1).mean(dim=1)  # [n, h, w, L], mean over heads and layers
        kernel = gaussian_kernel(self.kernel_size, self.sigma).to(attention)[None, None]
        at = {p: c for c, p in enumerate(columns or range(attention.shape[-1]))}  # text position -> map column
        out = []
        for k, row in enumerate(rows):
            positions = [p for p in store["positions"][row] if p in at]
            if columns is None and positions == list(range(positions[0], positions[-1] + 1)):
                # CLIP: a slice, as the reference
                text = torch.softmax(attention[k, :, :, positions[0] : positions[-1] + 1] * 100, dim=-1)
            else:  # several text encoders' tokens (SD3: CLIP's, then T5's), or the computed columns
                index = torch.as_tensor([at[p] for p in positions], device=attention.device)
                text = torch.softmax(attention[k, :, :, index] * 100, dim=-1)  # [h, w, tokens]
            column = {p: c for c, p in enumerate(positions)}
            peaks = []
            for group in store["groups"][row]:
                image = sum(text[:, :, column[i]] for i in group if i in column)  # [h, w]
                if self.smooth_attentions:
                    pad = self.kernel_size // 2
                    image = F.conv2d(F.pad(image[None, None], (pad,) * 4, mode="reflect"), kernel)[0, 0]
                peaks.append(image.max())
            out.append(torch.stack(peaks) if peaks else attention.new_ones(0))
        return out

    def _loss(self, state, latents, rows, t, index) -> torch.Tensor:
        """Forwards the conditional branch of `rows` with maps recorded; `[n]` losses `max_k (1 - peak_k)^+`."""
        control = state.scratch["attention_control"]
        family = state.family
        store = state.scratch[self]
        # Only the maps matter here: the forward stops after the last layer that records one, and the layers after
        # it cost neither time nor memory for the backward. The call's first loss pass finds that layer with a
        # forward of one image without gradients (cheaper than the graph of the layers after it).
        if store["last_layer"] is None:
            store["layers"] = []
            with torch.no_grad(), control.record(cfg=False, rows=rows[:1]):
                family.denoise(
                    scale_model_input(family.scheduler, latents[:1], index),
                    t,
                    state.conditioning.select(rows[:1]).positive(),
                )
            state.denoiser_calls += 1
            state.denoiser_evals += 1
            store["last_layer"] = store["layers"][-1] if store["layers"] else None
            store["maps"] = []
        store["layers"] = []
        with control.record(cfg=False, rows=rows, stop_after=store["last_layer"]):
            try:
                family.denoise(
                    scale_model_input(family.scheduler, latents, index), t, state.conditioning.select(rows).positive()
                )
            except StopForward:
                pass
        state.denoiser_calls += 1
        state.denoiser_evals += len(rows)
        losses = [
            (1.0 - p).clamp(min=0).max() if len(p) else p.new_zeros(())
            for p in self._max_attention(state.scratch[self], rows)
        ]
        return torch.stack(losses)

    @staticmethod
    def _update(latents, loss, step_size):
        """`z <- z - step_size * grad` for the images whose loss is not 0 (as the reference, which skips them)."""
        if not loss.requires_grad or not bool((loss != 0).any()):
            return latents  # no image has a subject token left to excite (images without tokens have loss 0)
        (grad,) = torch.autograd.grad(loss.sum(), latents)
        moved = latents - step_size * grad
        return torch.where((loss != 0).view((-1,) + (1,) * (latents.ndim - 1)), moved, latents)

    def extra_evaluations_per_render(self, num_inference_steps: int) -> float:
        # each latent update is a denoiser forward with gradients and its backward (three evaluations; with
        # checkpointing the recomputed forward too): one per step before `max_iter_to_alter`, and up to
        # `max_refinement_steps` (and the loss after them) per threshold step; and the first loss pass's forward
        # without gradients that finds the last layer it reads
        updates = min(self.max_iter_to_alter, num_inference_steps)
        thresholds = sum(1 for step in self.thresholds if 0 <= step < num_inference_steps)
        per_update = 4.0 if self.gradient_checkpointing else 3.0
        return per_update * (updates + thresholds * (self.max_refinement_steps + 1)) + 1.0

    def on_step_start(self, state: GenerationState) -> None:
        sync_step(state)
        i, t = state.step_index, state.timestep
        threshold = self.thresholds.get(i)
        if i >= self.max_iter_to_alter and threshold is None:
            return
        store = state.scratch[self]
        step_size = float(store["step_size"][i])
        n = state.latents.shape[0]
        rows = list(range(n))
        control = state.scratch["attention_control"]
        checkpointing = control.checkpointed(state.family.denoiser) if self.gradient_checkpointing else nullcontext()
        with torch.enable_grad(), checkpointing, frozen(state.family.denoiser):
            latents = state.latents.detach().clone().requires_grad_()
            loss = self._loss(state, latents, rows, t, i)
            iterations = [0] * n
            if threshold is not None:
                target = max(0.0, 1.0 - threshold)
                active = [r for r in rows if loss[r] > 1.0 - threshold]
                if active:  # the loss is taken again after the refinement: its graph need not stay alive meanwhile
                    loss = loss.detach()
                current = latents.detach().clone()
                while active:
                    x = current[active].requires_grad_()
                    step_loss = self._loss(state, x, active, t, i)
                    current[active] = self._update(x, step_loss, step_size).detach()
                    for r in active:
                        iterations[r] += 1
                    active = [
                        r
                        for k, r in enumerate(active)
                        if step_loss[k] > target and iterations[r] < self.max_refinement_steps
                    ]
                if any(iterations):
                    latents = current.requires_grad_()
                    loss = self._loss(state, latents, rows, t, i)
            if i < self.max_iter_to_alter:
                latents = self._update(latents, loss, step_size)
        state.latents = latents.detach()
        if not state.searching:  # a search's candidates leave the trace to the returned images
            store["losses"].append(loss.detach().cpu())
            store["refinements"].append(iterations)


_WEIGHTED = re.compile(r"\(([^():]+):\s*([0-9]*\.?[0-9]+)\s*\)|\(([^():]+)\)|\[([^\[\]]+)\]")


def parse_weighted_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111 / Compel emphasis: `"a (red:1.3) cat"` -> `("a red cat", [("red", 1.3)])`; `(word)` is x1.1 and
    `[word]` is /1.1. Raises `ValueError` on a non-positive weight."""
    weights = []

    def replace(match):
        if match.group(1) is not None:
            text, weight = match.group(1).strip(), float(match.group(2))
        elif match.group(3) is not None:
            text, weight = match.group(3).strip(), 1.1
        else:
            text, weight = match.group(4).strip(), 1 / 1.1
        if weight <= 0:
            raise ValueError(f"Token weight must be > 0, got {weight} for {text!r} in {prompt!r}.")
        weights.append((text, weight))
        return text

    return re.sub(r"\s+", " ", _WEIGHTED.sub(replace, prompt)).strip(), weights


@dataclass(eq=False)
class TokenReweight(AlignmentMethod):
    """Token weights written in the prompt, `"a (red:1.4) cat"`, as users know them from A1111 and Compel.

    The weights are stripped from the prompt before encoding. With `mode="embedding"` (A1111's rule), each weighted
    token's embedding is multiplied by its weight and the sequence rescaled to keep its mean (skipped when that mean is
    zero); with `mode="attention"`, the conditional cross-attention probabilities of the weighted tokens are multiplied
    by the weight in every layer (Prompt-to-Prompt re-weighting).

    Models with several text encoders (SDXL): in embedding mode each encoder's part of the token embeddings is weighted
    and its mean restored on its own, as A1111 does, with the weights of the prompt that encoder reads (`prompt_2`
    carries its own weights when the call gives one). The pooled embedding (SDXL's `text_embeds`, the second encoder's
    pooled output) is that of the prompt with the weight syntax removed and is not weighted, as in A1111; Compel
    leaves it unweighted too. Attention mode weights the token positions of `prompt`.

    Example:

    ```py
    >>> from ttalign.methods import TokenReweight
    >>> out = pipe("a (red:1.5) cube on a [blue] sphere", alignment=[TokenReweight()])
    ```
    """

    mode: str = "embedding"

    stages = (Stage.PROMPT, Stage.CONDITIONING, Stage.ATTENTION)

    def __post_init__(self):
        if self.mode not in ("embedding", "attention"):
            raise ValueError(f"TokenReweight mode must be 'embedding' or 'attention', got {self.mode!r}.")

    @property
    def required_features(self) -> frozenset[str]:
        return frozenset({"cross_attention"}) if self.mode == "attention" else frozenset()

    @staticmethod
    def _weights(tokenizer, parsed: list[tuple[str, list]]) -> torch.Tensor:
        """`[P, L]` weight of every token position of each parsed prompt."""
        length = tokenizer.model_max_length
        weights = []
        for text, pairs in parsed:
            w = torch.ones(length)
            spans = token_spans(tokenizer, text, [phrase for phrase, _ in pairs]) if pairs else []
            for span, (_, weight) in zip(spans, pairs):
                w[[i for i in span if i < length]] = weight
            weights.append(w)
        return torch.stack(weights)

    def on_prompt(self, state: GenerationState) -> None:
        if state.prompt is None:
            raise ValueError("TokenReweight reads weights from `prompt`; it cannot act on `prompt_embeds` alone.")
        parsed = {"prompt": [parse_weighted_prompt(p) for p in state.prompt]}
        state.prompt = [text for text, _ in parsed["prompt"]]
        streams = []  # per text encoder: its feature columns and the [P, L] weights of its prompt's tokens
        for stream in state.family.text_streams:
            key = stream.prompt_key
            if key not in parsed:
                own = state.extra_prompts.get(key)
                if own is None:  # the encoder reads `prompt`
                    parsed[key] = parsed["prompt"]
                else:
                    own = [own] * len(state.prompt) if isinstance(own, str) else list(own)
                    parsed[key] = [parse_weighted_prompt(p) for p in own]
                    state.extra_prompts[key] = [text for text, _ in parsed[key]]
            streams.append((stream.positions, stream.features, self._weights(stream.tokenizer, parsed[key])))
        state.scratch[self] = {"streams": streams}
        state.traces["token_reweight"] = {"prompts": state.prompt, "weights": [pairs for _, pairs in parsed["prompt"]]}

    @staticmethod
    def _per_image(state: GenerationState, weights: torch.Tensor) -> torch.Tensor:
        return weights.repeat_interleave(state.num_images_per_prompt, dim=0)  # [N, L]

    def on_conditioning(self, state: GenerationState) -> None:
        if self.mode != "embedding":
            return
        embeds = state.prompt_embeds  # [N, L, D]
        parts, blocks = [], []
        for positions, features, weights in state.scratch[self]["streams"]:
            part = embeds[:, positions, features]  # [N, l, d]: one text encoder's block
            if part.numel() == 0:  # an encoder whose features the family's layout drops
                continue
            w = self._per_image(state, weights).to(part)[:, : part.shape[1], None]  # [N, L, 1]
            original_mean = part.float().mean(dim=(1, 2), keepdim=True)  # [N, 1, 1]
            weighted = part.float() * w
            new_mean = weighted.mean(dim=(1, 2), keepdim=True)
            # A1111 restores the mean; a (near) zero-mean sequence has no mean to restore, and is left as weighted
            scale = torch.where(
                new_mean.abs() > 1e-6 * part.float().std(), original_mean / new_mean, torch.ones_like(new_mean)
            )
            parts.append((weighted * scale).to(embeds.dtype))
            blocks.append((positions, features))
        if len(parts) == 1 and blocks[0] == (slice(None), slice(None)):
            state.prompt_embeds = parts[0]
            return
        out = embeds.clone()  # several encoders: each writes its block (SDXL's columns, SD3's CLIP and T5 rows)
        for part, (positions, features) in zip(parts, blocks):
            out[:, positions, features] = part
        state.prompt_embeds = out

    def on_attention(self, state: GenerationState) -> None:
        if self.mode != "attention":
            return
        control = attention_control(state)
        length = state.prompt_embeds.shape[1]
        keys = torch.ones(state.scratch[self]["streams"][0][2].shape[0], length)  # [P, L]: the weight of each key
        for positions, _, weights in state.scratch[self]["streams"]:
            block = keys[:, positions]
            keys[:, positions] = weights[:, : block.shape[1]]
        weights = self._per_image(state, keys).to(state.device)  # [N, L]

        class Scale:
            @staticmethod
            def wants(ctx):
                return ctx.is_cross

            def __call__(self, ctx, probs):
                w = ctx.per_image(weights)  # [n, L], the images of this UNet batch
                heads = ctx.heads(probs.shape[0], w.shape[0])
                w = w[:, : probs.shape[-1]].to(probs.dtype).repeat_interleave(heads, dim=0)[:, None, :]
                if ctx.cfg:  # [uncond; cond]: only the conditional half is re-weighted
                    w = torch.cat([torch.ones_like(w), w])
                return probs * w

        control.prob_hooks.append(Scale())


def _region_mask(region, height: int, width: int, device) -> torch.Tensor:
    """A region -> a float mask `[height, width]`: a box `(x0, y0, x1, y1)` in `[0, 1]` image fractions, or a mask
    tensor / array `[H, W]` (resized, nearest)."""
    if isinstance(region, (tuple, list)) and len(region) == 4:
        x0, y0, x1, y1 = (float(v) for v in region)
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(
                f"A box must be (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {region}."
            )
        ys = (torch.arange(height, device=device) + 0.5) / height
        xs = (torch.arange(width, device=device) + 0.5) / width
        return ((ys[:, None] >= y0) & (ys[:, None] < y1) & (xs[None] >= x0) & (xs[None] < x1)).float()
    mask = torch.as_tensor(np.asarray(region), dtype=torch.float32, device=device)
    if mask.ndim != 2:
        raise ValueError(f"A region mask must be 2-D [H, W], got shape {tuple(mask.shape)}.")
    return (F.interpolate(mask[None, None], size=(height, width), mode="nearest")[0, 0] > 0.5).float()


def densediffusion_modulate(scores: torch.Tensor, positive: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """DenseDiffusion's logit modulation: where `positive`, raise each logit towards its row's maximum, elsewhere lower
    it towards the row's minimum, by the fraction `strength`.

    `scores` `[..., q, k]` scaled attention logits; `positive` (0 / 1) and `strength` (weight x time weight x
    `1 - area` of the query pixel's region) broadcastable to them.
    """
    hi, lo = scores.max(-1, keepdim=True).values, scores.min(-1, keepdim=True).values  # [..., q, 1] each
    return scores + positive * strength * (hi - scores) - (1 - positive) * strength * (scores - lo)


@dataclass(eq=False)
class RegionReweight(AlignmentMethod):
    """DenseDiffusion's region control ([arXiv 2308.12964](https://arxiv.org/abs/2308.12964)): each phrase is drawn
    inside its region by modulating the attention logits of the conditional branch.

    During the first `stop` fraction of the steps, with time weight `(t / 1000)^time_power`, and scaled for every pixel
    by `1 - size_weight * area` of its region:
    - cross-attention: a pixel's logits for the tokens of the phrases whose region holds it are raised towards the row
      maximum, and its logits for every other token (start, end and padding tokens included) are lowered towards the
      row minimum, with `cross_weight`;
    - self-attention: logits between pixels that share a region are raised, all others lowered, with `self_weight`.
    Pixels outside every region get the lowering only. With `encode_phrases`, each phrase's tokens take the embeddings
    of the phrase encoded on its own, so that words of one phrase do not colour the other's: the reference does this
    for SD 1.5 and keeps the prompt's own embeddings (`encode_phrases=False`) for other models. Prompts of the batch
    without regions are left alone.

    Args:
        regions (`dict[str, box or mask]` or `Callable[[str], dict]`): phrase -> box `(x0, y0, x1, y1)` in `[0, 1]`
            fractions of the image, or a `[H, W]` mask; or a function giving that dict per prompt.
        cross_weight (`float`, defaults to 1.0), self_weight (`float`, defaults to 0.3).
        size_weight (`float`, defaults to 1.0): the mask-area adaptive adjustment.
        stop (`float`, defaults to 0.3): the fraction of the steps modulated.
        time_power (`float`, defaults to 5).
        encode_phrases (`bool`, defaults to `True`): the reference's setting for SD 1.5 (see above).

    Example:

    ```py
    >>> from ttalign.methods import RegionReweight
    >>> regions = {"a red circle": (0.0, 0.0, 0.5, 1.0), "a blue square": (0.5, 0.0, 1.0, 1.0)}
    >>> out = pipe("a red circle left of a blue square", alignment=[RegionReweight(regions=regions)])
    ```
    """

    regions: dict | Callable[[str], dict]
    cross_weight: float = 1.0
    self_weight: float = 0.3
    size_weight: float = 1.0
    stop: float = 0.3
    time_power: float = 5.0
    encode_phrases: bool = True

    stages = (Stage.CONDITIONING, Stage.ATTENTION, Stage.STEP_START)
    required_features = frozenset({"cross_attention"})

    def __post_init__(self):
        if not (callable(self.regions) or isinstance(self.regions, dict)):
            raise ValueError(
                f"regions must be a dict phrase -> box/mask or a function of the prompt, got {self.regions!r}."
            )
        if not 0 <= self.stop <= 1:
            raise ValueError(f"stop must be in [0, 1], got {self.stop!r}.")

    def check_prompts(self, prompts: list[str], family=None) -> None:
        """Raises `ValueError` naming a phrase a prompt does not hold (with the family's tokenizer)."""
        if family is not None and not callable(self.regions):
            for prompt in prompts:
                family.token_spans(prompt, list(self.regions))

    def _layout(self, state: GenerationState) -> list[tuple[list[str], list[list[int]], list]]:
        """Per prompt: its phrases, their token spans and their regions (cached for the call)."""
        if self not in state.scratch:
            if state.prompt is None:
                raise ValueError("RegionReweight maps phrases to tokens: pass `prompt`.")
            layout = []
            for prompt in state.prompt:
                regions = self.regions(prompt) if callable(self.regions) else self.regions
                spans = state.family.token_spans(prompt, list(regions)) if regions else []
                layout.append((list(regions), spans, list(regions.values())))
            state.scratch[self] = layout
        return state.scratch[self]

    def on_conditioning(self, state: GenerationState) -> None:
        layout = self._layout(state)
        if not self.encode_phrases or not any(phrases for phrases, _, _ in layout):
            return
        family, n = state.family, state.num_images_per_prompt
        embeds = state.prompt_embeds.clone()  # [P * n, L, D]
        for p, (phrases, spans, _) in enumerate(layout):
            if not phrases:
                continue
            alone = family.encode_prompt(
                phrases, state.device, clip_skip=state.clip_skip, **state.encode_options
            ).prompt_embeds  # [R, L, D]
            for r, span in enumerate(spans):
                # the phrase's own positions when it is encoded alone (after CLIP's start token; T5 has none)
                own = family.token_spans(phrases[r], [phrases[r]])[0]
                keep = [k for k, i in enumerate(span) if i < embeds.shape[1] and k < len(own)]
                embeds[p * n : (p + 1) * n, [span[k] for k in keep]] = alone[r, [own[k] for k in keep]].to(embeds)
        state.prompt_embeds = embeds

    def on_attention(self, state: GenerationState) -> None:
        layout = self._layout(state)
        if not any(phrases for phrases, _, _ in layout):
            return  # no prompt of this call has regions: nothing to modulate, the fast path stays
        control = attention_control(state)
        device, n_images = state.device, state.num_images_per_prompt
        per_image = [(spans, regions) for _, spans, regions in layout for _ in range(n_images)]
        n_steps, cache = len(state.timesteps), {}
        method = self

        def masks(h, w, length):
            """Cross `[N, hw, L]` and self `[N, hw, hw]` positives and the `[N, hw, 1]` size factor (0 for images
            without regions), cached per resolution."""
            key = (h, w, length)
            if key not in cache:
                n = len(per_image)
                cross = torch.zeros(n, h * w, length, device=device)
                same = torch.zeros(n, h * w, h * w, device=device)
                active = torch.zeros(n, 1, 1, device=device)
                for b, (spans, regions) in enumerate(per_image):
                    for span, region in zip(spans, regions):
                        mask = _region_mask(region, h, w, device).flatten()  # [hw]
                        cols = [i for i in span if i < length]
                        cross[b][:, cols] = torch.maximum(cross[b][:, cols], mask[:, None])
                        same[b] += mask[:, None] * mask[None, :]
                        active[b] = 1.0
                area = same.sum(-1, keepdim=True) / (h * w)  # [N, hw, 1]: the area of each pixel's region(s)
                size = (1 - method.size_weight * area) * active
                cache[key] = (cross, (same > 0).float(), size)
            return cache[key]

        class Modulate:
            @staticmethod
            def wants(ctx):
                weight = method.cross_weight if ctx.is_cross else method.self_weight  # 0: the view stays as it is
                return weight != 0 and ctx.step_index < method.stop * n_steps and ctx.timestep is not None

            def __call__(self, ctx, scores):
                cross, same, size = (ctx.per_image(m) for m in masks(ctx.height, ctx.width, scores.shape[-1]))
                n = size.shape[0]  # the images of this UNet batch
                heads = ctx.heads(scores.shape[0], n)
                cond = scores[-n * heads :].unflatten(0, (n, heads))  # the conditional branch, [n, heads, q, k]
                treg = (float(ctx.timestep) / 1000) ** method.time_power
                # the masks broadcast over the heads, [n, 1, q, k] and [n, 1, q, 1]: no copy per head
                positive = (cross if ctx.is_cross else same)[:, None]
                weight = method.cross_weight if ctx.is_cross else method.self_weight
                strength = size[:, None] * (weight * treg)
                cond = densediffusion_modulate(cond, positive, strength).flatten(0, 1)  # [n * heads, q, k]
                return torch.cat([scores[: scores.shape[0] - cond.shape[0]], cond])

        control.logit_hooks.append(Modulate())

    def on_step_start(self, state: GenerationState) -> None:
        sync_step(state)
