"""The reward interface shared by every method and trainer."""

from __future__ import annotations

import torch


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raises `ValueError` unless `images` is a float tensor `[B, 3, H, W]` with values in `[0, 1]`."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}.")
    if not images.is_floating_point():
        raise ValueError(f"`{name}` must be a float tensor in [0, 1], got dtype {images.dtype}.")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`{name}` must have shape [B, 3, H, W], got {tuple(images.shape)}.")
    if images.numel():
        lo, hi = images.detach().aminmax()
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise ValueError(f"`{name}` must lie in [0, 1], got values in [{lo.item():.4g}, {hi.item():.4g}].")


def check_scores(scores, batch_size: int, reward_name: str) -> torch.Tensor:
    """Checks what a reward returned: a tensor `[B]`; raises `ValueError` naming the reward otherwise."""
    if not isinstance(scores, torch.Tensor) or scores.shape != (batch_size,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"Reward {reward_name} must return a tensor of shape ({batch_size},), got {shape}.")
    return scores


def reward_name(reward) -> str:
    """A reward's name for messages and logs (its `name`, a function's `__name__`, or its class name)."""
    return getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__


def is_differentiable(reward) -> bool:
    """Whether gradients reach the pixels through `reward` (its `differentiable` attribute)."""
    return bool(getattr(reward, "differentiable", False))


def require_differentiable(reward, owner: str, otherwise: str = "") -> None:
    """Raises `ValueError` when `reward` does not declare itself differentiable, saying how to declare it."""
    if is_differentiable(reward):
        return
    name = reward_name(reward)
    how = (
        "set `differentiable = True` on the `Reward` subclass"
        if isinstance(reward, Reward)
        else f"mark the function with `{getattr(reward, '__name__', 'reward')}.differentiable = True`"
    )
    raise ValueError(
        f"{owner} needs a differentiable reward, and {name} does not declare itself one: if gradients "
        f"reach the pixels through it, {how}{otherwise}."
    )


def last_details(reward, batch_size: int) -> list | None:
    """What a reward that explains its scores (a `last_details` list, one entry per image, e.g.
    :class:`~ttalign.rewards.QuestionScore`'s answers to each question) said about its last call of `batch_size`
    images; `None` for a reward that keeps none."""
    details = getattr(reward, "last_details", None)
    return list(details) if isinstance(details, list) and len(details) == batch_size else None


def check_reward_prompts(reward, prompts: list[str]) -> None:
    """Raises `ValueError` for a prompt `reward` cannot score (its `check_prompts`, where it has one), before any
    image is rendered for it."""
    check = getattr(reward, "check_prompts", None)
    if callable(check):
        check(list(prompts))


class Reward(torch.nn.Module):
    """Base class of rewards: `reward(images, prompts) -> Tensor[B]`, higher is better.

    `images` are float `[B, 3, H, W]` in `[0, 1]`; `prompts` is a list of `B` strings. Subclasses implement
    `score(images, prompts)`; `__call__` validates the input first and refuses non-finite scores (a `ValueError`
    naming the images), so a NaN is never silently averaged.

    Attributes:
        differentiable (`bool`): whether gradients reach the pixels.
        native_range (`tuple[float, float]`): the typical range of the scores.
        license (`str`): the license of the model weights (or of the code, for analytic rewards).
    """

    differentiable: bool = False
    native_range: tuple[float, float] = (float("-inf"), float("inf"))
    license: str = "Apache-2.0"

    @property
    def name(self) -> str:
        return type(self).__name__

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def check_prompts(self, prompts: list[str]) -> None:
        """Raises `ValueError` for a prompt this reward cannot score (a reward that parses its prompts overrides
        this); by default every prompt is accepted."""

    def forward(self, images: torch.Tensor, prompts: list[str] | str | None = None) -> torch.Tensor:
        check_images(images)
        if prompts is None:
            prompts = [""] * images.shape[0]
        elif isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"Got {len(prompts)} prompts for {images.shape[0]} images.")
        scores = check_scores(self.score(images, list(prompts)), images.shape[0], self.name)
        bad = (~torch.isfinite(scores.detach())).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"Reward {self.name} returned non-finite scores for images {bad}: {scores.tolist()}.")
        return scores
