"""Formatting and the plain-dict tables the report template draws (shared by the report's sections)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

DASH = "–"
EXPLAINER_NAMES = {
    "grad_cam": "Grad-CAM",
    "grad_cam_pp": "Grad-CAM++",
    "layer_cam": "LayerCAM",
    "feature_maps": "Feature maps",
    "kernel_shap": "KernelSHAP",
    "deep_shap": "DeepSHAP",
    "gradient_shap": "GradientSHAP",
    "lime": "LIME",
    "occlusion": "Occlusion",
    "integrated_gradients": "Integrated Gradients",
    "unicam": "UniCAM",
}


# what the transfer columns hold (xkd.metrics.transfer), for the run's and the comparison's reports
FSS_TITLE = (
    "the UniCAM authors' FSS: V-statistic squared distance correlation of the row-normalised student and "
    "teacher features; biased upwards (independent features score near 1): compare students with each other"
)
RS_TITLE = (
    "UniCAM's RS (P_DC): bias-corrected distance correlation of the class target with the student's features "
    "after the teacher's are projected out (what the student holds about the class beyond the teacher)"
)


ARROWS = {"high": " ↑", "low": " ↓", None: ""}
"""A column header's mark of its better direction (:func:`better`)."""


def better(higher_is_better: bool | None) -> str | None:
    """A declared ``higher_is_better`` as a table column's direction: ``"high"``, ``"low"`` or None."""
    return None if higher_is_better is None else ("high" if higher_is_better else "low")


def ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any, spec: str = ".4f", scale: float = 1.0) -> str:
    """``v * scale`` formatted with ``spec`` (accuracies ``.4f``, counts ``,.0f``); "–" if missing."""
    return format(v * scale, spec) if ok(v) else DASH


def fmt_pct(v: Any) -> str:
    return f"{v * 100:g}%" if ok(v) else "k"


def fmt_share(v: Any) -> str:
    """A share of images as a whole percentage: ``0.712`` -> "71%"; "–" if missing."""
    return f"{v * 100:.0f}%" if ok(v) else DASH


def fmt_p(v: Any) -> str:
    """A p-value as ``p = 0.003`` (two significant digits; ``p = 2.3e-05`` below 0.001)."""
    if not ok(v):
        return f"p = {DASH}"
    return f"p = {v:.2g}" if v >= 1e-3 else f"p = {v:.1e}"


class Sentence(dict):
    """Values for a declared sentence template (:attr:`xkd.metrics.base.MetricInfo.sentence`); a
    placeholder without a value reads "–"."""

    def __missing__(self, key: str) -> str:
        return DASH


def sentence(template: str, explainer: str, entry: dict, **text: str) -> str:
    """A metric's declared sentence for one student and explainer, filled from its record ``entry``:
    ``{explainer}``, ``{share}`` (percentage), ``{images}``, ``{p}`` and the entry's text values;
    ``text`` overrides any of them (``xkd compare`` passes the mean ± std and the per-seed p-values)."""
    images = entry.get("images")
    values = Sentence({k: v for k, v in entry.items() if isinstance(v, str)})
    values.update(
        explainer=explainer_name(explainer),
        share=fmt_share(entry.get("share")),
        images=fmt(images, ",.0f"),
        p=fmt_p(entry.get("p_value")),
    )
    values.update(text)
    return template.format_map(values)


def fmt_seconds(v: Any) -> str:
    if not ok(v):
        return DASH
    if v < 60:
        return f"{v:.1f} s"
    m, s = divmod(round(v), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def explainer_name(name: str) -> str:
    """Display name: ``grad_cam+superpixel`` -> "Grad-CAM (superpixels)"."""
    base, plus, _ = name.partition("+superpixel")
    shown = EXPLAINER_NAMES.get(base, base.replace("_", " "))
    return f"{shown} (superpixels)" if plus else shown


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


# --- tables (plain dicts the template's macro draws) ----------------------------------------------


@dataclass
class Col:
    """One numeric column: header, raw values per row, format, and which direction is better."""

    head: str
    values: list[Any]
    spec: str | Callable[[Any], str] = ".4f"
    better: str | None = None  # "high", "low" or None (no highlight)
    title: str | None = None
    scale: float = 1.0

    def text(self, v: Any) -> str:
        return self.spec(v) if callable(self.spec) else fmt(v, self.spec, self.scale)


def best_rows(values: Sequence[Any], better: str | None) -> set[int]:
    good = [(i, v) for i, v in enumerate(values) if ok(v)]
    if better is None or len(good) < 2 or len({v for _, v in good}) == 1:
        return set()
    target = (max if better == "high" else min)(v for _, v in good)
    return {i for i, v in good if v == target}


def cell(text: str, *, num: bool = True, best: bool = False, sub: str | None = None, title: str | None = None) -> dict:
    return {"text": text, "num": num, "best": best, "sub": sub, "title": title}


def head(text: str, num: bool = True, title: str | None = None) -> dict:
    return {"text": text, "num": num, "title": title}


def make_table(caption: str, labels: list[dict], cols: list[Col], groups: list[tuple[str, int]] | None = None) -> dict:
    """Rows = models (``labels``), one column per ``Col``, best value per column highlighted."""
    bests = [best_rows(c.values, c.better) for c in cols]
    rows = [
        [lab] + [cell(c.text(c.values[r]), best=r in b) for c, b in zip(cols, bests)] for r, lab in enumerate(labels)
    ]
    heads = [head("Model", False)] + [head(c.head, True, c.title) for c in cols]
    return {"caption": caption, "groups": groups, "head": heads, "rows": rows}


def model_label(role: str, m: dict) -> dict:
    return cell(role, num=False, sub=m.get("model"))
