"""Figures of the report, drawn with matplotlib's object API on the Agg backend.

Every function takes tensors or arrays (read from records, or from ``xkd explain``), draws one
``Figure`` (never pyplot, so no global state leaks), and writes one PNG atomically. Maps are
normalised per map to [0, 1] for display only (normalisation is an explicit step, never part of an explainer).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import contourpy  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from xkd.files import atomic_write_bytes  # noqa: E402

DPI = 100
WRONG_COLOR = "#c62828"
RIGHT_COLOR = "#2e7d32"
TRAIN_STYLE = {"linestyle": "--", "color": "#1f77b4"}
VAL_STYLE = {"linestyle": "-", "color": "#d62728"}


def as_array(x: Any) -> np.ndarray:
    """A float32 numpy copy of a tensor or array-like (non-finite values become 0)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def normalise_map(m: Any) -> np.ndarray:
    """Min-max scale one map to [0, 1]; a constant map becomes zeros."""
    m = as_array(m)
    if m.size == 0:
        return m
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def display_image(img: Any) -> tuple[np.ndarray, str | None]:
    """(C,H,W) or (H,W) in [0,1] -> (array for imshow, cmap): gray for 1 channel, RGB for 3."""
    a = as_array(img)
    if a.ndim == 2:
        return np.clip(a, 0, 1), "gray"
    if a.shape[0] == 3:
        return np.clip(a.transpose(1, 2, 0), 0, 1), None
    return np.clip(a.mean(0), 0, 1), "gray"


def interpolation(h: int, w: int) -> str:
    """Nearest for tiny images (every pixel visible), smooth for photographs."""
    return "nearest" if max(h, w) <= 64 else "bilinear"


def cell_inches(h: int, w: int) -> tuple[float, float]:
    """Size of one image cell: 1.5 in for small images, 1.6 in for large ones (three class cards per row)."""
    side = 1.5 if max(h, w) <= 64 else 1.6
    return (side, side * h / w) if w >= h else (side * w / h, side)


