"""Verdicts are computed from per-seed numbers with Welch's t-test."""

from __future__ import annotations

import pytest
from scipy import stats

from xkd.studies.verdict import HELD, INCONCLUSIVE, NOT_HELD, judge


def test_clear_difference_in_the_claimed_direction_holds():
    v = judge("A beats B", "A", [10, 11, 12], "B", [4, 5, 6], higher=True, quantity="detectors")
    assert v.verdict == HELD and v.difference == pytest.approx(6.0)
    assert v.p_value == pytest.approx(stats.ttest_ind([10, 11, 12], [4, 5, 6], equal_var=False).pvalue)
    assert "held" in v.text and "N = 3 seeds" in v.text and "Welch p" in v.text


def test_clear_difference_the_other_way_does_not_hold():
    v = judge("A beats B", "A", [4, 5, 6], "B", [10, 11, 12], higher=True, quantity="detectors")
    assert v.verdict == NOT_HELD
    lower = judge("A is lower", "A", [4, 5, 6], "B", [10, 11, 12], higher=False, quantity="detectors")
    assert lower.verdict == HELD


def test_overlapping_values_one_seed_or_no_spread_are_inconclusive():
    assert judge("c", "A", [5, 7, 9], "B", [6, 7, 8], higher=True, quantity="q").verdict == INCONCLUSIVE
    one = judge("c", "A", [9], "B", [1], higher=True, quantity="q")
    assert one.verdict == INCONCLUSIVE and one.p_value is None and "p undefined" in one.text
    flat = judge("c", "A", [3, 3, 3], "B", [3, 3, 3], higher=True, quantity="q")
    assert flat.verdict == INCONCLUSIVE and flat.p_value is None
    missing = judge("c", "A", [None, float("nan")], "B", [1, 2], higher=True, quantity="q")
    assert missing.verdict == INCONCLUSIVE and missing.mean_a is None
