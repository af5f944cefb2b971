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

    After the call, `out.traces["latents"]` is `[S, N, C, h, w]` (the latents after each recorded step),
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
            state.scratch[self]["x0"].append(x0.detach().to(self.device))

    def on_step_end(self, state: GenerationState) -> None:
        if self._records(state):
            record = state.scratch[self]
            record["latents"].append(state.latents.detach().to(self.device))
            record["timesteps"].append(int(state.timestep))

    def teardown(self, state: GenerationState) -> None:
        record = state.scratch.pop(self, None)
        if not record or not record["latents"]:
            return
        state.traces["latents"] = torch.stack(record["latents"])
        if record["x0"]:
            state.traces["x0"] = torch.stack(record["x0"])
        state.traces["timesteps"] = record["timesteps"]
