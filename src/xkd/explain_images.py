"""``xkd explain``: teacher and student maps for a user's own images, from a finished run."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import save as save_safetensors
from torch import Tensor

from xkd.data.base import unit_float
from xkd.data.imagefolder import GRAY_MODES
from xkd.data.imagefolder import load_image as decode_image
from xkd.engine.distributed import resolve_device
from xkd.errors import ConfigError, ImageInputError
from xkd.explain import build_explainer
from xkd.files import atomic_write_bytes, record, write_json
from xkd.models.state import model_device
from xkd.pipeline import load_run_models
from xkd.report.figures import save_overlay_figure


def image_channels(im: Image.Image) -> int:
    """The channel count of ``im`` as ``load_image`` reads it: 1 for grayscale modes, 3 for colour.
    A palette image (mode ``P``/``PA``) counts by the colours it uses: 1 when each is a gray
    (R = G = B), else 3."""
    if im.mode in GRAY_MODES:
        return 1
    if im.mode in ("P", "PA"):
        palette = im.getpalette("RGB") or []
        colors = im.getcolors(1 << 16)  # (count, index), or (count, (index, alpha)) for PA
        used = range(len(palette) // 3) if colors is None else {c if im.mode == "P" else c[0] for _, c in colors}
        rgb = [palette[3 * i : 3 * i + 3] for i in used if 3 * i + 3 <= len(palette)]
        return 1 if all(r == g == b for r, g, b in rgb) else 3
    return 3


def load_image(path: Path, channels: int, size: tuple[int, int]) -> Tensor:
    """Read ``path`` as a float32 (C, H, W) tensor in [0, 1], resized to ``size`` (H, W) the way
    ``imagefolder`` resizes training images.

    Raises:
        ImageInputError: unreadable file, or a channel count the run's models do not take.
    """
    try:
        with Image.open(path) as im:
            found = image_channels(im)
            mode = im.mode
        if mode in ("P", "PA"):
            mode += ", a gray palette" if found == 1 else ", a colour palette"
        if found != channels:
            fix = "convert it to grayscale (PIL: Image.convert('L'))" if channels == 1 else "convert it to RGB"
            raise ImageInputError(
                f"image {str(path)!r} has {found} channel(s) (mode {mode}) but the run's models take "
                f"{channels}-channel images; {fix} and try again"
            )
        return unit_float(decode_image(path, channels, size))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        if isinstance(e, ImageInputError):
            raise
        raise ImageInputError(f"cannot read image {str(path)!r} ({e}); give PNG, JPEG, BMP or TIFF files") from None


def check_image_paths(paths: list[Path]) -> None:
    """Raise :class:`ImageInputError` for a path that is not a file: missing, or a folder (``--images``
    takes files; a shell expands ``imgs/*.png`` to them)."""
    for p in paths:
        if p.is_dir():
            pattern = str(p / "*.png")
            raise ImageInputError(
                f"--images {str(p)!r} is a folder; pass image files, e.g. --images {pattern} (your shell lists them)"
            )
        if not p.is_file():
            raise ImageInputError(f"image {str(p)!r} does not exist")


def explain_images(
    run_dir: str | Path,
    paths: list[Path],
    explainer: str = "grad_cam",
    out: str | Path | None = None,
    device: str = "auto",
) -> Path:
    """Explain ``paths`` with every model of ``run_dir``; write a figure and records to ``out``.

    Every model explains the class the **teacher** predicts, so the maps in one column answer the
    same question. Images are resized to the run's input size. The models run on ``device``
    (``auto``: the GPU when there is one); images, maps and records stay on the CPU.

    Returns:
        The path of the figure (``explanations.png``).
    """
    try:
        where = resolve_device(device)
    except ConfigError:  # its message names the config key; here the user gave the flag
        raise ConfigError(f"--device {device}: no GPU is available here; use --device auto or --device cpu") from None
    check_image_paths(paths)
    cfg, models, run_record = load_run_models(run_dir, where)
    params = next((e.params for e in cfg.evaluation.explainers if e.name == explainer), {})
    c, h, w = run_record["dataset"]["image_shape"]
    class_names = run_record["dataset"]["class_names"]
    images = torch.stack([load_image(p, c, (h, w)) for p in paths])
    with torch.no_grad():
        probs = {
            role: torch.softmax(m(images.to(model_device(m, images.device))), 1).cpu() for role, m in models.items()
        }
    targets = probs["teacher"].argmax(1)
    maps = {}
    for role, m in models.items():
        with build_explainer(explainer, m, params) as ex:
            maps[role] = ex.explain(images, targets).maps
    out_dir = Path(out) if out else Path(run_dir) / "explanations"
    titles = [f"{p.stem}\nteacher: {class_names[int(t)]}" for p, t in zip(paths, targets)]
    fig = save_overlay_figure(out_dir / "explanations.png", images, maps, titles)
    atomic_write_bytes(
        out_dir / "maps.safetensors",
        save_safetensors({"images": images.contiguous(), **{f"maps/{r}": v.contiguous() for r, v in maps.items()}}),
    )
    write_json(
        out_dir / "explanations.json",
        record(
            "user_explanations",
            {
                "explainer": explainer,
                "images": [str(p) for p in paths],
                "target": [class_names[int(t)] for t in targets],
                "predictions": {r: [class_names[int(i)] for i in pr.argmax(1)] for r, pr in probs.items()},
                "probabilities": {r: pr.tolist() for r, pr in probs.items()},
            },
        ),
    )
    return fig
