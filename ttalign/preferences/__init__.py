"""The preference loop: judgments between images, and the statistics that compare methods, checkpoints and rewards
on them (win rates, Elo ratings with bootstrap intervals, a reward's agreement with the labels)."""

from .readers import (
    RichFeedback,
    read_diffusiondb_prompts,
    read_hpdv2,
    read_imagerewarddb,
    read_pickapic,
    read_preference_set,
    read_richhf,
    richhf_pairs,
)
from .stats import Judgment, agreement, elo_ratings, win_rates
from .store import JudgmentStore

__all__ = [
    "Judgment",
    "JudgmentStore",
    "RichFeedback",
    "agreement",
    "elo_ratings",
    "read_diffusiondb_prompts",
    "read_hpdv2",
    "read_imagerewarddb",
    "read_pickapic",
    "read_preference_set",
    "read_richhf",
    "richhf_pairs",
    "win_rates",
]