def evenly_spaced(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


ABBREVIATIONS = {"denseblock": "db", "denselayer": "dl", "transition": "tr", "layer": "L", "block": "b", "blocks": "b"}
ABBREVIATIONS |= {"shortcut": "sc", "downsample": "ds", "features": "f", "stage": "s", "norm": "n", "relu": "r"}


def abbreviate(name: str, limit: int = 16) -> str:
    """Shorten a module path for a title: ``features.denseblock2.denselayer3.conv1`` -> ``db2.dl3.conv1``
    (known words shortened in every part but the last, then the head cut with "…" if still long)."""
    for prefix in ("features.", "model.", "module."):
        if name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix) :]
    if len(name) <= limit:
        return name
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        word = p.rstrip("0123456789")
        parts[i] = ABBREVIATIONS.get(word, word[:2]) + p[len(word) :]
    name = ".".join(parts)
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def mask_outline(mask: np.ndarray | None) -> list[np.ndarray]:
    """Outline of a binary mask as polylines in pixel units (pixel centres at integers), traced on
    pixel edges: the mask is upsampled 8x first when small, so tiny masks are not cut short."""
    if mask is None or not mask.any() or mask.all():
        return []
    h, w = mask.shape
    f = 8 if max(h, w) <= 64 else 1
    up = np.kron(mask.astype(np.float64), np.ones((f, f)))
    xs, ys = (np.arange(w * f) + 0.5) / f - 0.5, (np.arange(h * f) + 0.5) / f - 0.5
    lines = contourpy.contour_generator(xs, ys, up).lines(0.5)
    return [np.asarray(ln) for ln in lines if len(ln) > 1]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically, without a timestamp in its metadata)."""
    buf = io.BytesIO()
    fig.savefig(
        buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None}, pil_kwargs={"compress_level": 3}
    )
    return atomic_write_bytes(path, buf.getvalue())


class _Canvas:
    """One figure with a single invisible axes in inch coordinates (y down): image grids are
    drawn as positioned ``imshow`` artists, far faster than one ``Axes`` per cell."""

    def __init__(self, width: float, height: float) -> None:
        self.fig = Figure(figsize=(width, height))
        self.ax = self.fig.add_axes((0, 0, 1, 1))
        self.ax.set_axis_off()
        self.ax.set_xlim(0, width)
        self.ax.set_ylim(height, 0)

    def image(self, arr: np.ndarray, x: float, y: float, w: float, h: float, **kw: Any) -> None:
        self.ax.imshow(arr, extent=(x, x + w, y + h, y), aspect="auto", vmin=0, vmax=1, **kw)

    def text(self, x: float, y: float, s: str, **kw: Any) -> None:
        self.ax.text(x, y, s, **{"ha": "center", "fontsize": 8, **kw})

    def outline(
        self, lines: Sequence[np.ndarray], shape: tuple[int, int], x: float, y: float, w: float, h: float
    ) -> None:
        """Draw mask outlines (from :func:`mask_outline`, in pixel units) over the cell at (x, y)."""
        if not lines:
            return
        mh, mw = shape
        segs = [np.column_stack([x + (ln[:, 0] + 0.5) * w / mw, y + (ln[:, 1] + 0.5) * h / mh]) for ln in lines]
        self.ax.add_collection(LineCollection(segs, colors="black", linewidths=2.4))
        self.ax.add_collection(LineCollection(segs, colors="white", linewidths=1.1))

    def save(self, path: str | Path) -> Path:
        return save_figure(self.fig, path)


def save_overlay_figure(
    path: str | Path,
    images: Any,
    rows: Mapping[str, Any],
    titles: Sequence[str] | None = None,
    *,
    masks: Any = None,
    cell_titles: Mapping[str, Sequence[str]] | None = None,
    cell_wrong: Mapping[str, Sequence[bool]] | None = None,
    alpha: float = 0.5,
) -> Path:
    """Grid of explanation overlays: one column per image; first row the image, then one row per
    entry of ``rows`` (e.g. ``{"teacher": maps, "kd": maps}``), each map (S,H,W) normalised to
    [0, 1] and drawn with the jet colour map at ``alpha`` over the image.

    Args:
        path: PNG to write.
        images: (S,C,H,W) or (S,H,W) in [0, 1].
        rows: row label -> maps (S,H,W) at the images' resolution.
        titles: one title per column (e.g. true label); may hold a newline.
        masks: optional (S,H,W) ground-truth masks, outlined on every cell.
        cell_titles: optional row label -> one short title per cell (e.g. the prediction).
        cell_wrong: optional row label -> per cell flag; flagged titles are drawn in red, others green.
    """
    imgs = as_array(images)
    if imgs.ndim == 3:
        imgs = imgs[:, None]
    s, _, h, w = imgs.shape
    mask_arr = as_array(masks) > 0.5 if masks is not None else None
    labels = list(rows)
    maps = {k: as_array(v) for k, v in rows.items()}
    cw, ch = cell_inches(h, w)
    lines = max((t.count("\n") + 1 for t in titles or []), default=0)
    title_h = 0.08 + 0.15 * lines
    cell_title_h = 0.22 if cell_titles else 0.06
    left, gap = 0.3, 0.08
    cv = _Canvas(left + s * (cw + gap), title_h + ch + len(labels) * (ch + cell_title_h) + 0.08)
    interp = interpolation(h, w)
    bases = [display_image(imgs[c]) for c in range(s)]
    outlines = [mask_outline(None if mask_arr is None else mask_arr[c]) for c in range(s)]
    y = title_h
    for r in range(1 + len(labels)):
        label = "image" if r == 0 else labels[r - 1]
        cv.text(left / 2, y + ch / 2, label, rotation=90, va="center", fontsize=8.5)
        for c in range(s):
            x = left + c * (cw + gap)
            base, cmap = bases[c]
            cv.image(base, x, y, cw, ch, cmap=cmap, interpolation=interp)
            if r == 0 and titles:
                cv.text(x + cw / 2, y - 0.04, titles[c], va="bottom")
            elif r > 0:
                cv.image(normalise_map(maps[label][c]), x, y, cw, ch, cmap="jet", alpha=alpha, interpolation=interp)
                if cell_titles and label in cell_titles:
                    flags = (cell_wrong or {}).get(label)
                    color = "black" if flags is None else WRONG_COLOR if flags[c] else RIGHT_COLOR
                    cv.text(x + cw / 2, y - 0.03, cell_titles[label][c], va="bottom", fontsize=7.5, color=color)
            cv.outline(outlines[c], (h, w), x, y, cw, ch)
        y += ch + cell_title_h
    return cv.save(path)


def class_name(names: Sequence[str], i: int, limit: int = 18) -> str:
    return abbreviate(names[i], limit) if 0 <= i < len(names) else str(i)


def save_class_grid(
    path: str | Path,
    images: Any,
    maps: Mapping[str, Any],
    labels: Sequence[int],
    predictions: Mapping[str, Sequence[int]],
    class_names: Sequence[str],
    *,
    indices: Sequence[int] | None = None,
    masks: Any = None,
) -> Path:
    """The report's sample grid for some images: :func:`save_overlay_figure` with each column
    titled by dataset index and true class, each map by that model's prediction (green ✓ / red ✗)."""
    idx = list(indices) if indices is not None else list(range(len(labels)))
    titles = [f"#{i}\ntrue: {class_name(class_names, y)}" for i, y in zip(idx, labels)]
    wrong = {r: [p != y for p, y in zip(ps, labels)] for r, ps in predictions.items()}
    cell_titles = {
        r: [f"{class_name(class_names, p)} {'✗' if w else '✓'}" for p, w in zip(ps, wrong[r])]
        for r, ps in predictions.items()
    }
    return save_overlay_figure(path, images, maps, titles, masks=masks, cell_titles=cell_titles, cell_wrong=wrong)


