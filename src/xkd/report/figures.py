"""Figures of the report, drawn with matplotlib's object API on the Agg backend.

Every function takes tensors or arrays (read from records, or from ``xkd explain``), draws one
``Figure`` (never pyplot, so no global state leaks), and writes one PNG atomically. Maps are
normalised per map to [0, 1] for display only (DESIGN.md rule 4: normalisation is an explicit step).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from xkd.report.records import atomic_write_bytes  # noqa: E402

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
    lo, hi = float(m.min(initial=0.0)), float(m.max(initial=0.0))
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
    """Size of one image cell: small images get 1.5 in, large ones 2 in on their long side."""
    side = 1.5 if max(h, w) <= 64 else 2.0
    return (side, side * h / w) if w >= h else (side * w / h, side)


def evenly_spaced(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def abbreviate(name: str, limit: int = 16) -> str:
    """Shorten a module path for a title: ``features.denseblock2.denselayer3.conv1`` -> ``db2.dl3.conv1``."""
    for prefix in ("features.", "model.", "module."):
        if name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix) :]
    if len(name) <= limit:
        return name
    parts = name.split(".")
    short = []
    for p in parts[:-1]:
        letters = "".join(ch for ch in p if ch.isalpha())
        digits = "".join(ch for ch in p if ch.isdigit())
        short.append((letters[:1] + letters[len(letters) // 2 : len(letters) // 2 + 1] + digits) if letters else p)
    name = ".".join(short + parts[-1:])
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _save(fig: Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    fig.clear()
    return atomic_write_bytes(path, buf.getvalue())


def _off(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _contour(ax: Any, mask: np.ndarray | None) -> None:
    """Outline a binary mask on pixel edges (upsampled first, so tiny masks are not cut short)."""
    if mask is None or not mask.any() or mask.all():
        return
    h, w = mask.shape
    f = 8 if max(h, w) <= 64 else 1
    up = np.kron(mask.astype(np.float32), np.ones((f, f), dtype=np.float32))
    xs, ys = (np.arange(w * f) + 0.5) / f - 0.5, (np.arange(h * f) + 0.5) / f - 0.5
    ax.contour(xs, ys, up, levels=[0.5], colors="black", linewidths=2.4)
    ax.contour(xs, ys, up, levels=[0.5], colors="white", linewidths=1.1)


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
        titles: one title per column (e.g. true label).
        masks: optional (S,H,W) ground-truth masks, outlined on every cell.
        cell_titles: optional row label -> one short title per cell (e.g. the prediction).
        cell_wrong: optional row label -> per cell flag; flagged titles are drawn in red.
    """
    imgs = as_array(images)
    if imgs.ndim == 3:
        imgs = imgs[:, None]
    s, _, h, w = imgs.shape
    mask_arr = as_array(masks) > 0.5 if masks is not None else None
    labels = list(rows)
    cw, ch = cell_inches(h, w)
    title_h = 0.42 if titles else 0.1
    cell_title_h = 0.25 if cell_titles else 0.05
    left = 0.35
    n_rows = 1 + len(labels)
    fig = Figure(figsize=(left + s * (cw + 0.08), title_h + ch + len(labels) * (ch + cell_title_h) + 0.1))
    W, H = fig.get_size_inches()
    interp = interpolation(h, w)
    y = H - title_h
    for r in range(n_rows):
        y -= ch
        for c in range(s):
            ax = fig.add_axes([(left + c * (cw + 0.08)) / W, y / H, cw / W, ch / H])
            _off(ax)
            base, cmap = display_image(imgs[c])
            ax.imshow(base, cmap=cmap, vmin=0, vmax=1, interpolation=interp)
            if r == 0:
                if titles:
                    ax.set_title(titles[c], fontsize=8, pad=3)
            else:
                label = labels[r - 1]
                ax.imshow(
                    normalise_map(as_array(rows[label])[c]),
                    cmap="jet",
                    alpha=alpha,
                    vmin=0,
                    vmax=1,
                    interpolation=interp,
                )
                if cell_titles and label in cell_titles:
                    wrong = bool(cell_wrong and label in cell_wrong and cell_wrong[label][c])
                    color = WRONG_COLOR if wrong else RIGHT_COLOR if cell_wrong and label in cell_wrong else "black"
                    ax.set_title(cell_titles[label][c], fontsize=7.5, pad=2, color=color)
            _contour(ax, None if mask_arr is None else mask_arr[c])
            if c == 0:
                ax.set_ylabel("image" if r == 0 else labels[r - 1], fontsize=8.5)
        y -= cell_title_h
    return _save(fig, path)


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
    left, title_h, gap = 0.45, 0.3, 0.06
    fig = Figure(figsize=(left + n_cols * (cw + gap), len(strips) * (ch + title_h) + 0.1))
    W, H = fig.get_size_inches()
    interp = interpolation(h, w)
    for r, (label, maps) in enumerate(strips.items()):
        y = H - (r + 1) * (ch + title_h)
        cells = [("input", None), *maps]
        for c, (name, m) in enumerate(cells):
            ax = fig.add_axes([(left + c * (cw + gap)) / W, y / H, cw / W, ch / H])
            _off(ax)
            if m is None:
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation=interp)
                ax.set_ylabel(label, fontsize=8.5)
            else:
                ax.imshow(normalise_map(m), cmap="jet", vmin=0, vmax=1, interpolation=interp)
            ax.set_title(name, fontsize=6.5, pad=2)
    return _save(fig, path)


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
    axes[0][0].set_ylabel("loss", fontsize=8.5)
    axes[1][0].set_ylabel("accuracy", fontsize=8.5)
    handles, labels = axes[1][0].get_legend_handles_labels()
    if handles:
        axes[1][0].legend(handles, labels, fontsize=7, loc="lower right", frameon=True)
    return _save(fig, path)


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
    return _save(fig, path)
