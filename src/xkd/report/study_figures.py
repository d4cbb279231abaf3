"""The charts of the study pages (``study.html``): grouped bars of counts per method, and lines of each
measure against a size (teacher parameters, training images) with one style per series."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from xkd.report.figures import save_figure


def save_grouped_bars(
    path: str | Path,
    groups: Sequence[str],
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ylabel: str,
    title: str,
) -> Path:
    """Grouped bar chart: one group per ``groups`` entry, one bar per series (``{label: (means, stds)}``)
    with error bars of one standard deviation."""
    n_groups, n_series = max(1, len(groups)), max(1, len(series))
    fig = Figure(figsize=(max(5.0, 1.1 + 0.5 * n_groups * n_series + 0.4 * n_groups), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.88, bottom=0.16)
    width = 0.8 / n_series
    x = np.arange(n_groups)
    colors = matplotlib.colormaps["tab10"]
    for i, (label, (means, stds)) in enumerate(series.items()):
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, np.nan_to_num(np.asarray(means, float)), width * 0.92, yerr=np.nan_to_num(np.asarray(stds, float)),
               capsize=3, color=colors(i % 10), label=label, error_kw={"linewidth": 1.0})  # fmt: skip
    ax.set_xticks(x, list(groups), fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="y", alpha=0.3, linewidth=0.6)
    ax.legend(fontsize=8, frameon=True)
    return save_figure(fig, path)


def save_lines_vs_size(
    path: str | Path,
    sizes: Sequence[float],
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    extra: Mapping[str, Mapping[str, tuple[float, float, float]]] | None = None,
    xlabel: str = "teacher parameters",
) -> Path:
    """One panel per measured quantity (``{title: {series: (means, stds)}}``) against ``sizes`` (log x),
    error bars of one std; ``extra[title][label] = (x, mean, std)`` adds single marked points (the
    teacher-assistant student)."""
    n = max(1, len(panels))
    fig = Figure(figsize=(3.3 * n + 0.4, 3.4))
    axes = fig.subplots(1, n, squeeze=False)[0]
    fig.subplots_adjust(left=0.07, right=0.99, top=0.86, bottom=0.17, wspace=0.3)
    style = series_styles([*panels.values(), *(extra or {}).values()])
    for ax, (title, series) in zip(axes, panels.items()):
        for label, (means, stds) in series.items():
            color, line, mark = style[label]
            ax.errorbar(list(sizes), list(means), yerr=np.nan_to_num(np.asarray(stds, float)), marker=mark,
                        markersize=4, capsize=3, linewidth=1.2, linestyle=line, color=color, label=label)  # fmt: skip
        for label, (x, m, s) in ((extra or {}).get(title) or {}).items():
            ax.errorbar([x], [m], yerr=[s or 0.0], marker="*", markersize=11, capsize=3, linestyle="none",
                        color=style[label][0], markeredgecolor="black", label=label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(list(sizes), [_compact(v) for v in sizes])  # the measured sizes, not log decades
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel(xlabel, fontsize=8.5)
        ax.tick_params(labelsize=7.5)
        ax.grid(True, alpha=0.3, linewidth=0.6)
    seen: dict[str, Any] = {}  # the legend names every series, also one the first panel leaves out
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen:
        axes[0].legend(list(seen.values()), list(seen), fontsize=7, frameon=True)
    return save_figure(fig, path)


def series_styles(groups: Sequence[Mapping[str, Any]]) -> dict[str, tuple[Any, str, str]]:
    """``(colour, line style, marker)`` of each series named in ``groups`` (the panels), in order of
    first appearance: one style per series in every panel, whichever series a panel leaves out; line
    and marker differ too, so series with equal values stay visible on top of each other."""
    colors = matplotlib.colormaps["tab10"]
    order = list(dict.fromkeys(k for g in groups for k in g))
    return {k: (colors(i % 10), ("-", "--", ":", "-.")[i % 4], "osD^v"[i % 5]) for i, k in enumerate(order)}


def _compact(v: float) -> str:
    """A tick label for a size: 300, 6k, 1.2M."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"