def save_feature_strips(
    path: str | Path,
    image: Any,
    strips: Mapping[str, Sequence[tuple[str, Any]]],
) -> Path:
    """KD-FMV average feature maps: one row per model, the input image first, then one map per
    layer (shallow to deep), each normalised to [0, 1], titled with the (short) layer name."""
    img, cmap = display_image(image)
    h, w = img.shape[:2]
    cw, ch = cell_inches(h, w)
    cw, ch = cw * 0.8, ch * 0.8
    n_cols = 1 + max((len(v) for v in strips.values()), default=0)
    left, title_h, gap = 0.3, 0.22, 0.06
    cv = _Canvas(left + n_cols * (cw + gap), len(strips) * (ch + title_h) + 0.08)
    interp = interpolation(h, w)
    for r, (label, maps) in enumerate(strips.items()):
        y = title_h + r * (ch + title_h)
        cv.text(left / 2, y + ch / 2, label, rotation=90, va="center", fontsize=8.5)
        for c, (name, m) in enumerate([("input", None), *maps]):
            x = left + c * (cw + gap)
            if m is None:
                cv.image(img, x, y, cw, ch, cmap=cmap, interpolation=interp)
            else:
                cv.image(normalise_map(m), x, y, cw, ch, cmap="jet", interpolation=interp)
            cv.text(x + cw / 2, y - 0.03, name, va="bottom", fontsize=6.5)
    return cv.save(path)


def save_training_curves(path: str | Path, histories: Mapping[str, Mapping[str, Any]]) -> Path:
    """Per model: loss (top) and accuracy (bottom) per epoch, train dashed, val solid, best epoch
    marked. ``histories[role] = {"history": [...], "best_epoch": int | None}``."""
    n = max(1, len(histories))
    fig = Figure(figsize=(0.6 + 2.7 * n, 4.6))
    axes = fig.subplots(2, n, squeeze=False, sharex="col", sharey="row")
    fig.subplots_adjust(left=0.6 / (0.6 + 2.7 * n), right=0.99, top=0.92, bottom=0.11, wspace=0.12, hspace=0.12)
    for c, (role, train) in enumerate(histories.items()):
        hist = list(train.get("history") or [])
        top, bottom = axes[0][c], axes[1][c]
        top.set_title(role, fontsize=9.5)
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3, linewidth=0.6)
            ax.tick_params(labelsize=7.5)
        if not hist:
            top.text(
                0.5, 0.5, "no history", ha="center", va="center", transform=top.transAxes, fontsize=8, color="gray"
            )
            continue
        ep = [row.get("epoch", i) for i, row in enumerate(hist)]
        for ax, keys in ((top, ("train_loss", "val_loss")), (bottom, ("train_accuracy", "val_accuracy"))):
            for key, style in zip(keys, (TRAIN_STYLE, VAL_STYLE)):
                vals = [np.nan if row.get(key) is None else float(row[key]) for row in hist]
                ax.plot(ep, vals, marker="o", markersize=2.5, linewidth=1.3, label=key.split("_")[0], **style)
        best = train.get("best_epoch")
        if best is not None:
            for ax in (top, bottom):
                ax.axvline(best, color="#555555", linestyle=":", linewidth=1.2)
            row = next((r for r in hist if r.get("epoch") == best), None)
            if row is not None and row.get("val_accuracy") is not None:
                bottom.plot(
                    [best],
                    [row["val_accuracy"]],
                    marker="*",
                    markersize=11,
                    color="#f9a825",
                    markeredgecolor="black",
                    zorder=5,
                    label="best",
                )
        bottom.set_xlabel("epoch", fontsize=8)
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("loss", fontsize=8.5)
    axes[1][0].set_ylabel("accuracy", fontsize=8.5)
    handles, labels = axes[1][0].get_legend_handles_labels()
    if handles:
        axes[1][0].legend(handles, labels, fontsize=7, loc="lower right", frameon=True)
    return save_figure(fig, path)


