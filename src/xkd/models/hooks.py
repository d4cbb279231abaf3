"""Intermediate features by module path, through forward hooks (the torchdistill pattern).

Unmodified models work: ``with capture_features(model, ["layer3"]) as feats: model(x)`` fills
``feats["layer3"]`` with that module's output. Hooks are removed when the block exits, also on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from xkd.errors import LayerNotFoundError


def module_paths(model: nn.Module, kinds: tuple[type[nn.Module], ...] | None = None) -> list[str]:
    """Dotted paths of the model's sub-modules (optionally only those of the given types)."""
    return [n for n, m in model.named_modules() if n and (kinds is None or isinstance(m, kinds))]


def conv_layer_paths(model: nn.Module) -> list[str]:
    """Paths of every ``nn.Conv2d`` in forward-definition order (shallow to deep)."""
    return module_paths(model, (nn.Conv2d,))


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at ``path``; raises :class:`LayerNotFoundError` listing candidates."""
    modules = dict(model.named_modules())
    if path in modules and path:
        return modules[path]
    convs = conv_layer_paths(model)
    others = [p for p in module_paths(model) if p not in convs]
    shown = convs + others
    more = "" if len(shown) <= 60 else f" ... ({len(shown) - 60} more)"
    raise LayerNotFoundError(
        f"layer {path!r} not found in {type(model).__name__}; module paths (conv layers first): "
        f"{', '.join(shown[:60])}{more}"
    )


def default_layer(model: nn.Module) -> str:
    """The layer explainers use when none is named: the model's ``xkd_default_layer`` if it has
    one (set by xkd's builders), otherwise its last ``nn.Conv2d``."""
    declared = getattr(model, "xkd_default_layer", None)
    if isinstance(declared, str):
        get_module(model, declared)
        return declared
    convs = conv_layer_paths(model)
    if not convs:
        raise LayerNotFoundError(
            f"{type(model).__name__} has no Conv2d layer; name a layer explicitly. Module paths: "
            f"{', '.join(module_paths(model)[:60])}"
        )
    return convs[-1]


def _own_copy(kept: object, output: object) -> object:
    """``kept`` itself when it cannot change after the hook returns, else a clone of it.

    A tensor sharing storage with the module's output (the output itself, or a view of it such as
    ``output.flatten(1)``) is cloned: the model may modify the output in place after the hook ran.
    Cost, measured on one CPU FitNets training step (4 threads, batch 128, 32x32, ``cifar_resnet``
    depth 20 student, depth 56 teacher; best of 3 x 15 steps): hooking ``layer3`` on both models,
    0.882 s with the clone vs 0.890 s without (no measurable difference); hooking all three stages
    on both models, 0.940 s vs 0.915 s (+2.7 %). Memory: one extra copy of each hooked output
    until the next forward pass.
    """
    if not isinstance(kept, Tensor) or not isinstance(output, Tensor):
        return kept
    if kept.untyped_storage().data_ptr() == output.untyped_storage().data_ptr():
        return kept.clone()
    return kept


@contextmanager
def capture_features(
    model: nn.Module,
    paths: Sequence[str],
    detach: bool = False,
    reduce: Callable[[str, Tensor], Tensor] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the modules at ``paths`` during forward passes inside the block.

    Args:
        model: any ``nn.Module``.
        paths: module paths, e.g. ``["layer2", "features.denseblock3"]``.
        detach: store detached outputs (for inspection without gradients).
        reduce: ``reduce(path, output)`` is stored instead of the output, as soon as it is produced
            (e.g. a channel mean, so memory holds a small summary of each layer rather than its
            whole output).

    Yields:
        A dict filled on each forward pass, ``path -> output`` (the last call wins).

    Each stored tensor is the module's output **as it was when the module ran**: a later in-place
    operation (torchvision's ``ReLU(inplace=True)`` right after a BatchNorm) would otherwise
    overwrite the stored tensor, since a hook only keeps a reference. So the output is cloned
    (``clone()`` is differentiable: gradients still reach the module), unless ``reduce`` already
    returned a tensor with its own storage.
    """
    modules = [(p, get_module(model, p)) for p in paths]
    feats: dict[str, Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: object, output: Tensor) -> None:
            out = output.detach() if detach else output
            kept = reduce(name, out) if reduce is not None else out
            feats[name] = _own_copy(kept, out)

        return hook

    try:
        for p, m in modules:
            handles.append(m.register_forward_hook(make_hook(p)))
        yield feats
    finally:
        for h in handles:
            h.remove()
