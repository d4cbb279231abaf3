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


def test_a_teacher_at_chance_is_said_and_a_trained_one_is_not():
    # a tiny study's teacher at 0.10 on 10 classes still gave "held" verdicts, without a word
    from xkd.studies.verdict import teacher_warning

    def comparison(accuracies, test=60, classes=10):
        return {
            "dataset": {"class_names": [str(i) for i in range(classes)], "sizes": {"test": test}},
            "methods": {"teacher": {"accuracy": {"values": accuracies}}},
        }

    said = teacher_warning(comparison([0.10, 0.10]))
    assert said.startswith("the teacher is not better than chance on the test split (accuracy 0.100, chance 0.100")
    assert "one-sided binomial p = " in said
    assert teacher_warning(comparison([0.9, 0.88])) is None  # far above chance
    # 14 of 60 right over 10 classes: p = P(Bin(60, 0.1) >= 14) = 0.002: better than chance, no warning
    assert teacher_warning(comparison([14 / 60])) is None
    assert teacher_warning(comparison([10 / 60])) is not None  # p = 0.073
    assert teacher_warning({"methods": {}}) is None  # an older record without the numbers: nothing said