def save_confusion_matrices(path: str | Path, matrices: Mapping[str, Any], class_names: Sequence[str]) -> Path:
    """Small heat maps of the test confusion matrices (rows true, columns predicted), coloured by
    row-normalised rate, annotated with counts when there are at most 12 classes."""
    k = len(class_names)
    side = min(4.0, max(2.0, 0.32 * k + 0.9))
    n = max(1, len(matrices))
    fig = Figure(figsize=(n * (side + 0.5) + 0.6, side + 0.9))
    axes = fig.subplots(1, n, squeeze=False)[0]
    fig.subplots_adjust(
        left=0.6 / (n * (side + 0.5) + 0.6), right=0.99, top=0.88, bottom=0.8 / (side + 0.9), wspace=0.35
    )
    short = [abbreviate(c, 8) for c in class_names]
    for ax, (role, cm) in zip(axes, matrices.items()):
        m = as_array(cm)
        rates = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(role, fontsize=9.5)
        if k <= 12:
            ax.set_xticks(range(k), short, rotation=60, fontsize=7, ha="right")
            ax.set_yticks(range(k), short if ax is axes[0] else [""] * k, fontsize=7)
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    ax.text(
                        j,
                        i,
                        f"{int(m[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel("predicted", fontsize=7.5)
    axes[0].set_ylabel("true", fontsize=7.5)
    return save_figure(fig, path)


def save_accuracy_vs_agreement(
    path: str | Path,
    points: Sequence[tuple[str, float, float, float, float]],
    agreement_name: str,
    teacher_accuracy: float | None,
    n_seeds: int,
) -> Path:
    """One point per method: explanation agreement with the teacher (x) vs test accuracy (y), with
    error bars of one standard deviation over seeds. ``points`` = (label, x, x_std, y, y_std)."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.13)
    colors = matplotlib.colormaps["tab10"]
    for i, (label, x, xs, y, ys) in enumerate(points):
        c = colors(i % 10)
        ax.errorbar(x, y, xerr=xs, yerr=ys, fmt="o", color=c, markersize=6, capsize=3, linewidth=1.2, label=label)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8.5, color=c,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})  # fmt: skip
    if teacher_accuracy is not None:
        ax.axhline(teacher_accuracy, color="#555555", linestyle=":", linewidth=1.1)
        ax.annotate(
            "teacher", (1.0, teacher_accuracy), xycoords=("axes fraction", "data"), xytext=(-4, 3),
            textcoords="offset points", ha="right", fontsize=8, color="#555555",
        )  # fmt: skip
    ax.set_xlabel(f"explanation agreement with the teacher ({agreement_name})", fontsize=9)
    ax.set_ylabel("test accuracy", fontsize=9)
    ax.set_title(f"Accuracy vs explanation agreement (mean ± std over {n_seeds} seed(s))", fontsize=10)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.tick_params(labelsize=8)
    return save_figure(fig, path)


def plot_top_units(panels: Mapping[str, Any], path: str | Path) -> Path:
    """Figure of the best units of a network dissection, from
    :func:`xkd.metrics.dissection.top_unit_panels`: one row per unit, its most activating images with
    the binarised region ``A_k >= T_k`` outlined, the first titled with the unit index, its best
    concept and the IoU. Writes a PNG and returns its path."""
    rows, cols = panels["rows"], panels["cols"]
    fig = Figure(figsize=(1.6 * cols, 1.75 * len(rows)))
    for r, row in enumerate(rows):
        unit = row["unit"]
        for c, (image, region) in enumerate(row["cells"]):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
            ax.set_axis_off()
            base, cmap = display_image(image)
            ax.imshow(base, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            for line in mask_outline(region):
                ax.plot(line[:, 0], line[:, 1], color="black", linewidth=2.2)
                ax.plot(line[:, 0], line[:, 1], color="yellow", linewidth=1.0)
            if c == 0:
                iou = "-" if unit["iou"] is None else f"{unit['iou']:.2f}"
                flag = "" if unit["detector"] else " (no detector)"
                ax.set_title(f"unit {unit['unit']}: {unit['concept']}  IoU {iou}{flag}", loc="left", fontsize=8)
    fig.suptitle(
        f"{panels['layer']}: top units (top {100 * (1 - panels['quantile']):.2g}% region outlined)", fontsize=9
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")  # default PNG metadata and compression, unlike _save
    return atomic_write_bytes(path, buf.getvalue())
