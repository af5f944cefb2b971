"""The preference loop: judgments between images, and the statistics that compare methods, checkpoints and rewards
on them (win rates, Elo ratings with bootstrap intervals, a reward's agreement with the labels)."""

from .stats import Judgment, agreement, elo_ratings, win_rates

__all__ = ["Judgment", "agreement", "elo_ratings", "win_rates"]
