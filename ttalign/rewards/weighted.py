"""A weighted sum of rewards, each normalized, each component logged."""

from __future__ import annotations

import torch

from .base import Reward, check_reward_prompts, check_scores

NORMALIZATIONS = ("none", "affine", "zscore")

#: ReNO's weights (Eyring et al. 2024, https://arxiv.org/abs/2406.04312) on the raw scores: its losses are
#: `5 (1 - HPSv2.1)`, `1 (2 - ImageReward)`, `0.01 (100 - 100 cos_CLIP)` and `0.05 (30 - PickScore)`; as a reward to
#: maximize, the constants drop out of every gradient and ranking.
RENO_WEIGHTS = {"hps": 5.0, "image_reward": 1.0, "clip": 0.01, "pickscore": 0.05}
#: The CLIP model of ReNO's CLIP term.
RENO_CLIP = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class WeightedReward(Reward):
    """`sum_i w_i * norm_i(r_i(images, prompts))`.

    Args:
        components (`list[tuple[reward, float]]`): rewards and their weights.
        normalization (`str`): `"none"`; `"affine"` maps each reward's `native_range` to `[0, 1]`; `"zscore"`
            subtracts a running mean and divides by a running standard deviation (updated on every call,
            momentum `momentum`).

    `last_components` holds each component's raw scores of the last call, for logging.
    """

    def __init__(self, components, normalization: str = "none", momentum: float = 0.9):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
        if not components:
            raise ValueError("WeightedReward needs at least one (reward, weight) pair.")
        for reward, weight in components:
            if not callable(reward) or not isinstance(weight, (int, float)):
                raise ValueError(
                    f"Components must be (callable reward, float weight) pairs, got {(reward, weight)!r}."
                )
        self.components = list(components)
        self.normalization, self.momentum = normalization, momentum
        self.differentiable = all(getattr(r, "differentiable", False) for r, _ in self.components)
        self._stats: dict[int, tuple[float, float]] = {}
        self.last_components: dict[str, torch.Tensor] = {}

    @classmethod
    def reno(cls, hps=None, image_reward=None, clip=None, pickscore=None, device: str | None = None):
        """ReNO's reward: `5 HPSv2.1 + ImageReward + 0.01 CLIPScore + 0.05 PickScore` (see `RENO_WEIGHTS`).

        Components left as `None` are loaded from the hub (HPSv2.1, ImageReward, CLIPScore on `RENO_CLIP`,
        PickScore); pass loaded rewards to reuse them or to run offline.
        """
        from .clip import CLIPScore, PickScore
        from .hps import HPSv2
        from .image_reward import ImageReward

        hps = hps if hps is not None else HPSv2.from_pretrained("v2.1", device=device)
        image_reward = image_reward if image_reward is not None else ImageReward.from_pretrained(device=device)
        clip = clip if clip is not None else CLIPScore.from_pretrained(RENO_CLIP, device=device)
        pickscore = pickscore if pickscore is not None else PickScore.from_pretrained(device=device)
        parts = {"hps": hps, "image_reward": image_reward, "clip": clip, "pickscore": pickscore}
        return cls([(parts[k], w) for k, w in RENO_WEIGHTS.items()], normalization="none")

    @staticmethod
    def _name(reward) -> str:
        return getattr(reward, "name", None) or getattr(reward, "__name__", type(reward).__name__)

    def _normalize(self, i: int, reward, scores: torch.Tensor) -> torch.Tensor:
        if self.normalization == "affine":
            lo, hi = getattr(reward, "native_range", (float("-inf"), float("inf")))
            if not (torch.isfinite(torch.tensor([lo, hi])).all() and hi > lo):
                raise ValueError(
                    f"Affine normalization needs a finite native_range, {self._name(reward)} has {(lo, hi)}."
                )
            return (scores - lo) / (hi - lo)
        if self.normalization == "zscore":
            mean, std = scores.detach().mean().item(), scores.detach().std().item() if len(scores) > 1 else 1.0
            if i in self._stats:
                old_mean, old_std = self._stats[i]
                mean = self.momentum * old_mean + (1 - self.momentum) * mean
                std = self.momentum * old_std + (1 - self.momentum) * std
            self._stats[i] = (mean, std)
            return (scores - mean) / max(std, 1e-6)
        return scores

    def check_prompts(self, prompts: list[str]) -> None:
        for reward, _ in self.components:
            check_reward_prompts(reward, prompts)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = 0
        self.last_components = {}
        for i, (reward, weight) in enumerate(self.components):
            scores = check_scores(reward(images, prompts), images.shape[0], self._name(reward))
            if not torch.isfinite(scores).all():
                raise ValueError(f"Reward {self._name(reward)} returned non-finite scores: {scores.tolist()}.")
            self.last_components[f"{i}:{self._name(reward)}"] = scores.detach().cpu()
            total = total + weight * self._normalize(i, reward, scores.float())
        return total
