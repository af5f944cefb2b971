"""Comparing methods or checkpoints from pairwise judgments.

- :func:`win_rates`: for every pair of systems, wins, losses and ties and the win rate `(wins + ties / 2) / n` with a
  95% bootstrap interval (judgments resampled with replacement).
- :func:`elo_ratings`: Bradley-Terry strengths fitted by maximum likelihood (ties count half a win each way), on
  Elo's scale (`400 / ln 10` per unit of log-strength, the mean rating at 1000), with 95% bootstrap intervals: the
  way Chatbot Arena turned its online Elo into a fitted one, since the fit does not depend on the order of the
  judgments.
- :func:`agreement`: how often a reward prefers the image people preferred (pairs with a winner), and the tie-aware
  accuracy PickScore reports (a tie judged right when the reward's scores differ by less than a threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CHOICES = ("left", "right", "tie", "both_bad")


@dataclass(frozen=True)
class Judgment:
    """One comparison: the systems (methods, checkpoints, models) that made the `left` and `right` images of
    `prompt`, and the `choice`: `"left"`, `"right"`, `"tie"` or `"both_bad"` (a tie for the statistics)."""

    prompt: str
    left: str
    right: str
    choice: str

    def __post_init__(self):
        if self.choice not in CHOICES:
            raise ValueError(f"Judgment choice must be one of {CHOICES}, got {self.choice!r}.")
        if self.left == self.right:
            raise ValueError(f"A judgment compares two systems, got {self.left!r} on both sides.")

    @property
    def score(self) -> float:
        """1 when the left system won, 0 when the right one did, 0.5 otherwise."""
        return {"left": 1.0, "right": 0.0}.get(self.choice, 0.5)


def _check(judgments: Sequence[Judgment]) -> list[Judgment]:
    judgments = list(judgments)
    if not judgments:
        raise ValueError("No judgments to compare.")
    for j in judgments:
        if not isinstance(j, Judgment):
            raise TypeError(f"Expected Judgment records, got {type(j).__name__}.")
    return judgments


def _interval(values: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def win_rates(judgments: Sequence[Judgment], bootstrap: int = 1000, seed: int = 0) -> dict[tuple[str, str], dict]:
    """`{(a, b): {"wins", "losses", "ties", "n", "rate", "interval"}}` for every pair of systems judged against each
    other, `a < b` by name, from `a`'s side."""
    judgments = _check(judgments)
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[float]] = {}
    for j in judgments:
        a, b = sorted((j.left, j.right))
        groups.setdefault((a, b), []).append(j.score if j.left == a else 1 - j.score)
    out = {}
    for pair, scores in sorted(groups.items()):
        s = np.asarray(scores)  # [n], a's score per judgment
        samples = s[rng.integers(0, len(s), (bootstrap, len(s)))].mean(1)
        out[pair] = {
            "wins": int((s == 1).sum()),
            "losses": int((s == 0).sum()),
            "ties": int((s == 0.5).sum()),
            "n": len(s),
            "rate": float(s.mean()),
            "interval": _interval(samples),
        }
    return out


def _bradley_terry(left: np.ndarray, right: np.ndarray, score: np.ndarray, n: int, iters: int = 200) -> np.ndarray:
    """Log-strengths `[n]` (mean 0) maximizing `sum s log sigma(t_l - t_r) + (1 - s) log sigma(t_r - t_l)` by Newton's
    method, with a small ridge (1e-6) so that a system that never lost stays finite."""
    theta = np.zeros(n)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(theta[left] - theta[right])))  # [J]
        grad = np.zeros(n)
        np.add.at(grad, left, score - p)
        np.add.at(grad, right, p - score)
        w = p * (1 - p)
        hess = np.zeros((n, n))
        np.add.at(hess, (left, left), w)
        np.add.at(hess, (right, right), w)
        np.add.at(hess, (left, right), -w)
        np.add.at(hess, (right, left), -w)
        grad -= 1e-6 * theta
        hess += 1e-6 * np.eye(n)
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        theta += step
        theta -= theta.mean()
        if np.abs(step).max() < 1e-10:
            break
    return theta


def elo_ratings(
    judgments: Sequence[Judgment], bootstrap: int = 1000, seed: int = 0, base: float = 1000.0
) -> dict[str, dict]:
    """`{system: {"elo", "interval", "games"}}`: fitted Bradley-Terry strengths on Elo's scale (a 400-point gap is
    10:1 odds), mean `base`, with 95% bootstrap intervals."""
    judgments = _check(judgments)
    systems = sorted({s for j in judgments for s in (j.left, j.right)})
    index = {s: i for i, s in enumerate(systems)}
    left = np.array([index[j.left] for j in judgments])
    right = np.array([index[j.right] for j in judgments])
    score = np.array([j.score for j in judgments])
    scale = 400 / math.log(10)
    fitted = base + scale * _bradley_terry(left, right, score, len(systems))
    rng = np.random.default_rng(seed)
    samples = np.empty((bootstrap, len(systems)))
    for b in range(bootstrap):
        rows = rng.integers(0, len(judgments), len(judgments))
        samples[b] = base + scale * _bradley_terry(left[rows], right[rows], score[rows], len(systems), iters=50)
    games = np.bincount(np.concatenate([left, right]), minlength=len(systems))
    return {
        s: {"elo": float(fitted[i]), "interval": _interval(samples[:, i]), "games": int(games[i])}
        for i, s in enumerate(systems)
    }


def agreement(
    scores_left: Sequence[float], scores_right: Sequence[float], choices: Sequence[str], tie_threshold: float = 0.0
) -> dict:
    """A reward's agreement with judgments, from its scores of each judgment's left and right image:

    - `accuracy`: on the judgments with a winner, the share where the reward scores the winner higher (equal scores
      count one half);
    - `tie_aware_accuracy`: on all judgments, PickScore's measure: a winner judged right as above, a tie (or both
      bad) judged right when the scores differ by no more than `tie_threshold`;
    - `n`, `n_decided`.
    """
    left, right = np.asarray(scores_left, float), np.asarray(scores_right, float)
    if not len(left) == len(right) == len(choices):
        raise ValueError(f"Got {len(left)} left scores, {len(right)} right scores and {len(choices)} choices.")
    for c in choices:
        if c not in CHOICES:
            raise ValueError(f"Judgment choice must be one of {CHOICES}, got {c!r}.")
    choices = np.asarray(choices)
    diff = left - right
    decided = np.isin(choices, ("left", "right"))
    sign = np.where(choices == "left", 1.0, -1.0)
    right_call = np.where(diff * sign > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
    tie_right = (np.abs(diff) <= tie_threshold).astype(float)
    tie_aware = np.where(decided, np.where(np.abs(diff) <= tie_threshold, 0.0, right_call), tie_right)
    return {
        "accuracy": float(right_call[decided].mean()) if decided.any() else float("nan"),
        "tie_aware_accuracy": float(tie_aware.mean()) if len(tie_aware) else float("nan"),
        "n": int(len(choices)),
        "n_decided": int(decided.sum()),
    }
