"""Win rates, Elo ratings and a reward's agreement with judgments, against hand computations and simulated
judges."""

import math

import numpy as np
import pytest

from ttalign.preferences import Judgment, agreement, elo_ratings, win_rates


def test_win_rates_count_ties_as_half_and_bootstrap_around_the_rate():
    judgments = [Judgment("p", "a", "b", "left")] * 6 + [Judgment("p", "b", "a", "left")] * 2
    judgments += [Judgment("p", "a", "b", "tie"), Judgment("p", "a", "b", "both_bad")]
    rates = win_rates(judgments, bootstrap=500)
    r = rates[("a", "b")]
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (6, 2, 2, 10)
    assert r["rate"] == pytest.approx((6 + 1) / 10)
    low, high = r["interval"]
    assert low < 0.7 < high and 0.3 < low and high <= 1.0


def test_elo_of_two_systems_is_the_log_odds_on_elo_scale():
    judgments = [Judgment("p", "a", "b", "left")] * 30 + [Judgment("p", "a", "b", "right")] * 10
    ratings = elo_ratings(judgments, bootstrap=200)
    gap = ratings["a"]["elo"] - ratings["b"]["elo"]
    assert gap == pytest.approx(400 * math.log10(30 / 10), rel=1e-4)  # 3:1 odds
    assert (ratings["a"]["elo"] + ratings["b"]["elo"]) / 2 == pytest.approx(1000)
    assert ratings["a"]["games"] == 40
    low, high = ratings["a"]["interval"]
    assert low < ratings["a"]["elo"] < high


def test_elo_recovers_the_order_of_simulated_strengths():
    rng = np.random.default_rng(0)
    strength = {"base": 0.0, "dpo": 0.5, "raft": 1.0, "best_of_8": 2.0}
    names = list(strength)
    judgments = []
    for _ in range(2000):
        a, b = rng.choice(names, 2, replace=False)
        p = 1 / (1 + math.exp(-(strength[a] - strength[b])))
        u = rng.random()
        choice = "tie" if abs(u - p) < 0.03 else ("left" if u < p else "right")
        judgments.append(Judgment("p", str(a), str(b), choice))
    ratings = elo_ratings(judgments, bootstrap=100)
    assert sorted(names, key=lambda s: ratings[s]["elo"]) == names
    scale = 400 / math.log(10)
    fitted_gap = ratings["best_of_8"]["elo"] - ratings["base"]["elo"]
    assert abs(fitted_gap - 2.0 * scale) < 0.2 * scale
    for s in names:  # the interval is a real one around the estimate
        low, high = ratings[s]["interval"]
        assert low <= ratings[s]["elo"] <= high and high - low > 1


def test_agreement_and_pickscore_tie_aware_accuracy():
    left = [0.9, 0.2, 0.5, 0.5, 0.40]
    right = [0.1, 0.8, 0.5, 0.9, 0.41]
    choices = ["left", "left", "right", "tie", "tie"]
    out = agreement(left, right, choices, tie_threshold=0.05)
    # decided: right, wrong, equal scores (half) -> 1.5 / 3
    assert out["accuracy"] == pytest.approx(0.5) and out["n_decided"] == 3 and out["n"] == 5
    # tie-aware: 1 + 0 + 0 (equal scores call a tie, the people did not) + 0 (gap 0.4) + 1 (gap 0.01) = 2 / 5
    assert out["tie_aware_accuracy"] == pytest.approx(0.4)


def test_bad_judgments_are_refused():
    with pytest.raises(ValueError, match="choice"):
        Judgment("p", "a", "b", "middle")
    with pytest.raises(ValueError, match="two systems"):
        Judgment("p", "a", "a", "left")
    with pytest.raises(ValueError, match="No judgments"):
        elo_ratings([])
    with pytest.raises(ValueError, match="choices"):
        agreement([1.0], [0.0, 1.0], ["left"])
