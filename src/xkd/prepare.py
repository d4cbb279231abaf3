"""Building a run's models and checking the run before anything trains or is written: every
layer path (distillers', explainers', transfer layers) resolved on untrained models, each
distiller's dry run, and each training's precision and optimiser on the device. A mistake found
here costs seconds; found after training, it cost the whole training."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from xkd.config import ModelConfig, RunConfig
from xkd.data import DataBundle
from xkd.data.base import BatchLoader
from xkd.distill import build_distiller
from xkd.engine.runtime import build_optimizer, resolve_amp
from xkd.errors import ConfigError, ContractError, LayerNotFoundError
from xkd.explain.base import check_map_shape
from xkd.metrics.base import declared, default_metrics
from xkd.models import build_model
from xkd.models.hooks import get_module
from xkd.plan import RunPlan, StudentSpec
from xkd.registry import METRICS

log = logging.getLogger("xkd")


def build_for(cfg: ModelConfig, data: DataBundle, seed: int) -> nn.Module:
    """Build ``cfg`` for ``data``'s shape with a seeded initialisation."""
    torch.manual_seed(seed)
    c, h, w = data.image_shape
    return build_model(cfg, data.num_classes, c, h if h == w else (h, w))


def preflight(plan: RunPlan, data: DataBundle) -> None:
    """Check every student's distiller on UNTRAINED models before anything trains or is written.

    Builds the teacher, each student (and each teacher assistant) architecture and each distiller
    without its setup, so every ``layers`` path is resolved (a wrong one raises
    :class:`~xkd.errors.LayerNotFoundError` listing the model's module paths) and runs the
    distiller's cheap :meth:`~xkd.distill.base.Distiller.preflight` (a dry run checking feature
    shapes). Nothing expensive runs (no XDistillation explanations or CAE training).
    """
    cfg = plan.cfg
    sample = torch.zeros(2, *data.image_shape)
    teacher = build_for(cfg.teacher.model, data, cfg.seed).eval()

    def check(spec: StudentSpec, source: nn.Module) -> nn.Module:
        student = build_for(spec.model, data, cfg.seed)
        try:
            distiller = build_distiller(spec.distiller, student, source, spec.params)
            distiller.preflight(sample)
            distiller.check_data(data.train, cfg.data.augment.enabled)
        except LayerNotFoundError as e:
            raise LayerNotFoundError(f"student {spec.name!r} (distiller {spec.distiller!r}): {e}") from None
        except ValueError as e:  # a layer whose output shape the method cannot use: a config mistake
            raise ConfigError(f"student {spec.name!r} (distiller {spec.distiller!r}): {e}") from e
        return distiller.student.eval()  # the evaluated model: a method may wrap the student (MED-TEX)

    models = {"teacher": teacher}
    for s in plan.students:
        source = teacher if s.assistant is None else check(s.assistant, teacher)
        if s.assistant is not None:  # trained between the teacher and the student: its logits checked too
            check_logits(source, sample, data.num_classes, f"{s.name}'s assistant")
        models[s.name] = check(s, source)
    for role, model in models.items():
        check_logits(model, sample, data.num_classes, role)
    preflight_evaluation(plan, models, data)


