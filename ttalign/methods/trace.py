"""Trajectory recording: the latents and x0 predictions of every denoising step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttalign.hooks import AlignmentMethod, GenerationState, Stage


@dataclass(eq=False)
class TraceLatents(AlignmentMethod):
    """Records per-step latents and x0 (Tweedie) predictions into `out.traces`.

    Args:
        every (`int`, defaults to 1):
            Record every `every`-th step (the last step is always recorded).
        x0 (`bool`, defaults to `True`):
            Also record the x0 prediction of the guided noise prediction at each recorded step.
        device (`str`, defaults to `"cpu"`):
            Where the recorded tensors are kept.

    After the call, `out.traces["latents"]` is `[S, N, C, h, w]` (the latents after each recorded step, unpacked
    for families that pack them into tokens),
    `out.traces["x0"]` is `[S, N, C, h, w]` and `out.traces["timesteps"]` the `S` timesteps. They cover every
    sampled latent; when a selection method ran, `out.traces["best_of_n"]["selected"]` maps outputs to rows.
    """

    every: int = 1
    x0: bool = True
    device: str = "cpu"

    stages = (Stage.NOISE_PRED, Stage.STEP_END)

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"TraceLatents needs every >= 1, got every={self.every!r}.")

    def _records(self, state: GenerationState) -> bool:
        last = len(state.timesteps) - 1
        return state.step_index % self.every == 0 or state.step_index == last

    def setup(self, state: GenerationState) -> None:
        state.scratch[self] = {"latents": [], "x0": [], "timesteps": []}

    def on_noise_pred(self, state: GenerationState) -> None:
        if self.x0 and self._records(state):
            x0 = state.family.predict_x0(state.noise_pred, state.timestep, state.latents)
            x0 = state.family.unpack_latents(x0, state.height, state.width)
            state.scratch[self]["x0"].append(x0.detach().to(self.device))

    def on_step_end(self, state: GenerationState) -> None:
        if self._records(state):
            record = state.scratch[self]
            latents = state.family.unpack_latents(state.latents, state.height, state.width)
            record["latents"].append(latents.detach().to(self.device))
            record["timesteps"].append(int(state.timestep))

    def teardown(self, state: GenerationState) -> None:
        record = state.scratch.pop(self, None)
        if not record or not record["latents"]:
            return
        state.traces["latents"] = torch.stack(record["latents"])
        if record["x0"]:
            state.traces["x0"] = torch.stack(record["x0"])
        state.traces["timesteps"] = record["timesteps"]


@dataclass(eq=False)
class PreviewX0(AlignmentMethod):
    """Hands previews of the images to `callback` during the call: at the steps `at`, the x0 (Tweedie) prediction of
    the guided noise prediction is decoded (one VAE decode per preview, counted in the compute trace) and passed as
    `callback(step_index, images)`, images float `[N, 3, H, W]` in `[0, 1]`. The call's images are unchanged.

    Args:
        at (`tuple[int, ...]`): the step indices to preview.
        callback (`Callable[[int, Tensor], None]`): receives each preview (the server streams them).
    """

    at: tuple = ()
    callback: object = None

    stages = (Stage.NOISE_PRED,)

    def __post_init__(self):
        if not callable(self.callback):
            raise ValueError(f"PreviewX0 needs a callable callback, got {self.callback!r}.")
        self.at = tuple(int(i) for i in self.at)

    @staticmethod
    def evenly(count: int, num_steps: int) -> tuple[int, ...]:
        """`count` preview steps spread over `num_steps` steps (never the last: the final image follows)."""
        if count <= 0 or num_steps < 2:
            return ()
        return tuple(sorted({round((k + 1) * (num_steps - 1) / (count + 1)) for k in range(count)}))

    def on_noise_pred(self, state: GenerationState) -> None:
        if state.step_index not in self.at:
            return
        family = state.family
        x0 = family.predict_x0(state.noise_pred, state.timestep, state.latents)
        images = (family.decode(x0, state.height, state.width).float() / 2 + 0.5).clamp(0, 1)
        state.vae_decodes += x0.shape[0]
        self.callback(state.step_index, images)
