"""Threshold selection guarantees the sensitivity target on constructed data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InputError
from evaluation.bootstrap import clopper_pearson_lower
from evaluation.operating_points import choose_thresholds, min_positives_needed


def test_min_positives_for_95_at_95() -> None:
    assert min_positives_needed(0.95, 0.95) == 59
    assert clopper_pearson_lower(59, 59, 0.95) >= 0.95 > clopper_pearson_lower(58, 58, 0.95)


def _data(seed: int, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = np.concatenate([rng.beta(5, 2, n_pos), rng.beta(2, 5, n_neg)])
    y = np.concatenate([np.ones(n_pos, bool), np.zeros(n_neg, bool)])
    return s, y


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_pos=st.integers(60, 300), n_neg=st.integers(5, 300))
def test_soon_meets_target_with_confidence(seed: int, n_pos: int, n_neg: int) -> None:
    s, y = _data(seed, n_pos, n_neg)
    c = choose_thresholds(s, y, target_sensitivity=0.95, confidence=0.95)
    caught = int(np.sum(s[y] >= c.thresholds.soon))
    assert c.meets_target
    assert clopper_pearson_lower(caught, n_pos, 0.95) >= 0.95
    assert c.sensitivity_soon_lower >= 0.95
    assert 0.0 <= c.thresholds.soon <= c.thresholds.urgent <= 1.0
    # urgent rule: specificity at least the stated point
    assert np.mean(s[~y] < c.thresholds.urgent) >= 0.90
    # soon is the highest such threshold: the next positive up would break the bound
    higher = np.unique(s[y][s[y] > c.thresholds.soon])
    if higher.size:
        assert clopper_pearson_lower(int(np.sum(s[y] >= higher.min())), n_pos, 0.95) < 0.95 or (
            higher.min() > c.thresholds.soon and int(np.sum(s[y] >= higher.min())) == caught
        )


def test_soon_is_tight_on_a_constructed_ranking() -> None:
    # 100 positives at 0.01..1.00, 100 negatives at 0.005..0.5: the bound is met first when
    # k positives are caught with lower(k, 100) >= 0.95, i.e. k = 99
    pos = np.arange(1, 101) / 100
    neg = np.arange(1, 101) / 200
    s, y = np.concatenate([pos, neg]), np.concatenate([np.ones(100, bool), np.zeros(100, bool)])
    k = next(k for k in range(1, 101) if clopper_pearson_lower(k, 100, 0.95) >= 0.95)
    c = choose_thresholds(s, y)
    assert int(np.sum(pos >= c.thresholds.soon)) == k
    assert c.sensitivity_soon == k / 100


def test_too_few_positives_is_flagged_and_catches_all() -> None:
    s, y = _data(1, 20, 40)
    c = choose_thresholds(s, y)
    assert not c.meets_target
    assert c.sensitivity_soon == 1.0
    assert c.min_cspca_needed == 59
    assert "NOT MET" in c.rule


def test_one_class_is_an_input_error() -> None:
    with pytest.raises(InputError, match="positive and"):
        choose_thresholds([0.1, 0.2], [False, False])
    with pytest.raises(InputError):
        choose_thresholds([0.1, 1.2], [True, False])
