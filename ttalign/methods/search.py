"""Search over samples: best-of-N selection by a reward.

Best-of-N is the baseline of inference-time scaling (Ma et al. 2025, "Inference-Time Scaling for Diffusion Models
beyond Scaling Denoising Steps", https://arxiv.org/abs/2501.09732): draw N initial noises, denoise each, keep the
image the verifier scores highest. Its compute is N times a plain call, reported in `traces["compute"]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttalign.hooks import AlignmentMethod, GenerationState, Stage
from ttalign.rewards.base import check_scores, last_details, reward_name


@dataclass(eq=False)
class BestOfN(AlignmentMethod):
    """Samples `n` candidates for every requested image and returns the one with the highest reward.

    Args:
        reward (`Callable[[Tensor, list[str]], Tensor]`):
            Any reward `f(images: float [B, 3, H, W] in [0, 1], prompts: list[str]) -> Tensor[B]`, higher is
            better; differentiable or not.
        n (`int`, defaults to 4):
            Candidates per returned image.
        reward_batch_size (`int`, *optional*):
            Score at most this many candidates per reward call (all at once by default).

    With diffusers' per-image generators (`generator=[g1, g2, ...]`), image `i`'s first candidate is drawn from
    `g_i` itself (so it is the image the plain call draws) and the others from generators derived from `g_i`.

    After the call, `out.rewards` holds the winners' rewards and `out.traces["best_of_n"]` the scores of all
    candidates (`scores`, `[N, n]`), the index of each winner among its candidates (`chosen`, `[N]`) and its index
    in the sampled batch (`selected`, `[N]`); with a reward that explains its scores (`last_details`, e.g.
    `QuestionScore`'s answer to each question), the winners' explanations (`reward_details`).

    Example:

    ```py
    >>> from ttalign.methods import BestOfN
    >>> from ttalign.rewards import JpegIncompressibility
    >>> out = pipe("a red circle", alignment=[BestOfN(reward=JpegIncompressibility(), n=4)])
    ```
    """

    reward: Callable[[torch.Tensor, list[str]], torch.Tensor]
    n: int = 4
    reward_batch_size: int | None = None

    stages = (Stage.OUTPUT,)
    changes_batch = True
    costly_options = ("n",)

    def __post_init__(self):
        if not callable(self.reward):
            raise ValueError(f"BestOfN needs a callable reward, got {self.reward!r}.")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"BestOfN needs n >= 1, got n={self.n!r}.")
        if self.reward_batch_size is not None and self.reward_batch_size < 1:
            raise ValueError(f"reward_batch_size must be >= 1, got {self.reward_batch_size!r}.")

    def renders_per_image(self, num_inference_steps: int) -> float:
        return float(self.n)

    def setup(self, state: GenerationState) -> None:
        if state.user_latents is not None:
            raise ValueError("BestOfN draws its own initial noise for each candidate: do not pass `latents`.")
        if state.prompt is None:
            raise ValueError("BestOfN scores images against their prompts: pass `prompt`, not only `prompt_embeds`.")
        state.expand_generators(self.n)  # with per-image generators, each image's candidates derive from its own
        state.num_images_per_prompt *= self.n

    def on_output(self, state: GenerationState) -> None:
        images, prompts = state.images, state.image_prompts  # [N * n, 3, H, W]
        step = self.reward_batch_size or len(prompts)
        scores, details = [], []
        for start in range(0, len(prompts), step):
            size = len(prompts[start : start + step])
            chunk = self.reward(images[start : start + step], prompts[start : start + step])
            scores.append(check_scores(chunk, size, reward_name(self.reward)))
            state.reward_calls += 1
            explained = last_details(self.reward, size)
            details = None if details is None or explained is None else details + explained
        scores = torch.cat(scores).float().view(-1, self.n)  # [N, n]

        best = state.keep_best(scores, reward_name(self.reward))
        selected = state.selected
        state.traces["best_of_n"] = {"scores": scores.cpu(), "chosen": best.cpu(), "selected": selected.cpu()}
        if details is not None:
            state.traces["best_of_n"]["reward_details"] = [details[k] for k in selected.tolist()]
