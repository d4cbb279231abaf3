"""Verdicts on a source's claim, computed from per-seed numbers (never written by hand).

A claim says that method A's value is higher (or lower) than method B's. With the per-seed values of
both, Welch's two-sample t-test (unequal variances; :func:`scipy.stats.ttest_ind`) gives a two-sided
p-value for "the means are equal":

- **held**: the difference has the claimed sign and p < ``alpha`` (0.05);
- **did not hold**: the difference has the opposite sign and p < ``alpha``;
- **inconclusive at this N**: otherwise (including fewer than two seeds per method, or no spread at
  all, where the test is undefined).

The sentence names both means ± std, the difference, p and N, so a reader can judge it.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive at this N"


@dataclass
class Verdict:
    claim: str
    verdict: str
    a: str
    b: str
    mean_a: float | None
    mean_b: float | None
    std_a: float | None
    std_b: float | None
    difference: float | None
    p_value: float | None
    n_a: int
    n_b: int
    text: str
    details: str

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def _clean(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _ms(v: list[float]) -> tuple[float | None, float | None]:
    return (statistics.fmean(v) if v else None, statistics.stdev(v) if len(v) >= 2 else None)


def judge(
    claim: str,
    a: str,
    values_a: list[Any],
    b: str,
    values_b: list[Any],
    *,
    higher: bool,
    quantity: str,
    alpha: float = 0.05,
    spec: str = ".3f",
) -> Verdict:
    """Judge "``a``'s ``quantity`` is higher (``higher=True``) or lower than ``b``'s" on per-seed values."""
    va, vb = _clean(values_a), _clean(values_b)
    (ma, sa), (mb, sb) = _ms(va), _ms(vb)
    diff = None if ma is None or mb is None else ma - mb
    p = None
    if len(va) >= 2 and len(vb) >= 2 and ((sa or 0.0) > 0 or (sb or 0.0) > 0):
        with warnings.catch_warnings():  # scipy warns on nearly identical samples; p stays usable
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_ind(va, vb, equal_var=False).pvalue)
        if not math.isfinite(p):
            p = None
    if p is not None and p < alpha and diff is not None and diff != 0:
        verdict = HELD if (diff > 0) == higher else NOT_HELD
    else:
        verdict = INCONCLUSIVE

    def show(m: float | None, s: float | None) -> str:
        if m is None:
            return "no value"
        return format(m, spec) + (f" ± {format(s, spec)}" if s is not None else "")

    n = min(len(va), len(vb))
    p_text = "p undefined (fewer than 2 seeds or no spread)" if p is None else f"Welch p = {p:.3g}"
    diff_text = "" if diff is None else f", difference {diff:+{spec}}"
    details = (
        f"{quantity}: {a} {show(ma, sa)} vs {b} {show(mb, sb)}{diff_text}; "
        f"{p_text}; N = {n} seed{'s' if n != 1 else ''} per method."
    )
    return Verdict(
        claim, verdict, a, b, ma, mb, sa, sb, diff, p, len(va), len(vb), f"{claim} — {verdict}. {details}", details
    )


def teacher_warning(cmp: dict[str, Any], label: str = "the teacher", alpha: float = 0.05) -> str | None:
    """A sentence when the teacher of comparison record ``cmp`` is not better than chance on its test
    split: a one-sided binomial test of its test accuracy (every seed's, pooled over the test images)
    against ``1 / classes``; None when it is better with p < ``alpha`` or the record lacks the numbers.
    Verdicts about students distilled from such a teacher say little (a tiny run's teacher at 0.10 on 10
    classes still gave a "held" verdict)."""
    dataset = cmp.get("dataset") or {}
    classes, n = len(dataset.get("class_names") or ()), (dataset.get("sizes") or {}).get("test")
    accs = _clean(((cmp.get("methods") or {}).get("teacher") or {}).get("accuracy", {}).get("values") or [])
    if classes < 2 or not n or not accs:
        return None
    correct = sum(round(a * n) for a in accs)
    p = stats.binomtest(correct, n * len(accs), 1 / classes, alternative="greater").pvalue
    if p < alpha:
        return None
    return (
        f"{label} is not better than chance on the test split (accuracy {statistics.fmean(accs):.3f}, chance "
        f"{1 / classes:.3f} for {classes} classes, {n} test images, one-sided binomial p = {p:.2g}): the "
        "verdicts below compare students of a teacher that learned nothing; train it longer or on more data"
    )
