"""The distiller contract.

A :class:`Distiller` holds the student, a frozen eval-mode teacher (or none) and any adapters, and
maps a :class:`~xkd.data.base.Batch` to ``(student_logits, {term_name: weighted_loss})``. The
trainer only sums the terms and logs each by name (the pattern of mdistiller). Adding a method is
one class with a ``Params`` dataclass and one :data:`~xkd.registry.DISTILLERS` decorator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xkd.data.base import Batch
from xkd.errors import ConfigError, ContractError, XkdError
from xkd.registry import DISTILLERS
from xkd.schema import from_dict


@dataclass
class NoParams:
    """A distiller without parameters."""


@dataclass
class DistillContext:
    """What a distiller may need before training starts (:meth:`Distiller.setup`).

    Attributes:
        sample: a small input batch ``(B, C, H, W)`` (zeros) of the data's shape, for dry runs that
            probe feature shapes (adapters are built from them).
        train: the training split (a dataset of ``(image, label, mask)``), for methods with a phase
            before distillation (XDistillation's auto-encoder).
        cache_dir: a folder for artefacts worth keeping between runs (teacher explanations).
        teacher_key: identifies the teacher's weights (e.g. the hash of its checkpoint), for cache keys.
        device: where training runs.
        seed: the run's seed.
        progress: show progress bars.
    """

    sample: Tensor
    train: Any = None
    cache_dir: Path | None = None
    teacher_key: str | None = None
    device: torch.device = torch.device("cpu")
    seed: int = 0
    progress: bool = False


TABLE_ROWS = 65_536
"""Rows per chunk when a distiller turns every training image's cached logits into its own table
(:meth:`Distiller.teacher_table`): the temporaries of one chunk, not of the whole cache, are held at
once (at ImageNet's 1.28M x 1000 a whole-cache log-softmax holds several 5-GB temporaries)."""


def cached_rows(table: Tensor | None, batch: Batch) -> Tensor | None:
    """The rows of ``table`` (one per training image, by dataset index) of ``batch``'s images, on the
    images' device; None when there is no table or the batch carries no indices."""
    if table is None or batch.indices is None:
        return None
    return table[batch.indices.to(table.device)].to(batch.images.device)


class Distiller(nn.Module):
    """Base class of every distillation method.

    Args:
        student: the network being trained.
        teacher: a trained network; it is frozen (``requires_grad=False``) and kept in eval mode,
            also after ``distiller.train()``. ``None`` for methods that need no teacher.
        params: an instance of the class's ``Params`` dataclass.
    """

    Params: ClassVar[type] = NoParams
    needs_teacher: ClassVar[bool] = True
    #: the method reads nothing of the teacher but its logits (:meth:`teacher_logits`), so logits
    #: computed once per training image can stand in for the teacher's forward pass
    teacher_logits_only: ClassVar[bool] = False
    registry_name: ClassVar[str] = ""
    setup_reused_seconds: float = 0.0
    """Seconds that cached artefacts reused by :meth:`setup` took when they were built (e.g.
    XDistillation's teacher explanations and CAE): part of the method's cost although this run
    did not spend them. The pipeline adds them to the measured setup time."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, params: Any = None) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ConfigError(f"distiller {self.registry_name!r} needs a teacher")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.params = params if params is not None else self.Params()
        self.cached_teacher_logits: Tensor | None = None
        self.cached_teacher_table: Tensor | None = None

    def use_teacher_logits(self, logits: Tensor | None, labels: Tensor | None = None) -> None:
        """Read the teacher's logits from ``logits`` (one row per training image, by dataset index)
        instead of running the teacher; only valid when the training images are fed unaugmented.
        ``labels``: the training images' labels, by the same index. When the method derives a table
        of its own from them (:meth:`teacher_table`), the table is kept instead of the logits: one
        per-image table on the device, not two."""
        if logits is not None and not self.teacher_logits_only:
            raise ValueError(f"distiller {self.registry_name!r} needs the teacher's forward pass, not only its logits")
        self.cached_teacher_logits, self.cached_teacher_table = logits, None
        if logits is None:
            return
        labels = None if labels is None else labels.to(logits.device)
        table = None
        for start in range(0, logits.shape[0], TABLE_ROWS):
            rows = slice(start, start + TABLE_ROWS)
            part = self.teacher_table(logits[rows], None if labels is None else labels[rows])
            if part is None:
                return
            if table is None:
                table = part.new_empty((logits.shape[0], *part.shape[1:]))
            table[rows] = part
        if table is not None:
            self.cached_teacher_logits, self.cached_teacher_table = None, table

    def teacher_table(self, logits: Tensor, labels: Tensor | None) -> Tensor | None:
        """What a step reads of the teacher instead of its logits, computed once from rows of the
        cached logits and their labels (None when not given), :data:`TABLE_ROWS` rows at a time, e.g.
        KD's soft targets. None (the default): steps read the logits themselves."""
        return None

    def teacher_rows(self, batch: Batch) -> tuple[Tensor | None, Tensor | None]:
        """``(rows of the cached table, None)`` for ``batch`` when there is a table and the batch
        carries indices, else ``(None, the teacher's logits)`` (:meth:`teacher_logits`)."""
        rows = cached_rows(self.cached_teacher_table, batch)
        return (rows, None) if rows is not None else (None, self.teacher_logits(batch))

    def teacher_logits(self, batch: Batch) -> Tensor:
        """The teacher's logits of ``batch`` (no gradient): read by sample index from the cached
        logits when there are some and the batch carries indices, else computed."""
        cached = cached_rows(self.cached_teacher_logits, batch)
        if cached is not None:
            return cached
        with torch.no_grad():
            return self.teacher(batch.images)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def setup(self, context: DistillContext) -> None:
        """Build whatever depends on the data before the optimiser is created (adapters sized by a
        dry run on ``context.sample``, a pre-training phase). Called once by :func:`build_distiller`;
        the default does nothing. Modules created here must be returned by :meth:`trainable_modules`
        (or frozen)."""

    def preflight(self, sample: Tensor) -> None:
        """Cheap checks before anything trains (:func:`xkd.prepare.preflight`), on untrained models:
        layer paths are already resolved by ``__init__``; methods override this to check what a dry
        run on ``sample`` shows (e.g. that a layer's output has the shape the method needs). Must not
        run expensive setup (explanations, pre-training). The default does nothing."""

    def check_data(self, train: Any, augmented: bool = False) -> None:
        """Cheap checks of the training split before anything trains (:func:`xkd.prepare.preflight`),
        e.g. that it has enough images for the method's negatives (CRD), or that its images are not
        augmented when the method caches the teacher's view of them (frozen e2KD). The default does
        nothing."""

    def teacher_outputs(self) -> str | None:
        """How the teacher's outputs reach the loss when the method serves them itself (e2KD's frozen
        explanations), recorded per model; ``None``: the pipeline's account (a forward per batch, or
        its cached logits)."""
        return None

    def trainable_modules(self) -> nn.ModuleDict:
        """Modules whose parameters the optimiser updates and checkpoints hold: the student and
        any adapters. Subclasses with adapters extend this."""
        return nn.ModuleDict({"student": self.student})

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the student logits and a dict of weighted loss terms for ``batch``."""
        raise NotImplementedError


DISTILLERS.expects(
    lambda obj: isinstance(obj, type) and issubclass(obj, Distiller),
    "register a subclass of xkd.distill.Distiller (with a Params dataclass and a forward)",
)


def check_forward(output: Any, batch_size: int, who: str, classes: int | None = None) -> None:
    """The contract of :meth:`Distiller.forward` for ``output``, from metadata alone (no device wait):
    ``(logits (N, classes), {name: scalar loss tensor, ...})`` with at least one term. Raises
    :class:`~xkd.errors.ContractError` naming ``who`` (e.g. ``"distiller 'mine' (student 'a')"``)."""
    contract = "forward(batch) returns (logits of shape (N, classes), {term name: scalar loss tensor, ...})"
    if not (isinstance(output, tuple) and len(output) == 2):
        raise ContractError(f"{who} returned {type(output).__name__}; {contract}")
    logits, terms = output
    wrong = classes is not None and isinstance(logits, Tensor) and logits.ndim == 2 and logits.shape[1] != classes
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != batch_size or wrong:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        of = f"{batch_size} images" + ("" if classes is None else f" of {classes} classes")
        raise ContractError(f"{who} returned logits {shape} for {of}; {contract}")
    if not isinstance(terms, Mapping) or not terms:
        raise ContractError(
            f"{who} returned {'no loss terms' if isinstance(terms, Mapping) else repr(type(terms).__name__)}; {contract}"
        )
    bad = [k for k, t in terms.items() if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point()]
    if bad:
        raise ContractError(
            f"{who}: loss term {bad[0]!r} is not a scalar floating-point tensor (reduce it with .mean() or .sum()); {contract}"
        )


def distiller_params(name: str, params: dict[str, Any] | None, path: str = "params") -> Any:
    """Validate ``params`` for distiller ``name`` (types, unknown keys and ranges).

    The built-in distillers are registered by then: importing this module runs ``xkd/distill/__init__.py``,
    which imports every distiller module."""
    return from_dict(DISTILLERS.get(name).Params, params or {}, path)


def build_distiller(
    name: str,
    student: nn.Module,
    teacher: nn.Module | None = None,
    params: dict[str, Any] | None = None,
    context: DistillContext | None = None,
) -> Distiller:
    """Build registered distiller ``name``; checks that teacher and student agree on classes.

    With ``context``, :meth:`Distiller.setup` runs (adapters, pre-training phases). The model to
    evaluate after training is ``distiller.student`` (a method may wrap the student passed in, e.g.
    MED-TEX puts its explainer in front of it)."""
    cls = DISTILLERS.get(name)
    p = distiller_params(name, params)
    if teacher is not None and cls.needs_teacher:
        ns, nt = num_classes_of(student), num_classes_of(teacher)
        if ns is not None and nt is not None and ns != nt:
            raise ConfigError(
                f"teacher predicts {nt} classes but the student predicts {ns}; "
                "build both for the same dataset (same num_classes)"
            )
    distiller = cls(student, teacher if cls.needs_teacher else None, p)
    if context is not None:
        try:
            distiller.setup(context)
        except (XkdError, torch.cuda.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # a user's setup: named, with its own traceback chained
            raise ContractError(f"distiller {name!r}: setup failed: {type(e).__name__}: {e}") from e
    return distiller


def num_classes_of(model: nn.Module) -> int | None:
    """Classes ``model`` predicts: its ``num_classes`` attribute, else its last Linear layer's outputs."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return None if last is None else last.out_features