@torch.no_grad()
def check_logits(model: nn.Module, sample: Tensor, classes: int, role: str) -> None:
    """``model`` (untrained, in eval mode) returns logits ``(N, classes)`` for ``sample``: a user's model
    whose head ignores the data's classes failed in training (a label out of range) or, wider than
    the classes, trained without a word."""
    out = model(sample)
    if not isinstance(out, Tensor) or tuple(out.shape) != (sample.shape[0], classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ContractError(
            f"the {role} model returns {got} for {sample.shape[0]} images of a {classes}-class data set; a model "
            f"returns logits (N, classes): give its builder a num_classes parameter (xkd passes the data's) or "
            "build its head for this data"
        )


def preflight_evaluation(plan: RunPlan, models: dict[str, nn.Module], data: DataBundle) -> None:
    """The evaluation checked on every untrained model it will be used on: the layer paths
    (explainers' ``layer``/``layers``, ``transfer_layers``) and each explainer's params against the
    images' shape (an occlusion window larger than the images); a wrong one used to fail after every
    model had trained. Metrics listed in ``evaluation.metrics`` that need masks the data does not
    have are warned about (the default list relies on their being skipped, so no warning then), and
    so are image counts larger than the data; metrics that cannot score images this small or this few
    are an error."""
    ev, teacher = plan.cfg.evaluation, models["teacher"]
    # a user's explainer is tried on test images (its maps checked), gathered once for all of them
    users = [e for e in plan.explainers if not e.cls.__module__.startswith("xkd.")]
    probe = next(iter(BatchLoader(data.test, max(2, *(e.min_images for e in users))))) if users else None
    for i, e in enumerate(plan.explainers):
        for role, model in models.items():
            if (e.pair and role == "teacher") or not e.applies(model):
                continue
            try:
                with e.build(model, teacher=teacher, base=model) as explainer:
                    explainer.check_image_shape(data.image_shape)
                    if e in users:
                        maps = explainer.explain(probe.images, probe.labels).maps
                        check_map_shape(maps, tuple(data.image_shape[1:]), len(probe), method=e.key)
            except LayerNotFoundError as err:
                raise LayerNotFoundError(
                    f"evaluation.explainers[{i}] ({e.key}) on {role}: {err}. A layer set in an explainer's params is "
                    "looked up in every model it explains; leave it unset to use each model's default layer"
                ) from None
            except ConfigError as err:
                raise ConfigError(f"evaluation.explainers[{i}] ({e.key}): {err}") from None
    listed, defaults = set(ev.metrics or ()), set(default_metrics())
    # the default list (written out by resolve, less the metrics needing an independent student): its
    # mask metrics are skipped without a word; one listed beyond it is said
    defaulted = {m for m in defaults if "independent_maps" not in METRICS.get(m).needs} <= listed
    unmasked = [
        m.name for m in declared() if m.name in listed and "masks" in m.needs and not (defaulted and m.name in defaults)
    ]
    if unmasked and not data.has_masks:
        one = len(unmasked) == 1
        log.warning(
            "evaluation.metrics: %s %s ground-truth masks and %s has none, so %s skipped; use data with masks "
            "(lesions, concepts, an image folder with masks) or drop %s",
            ", ".join(unmasked), "needs" if one else "need", data.name, "it is" if one else "they are",
            "it" if one else "them",
        )  # fmt: skip
    side, size = min(data.image_shape[1:]), "x".join(map(str, data.image_shape[1:]))
    small = [m for m in declared() if m.name in listed and side < m.min_side]
    if small:
        needs = ", ".join(f"{m.name} needs images of at least {m.min_side}x{m.min_side}" for m in small)
        raise ConfigError(
            f"evaluation.metrics: {needs}; the {data.name} images are {size}: raise data.image_size or drop "
            f"{'it' if len(small) == 1 else 'them'} from evaluation.metrics"
        )
    n_test = len(data.test)
    explained = n_test if ev.num_images is None else min(ev.num_images, n_test)
    few = [m for m in declared() if m.name in listed and explained < m.min_images]
    if few:  # FSS and RS on a 2-image test split raised after training
        raise ConfigError(
            f"evaluation.metrics: {', '.join(f'{m.name} needs at least {m.min_images}' for m in few)} explained "
            f"images and the run explains {explained} (the test split has {n_test}): explain more test images "
            f"(evaluation.num_images, data.test_size, or more data), or drop {'it' if len(few) == 1 else 'them'} "
            "from evaluation.metrics"
        )
    for key in ("teacher", "student"):
        path = ev.transfer_layers.get(key)
        for role, model in models.items():
            if path and (role == "teacher") == (key == "teacher"):
                try:
                    get_module(model, path)
                except LayerNotFoundError as err:
                    raise LayerNotFoundError(f"evaluation.transfer_layers.{key} on {role}: {err}") from None
    for key, cap, what in (("num_images", n_test, "the test split has"), ("met_images", explained, "the run explains"),
                           ("sanity_images", explained, "the run explains")):  # fmt: skip
        want = getattr(ev, key)
        if want is not None and want > cap:
            log.warning("evaluation.%s %d: %s %d images; all of them are used", key, want, what, cap)


def check_training_settings(cfg: RunConfig, device: torch.device) -> None:
    """The precision and optimiser of the teacher's and the students' training on ``device``, checked
    before anything trains: ``fp16`` off a GPU, ``bf16`` on a GPU without it or a ``fused: true`` that
    torch cannot build there would otherwise fail only when that model's training starts."""
    probe = [nn.Parameter(torch.zeros(1, device=device))]
    for key, train in (("teacher.train", cfg.teacher.train), ("train", cfg.train)):
        resolve_amp(train.amp, device, f"{key}.amp")
        try:
            build_optimizer(probe, train, device)
        except ConfigError as e:
            raise ConfigError(f"{key}.{e}") from None
