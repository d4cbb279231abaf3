"""``xkd explain``: teacher and student maps for a user's own images, from a finished run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from xkd.config import RunConfig
from xkd.data.base import unit_float
from xkd.data.imagefolder import GRAY_MODES
from xkd.data.imagefolder import load_image as decode_image
from xkd.engine.distributed import resolve_device
from xkd.engine.trained import TrainedModel
from xkd.errors import ConfigError, ImageInputError, UnknownNameError
from xkd.explain.base import ExplainerSpec, resolve_explainer, split_name
from xkd.files import atomic_write_bytes, record, write_json
from xkd.models.state import model_device
from xkd.pipeline import load_run_models
from xkd.registry import EXPLAINERS
from xkd.report.figures import save_overlay_figure
from xkd.rundir import COMMANDS, RunDir
from xkd.scoring import explain, explainer_context


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


def check_run_folder(run_dir: str | Path) -> None:
    """Raise :class:`ConfigError` when ``run_dir`` holds a comparison, study or sweep: their runs are
    in sub-folders (``seeds/seed_N``, ``trial-NNNN``), and the message names one."""
    d = RunDir(run_dir)
    kind = d.kind()
    if kind not in ("comparison", "study", "sweep"):
        return  # a run, or nothing xkd wrote: load_run_models says what is missing
    inside = "trial-NNNN" if kind == "sweep" else "seeds/seed_N"
    runs = sorted(d.path.glob("trial-[0-9]*" if kind == "sweep" else "**/seeds/seed_*"))
    runs = [r for r in runs if RunDir(r).is_finished()] or runs
    example = f", e.g. --run {runs[0]}" if runs else ""
    raise ConfigError(
        f"{d.path} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} (`{COMMANDS[kind]}`), not a run: pass one of "
        f"its {inside} folders{example}"
    )


def run_explainer(cfg: RunConfig, name: str) -> ExplainerSpec:
    """Explainer ``name`` as the run configured it: a label of ``evaluation.explainers`` (e.g.
    ``unicam_distilled``) or the name of one of them, with its parameters; else any registered
    explainer (``+superpixel`` allowed) with its default parameters.

    Raises:
        UnknownNameError: neither; the message lists the run's explainers and the registered ones.
    """
    configured = cfg.evaluation.explainers
    e = next((e for e in configured if e.key == name), None) or next((e for e in configured if e.name == name), None)
    if e is not None:
        return resolve_explainer(e.name, e.params, e.key)
    if split_name(name)[0] not in EXPLAINERS:
        raise UnknownNameError(
            f"unknown explainer {name!r}; pass one of this run's explainers ({', '.join(e.key for e in configured)}) "
            f"or a registered explainer ({', '.join(EXPLAINERS.names())}, any of them + '+superpixel')"
        )
    return resolve_explainer(name)


def run_models(cfg: RunConfig, models: dict[str, nn.Module]) -> list[TrainedModel]:
    """The loaded teacher and students of a run, teacher first, with what the scoring loop reads of
    them (a student's distiller: UniCAM's KD-vs-base maps take its ``scratch`` student as the base)."""
    out = [TrainedModel("teacher", models["teacher"], cfg.teacher.model.name)]
    for s in cfg.students:
        out.append(TrainedModel(s.name, models[s.name], (s.model or cfg.student_model).name, s.distiller))
    return out


def explain_run_models(
    spec: ExplainerSpec, models: list[TrainedModel], images: Tensor, targets: Tensor
) -> dict[str, Tensor]:
    """Maps of ``targets`` by ``spec`` for each model it explains, as the run's scoring loop chooses
    them: a (student, teacher) pair explainer (UniCAM) explains the students, given the teacher (and
    for its KD-vs-base kinds the base model); models an explainer does not apply to are left out.

    Raises:
        ImageInputError: fewer images than the explainer needs in one call (UniCAM: 4).
        ConfigError: it explains none of the models.
    """
    n, teacher, students = images.shape[0], models[0], models[1:]
    if n < spec.min_images:
        raise ImageInputError(
            f"{spec.key} needs at least {spec.min_images} images, got {n}: its maps are a statistic over the "
            f"images explained together; pass {spec.min_images} or more --images"
        )
    maps, not_applied, no_base = {}, [], []
    for m in students if spec.pair else models:
        if not spec.applies(m.model):
            not_applied.append(m.role)
            continue
        context, _ = explainer_context(spec, m, teacher, students)
        if context is None:
            no_base.append(m.role)
            continue
        maps[m.role] = explain(spec, m.model, images, targets, **context)
    if not maps:
        if not no_base:  # applies to none: the explainer's own reason (MED-TEX's Θ: which students have it)
            with spec.build(models[-1].model, teacher=teacher.model):
                pass
        why = [f"it does not apply to {', '.join(not_applied)}"] if not_applied else []
        if no_base:
            why.append(
                f"{', '.join(no_base)} {'has' if len(no_base) == 1 else 'have'} no base model of its architecture"
            )
        raise ConfigError(
            f"explainer {spec.key!r} explains none of this run's models ({'; '.join(why)}); pass another --explainer"
        )
    return maps


def explain_images(
    run_dir: str | Path,
    paths: Sequence[str | Path],
    explainer: str = "grad_cam",
    out: str | Path | None = None,
    device: str = "auto",
) -> Path:
    """Explain ``paths`` with every model of ``run_dir``; write a figure and records to ``out``.

    ``explainer`` is one of the run's explainers, by label (``unicam_distilled``) or name, with the
    run's parameters, or any registered explainer with its defaults. Every model explains the class
    the **teacher** predicts, so the maps in one column answer the same question. A (student, teacher)
    pair explainer (UniCAM) explains the students, each with the run's teacher, as the run does.
    Images are resized to the run's input size. The models run on ``device`` (``auto``: the GPU when
    there is one); images, maps and records stay on the CPU.

    Returns:
        The path of the figure (``explanations.png``).
    """
    try:
        where = resolve_device(device)
    except ConfigError:  # its message names the config key; here the user gave the flag
        raise ConfigError(f"--device {device}: no GPU is available here; use --device auto or --device cpu") from None
    paths = [Path(p) for p in paths]  # strings too, from Python
    check_image_paths(paths)
    check_run_folder(run_dir)
    cfg, models, run_record = load_run_models(run_dir, where)
    spec = run_explainer(cfg, explainer)
    c, h, w = run_record["dataset"]["image_shape"]
    class_names = run_record["dataset"]["class_names"]
    images = torch.stack([load_image(p, c, (h, w)) for p in paths])
    with torch.no_grad():
        probs = {
            role: torch.softmax(m(images.to(model_device(m, images.device))), 1).cpu() for role, m in models.items()
        }
    targets = probs["teacher"].argmax(1)
    maps = explain_run_models(spec, run_models(cfg, models), images, targets)
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
                "explained": list(maps),
                "images": [str(p) for p in paths],
                "target": [class_names[int(t)] for t in targets],
                "predictions": {r: [class_names[int(i)] for i in pr.argmax(1)] for r, pr in probs.items()},
                "probabilities": {r: pr.tolist() for r, pr in probs.items()},
            },
        ),
    )
    return fig
