"""Shared fixtures: tiny seeded configs, models and data that run in seconds on a CPU."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from xkd.config import ModelConfig
from xkd.data.base import TensorImageDataset
from xkd.models import build_model
from xkd.plan import load_config
from xkd.rundir import RUN_RECORDS, RunDir

TINY = [
    "name=tiny",
    "data.name=digits",
    "data.image_size=16",
    "data.train_size=240",
    "data.val_size=80",
    "data.test_size=60",
    "teacher.model.name=cifar_resnet",
    "teacher.model.params={depth: 8, width: 8}",
    "teacher.train.epochs=2",
    "teacher.train.batch_size=32",
    "student_model.name=kdfmv_cnn",
    "student_model.params={widths: [4, 8, 8]}",
    "train.epochs=1",
    "train.batch_size=32",
    "evaluation.num_images=24",
    "evaluation.met_images=4",
    "evaluation.samples_per_class=1",
    "evaluation.batch_size=32",
]


def tiny_overrides(tmp_path, *extra: str) -> list[str]:
    return [*TINY, f"output_dir={tmp_path / 'runs'}", *extra]


@pytest.fixture(scope="session")
def make_tiny_args():
    """``make_tiny_args(folder, *extra)``: the tiny run as `--set` overrides writing under folder."""
    return tiny_overrides


def fill_folder(folder: Path, entries, text: str = "name: tiny\n") -> None:
    """Create ``entries`` under ``folder``: relative paths (each file holding ``text``), or a mapping of
    path to its text (None: only its parent folders); a path ending in ``/`` is a folder."""
    items = entries.items() if isinstance(entries, dict) else ((rel, text) for rel in entries)
    for rel, body in items:
        path = folder / rel
        (path if rel.endswith("/") else path.parent).mkdir(parents=True, exist_ok=True)
        if body is not None and not rel.endswith("/"):
            path.write_text(body)


def finish_run(folder: Path, cfg=None) -> RunDir:
    """Make ``folder`` look like a finished run (every record, empty, and ``metrics.json``; ``cfg``'s
    config.yaml when given): what resume, compare and explain decide by, without training."""
    rd = RunDir(folder)
    if cfg is not None:
        rd.create(cfg)
    for kind in RUN_RECORDS:
        rd.write_record(kind, {})
    rd.samples_tensors.write_bytes(b"")
    rd.write_metrics({})
    return rd


@pytest.fixture(scope="session")
def finished_run():
    """``finished_run(folder, cfg=None)``: :func:`finish_run`."""
    return finish_run


@pytest.fixture(scope="session")
def make_folder():
    """``make_folder(folder, entries, text=...)``: :func:`fill_folder`."""
    return fill_folder


@pytest.fixture
def tiny_args(tmp_path):
    """The tiny run as `--set` overrides writing under ``tmp_path``."""
    return tiny_overrides(tmp_path)


@pytest.fixture
def tiny_config(tmp_path):
    """A whole run on 16x16 digits: 2-epoch teacher, three 1-epoch students."""
    return load_config(None, tiny_overrides(tmp_path))


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
        ),
    ]
)
def device(request) -> torch.device:
    """Where a contract test runs: the CPU, and a CUDA device when there is one (the ``cuda`` cases
    are marked ``cuda``; ``make test-gpu`` runs them, and they skip without a GPU)."""
    return torch.device(request.param)


@contextlib.contextmanager
def _no_host_sync(device: torch.device):
    """On a CUDA device, any host-device synchronisation inside the block raises; elsewhere a no-op
    (so the block's code still runs, and is checked, on the CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.fixture(scope="session")
def no_host_sync():
    """``with no_host_sync(device): ...``: the block may not wait for the GPU (checked on CUDA only)."""
    return _no_host_sync


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------------------------- tiny models

TINY_MODELS = {
    "student": ModelConfig("kdfmv_cnn", params={"widths": [4, 8, 8]}),  # ~1.3 k parameters
    "teacher": ModelConfig("cifar_resnet", params={"depth": 8, "width": 4}),  # ~5 k parameters
}


def build_tiny_model(
    role: str = "student",
    seed: int | None = None,
    *,
    num_classes: int = 3,
    channels: int = 1,
    size: int = 16,
    **params,
) -> nn.Module:
    """A tiny xkd model: ``role`` ``"student"`` (kdfmv_cnn, widths [4, 8, 8]) or ``"teacher"``
    (cifar_resnet, depth 8, width 4); ``params`` override the architecture's parameters. With
    ``seed`` the global RNG is seeded first (else the initialisation continues the current stream)."""
    if seed is not None:
        torch.manual_seed(seed)
    cfg = TINY_MODELS[role]
    return build_model(ModelConfig(cfg.name, params={**cfg.params, **params}), num_classes, channels, size)


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(role="student", seed=None, *, num_classes=3, channels=1, size=16, **params)``:
    the tiny student (kdfmv_cnn) or teacher (cifar_resnet) every distiller test builds."""
    return build_tiny_model


@pytest.fixture
def tiny_pair(tiny_model):
    """A tiny ``(student, teacher)`` for 3 classes of 1x16x16 images, seeded 0 and 1."""
    return tiny_model("student", 0), tiny_model("teacher", 1)


class FixedLogits(nn.Module):
    """Returns fixed ``logits`` (a learnable parameter) whatever the input: a loss then depends on
    those numbers only, so it can be checked by hand."""

    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))
        self.num_classes = len(logits[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.logits[: x.shape[0]]


@pytest.fixture(scope="session")
def fixed_logits():
    """``fixed_logits([[z_1, ..., z_K], ...])``: a model returning these logits for any input."""
    return FixedLogits


def tiny_images(n: int = 12, size: int = 16, channels: int = 1, num_classes: int = 3) -> TensorImageDataset:
    """``n`` seeded random images in [0, 1], labels ``0, 1, 2, 0, ...``; class 1 has a brighter top half."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, channels, size, size, generator=g)
    labels = torch.arange(n) % num_classes
    images[labels == 1, :, : size // 2] += 1.0  # some label signal
    return TensorImageDataset(images.clamp(0, 1), labels)


@pytest.fixture(scope="session")
def tiny_data():
    """``tiny_data(n=12, size=16, channels=1, num_classes=3)``: a small seeded image dataset."""
    return tiny_images


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ItemByItem(torch.utils.data.Dataset):
    """The items of an in-memory dataset served one by one, as an image folder that decodes lazily
    serves them (no ``batch`` method: loaders collate it item by item)."""

    def __init__(self, ds: TensorImageDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


@pytest.fixture(scope="session")
def item_by_item():
    """``item_by_item(dataset)``: ``dataset`` without its batched gathering (see :class:`ItemByItem`)."""
    return ItemByItem


def _torchrun_two_cpu_ranks(script: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` with ``args`` under ``torchrun --standalone --nproc_per_node=2`` (CPU ranks, one
    thread each); fails the test with the ranks' stderr when they do not exit cleanly."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def torchrun_two_cpu_ranks():
    """:func:`_torchrun_two_cpu_ranks`, for the tests that train under torchrun."""
    return _torchrun_two_cpu_ranks


def _train_steps(distiller, batch, steps: int, lr: float) -> list[float]:
    """``steps`` Adam steps of ``distiller`` (train mode) on one ``batch``; the loss of each."""
    opt = torch.optim.Adam(distiller.trainable_modules().parameters(), lr=lr)
    distiller.train()
    losses = []
    for _ in range(steps):
        _, terms = distiller(batch)
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture
def train_steps():
    """:func:`_train_steps`, for the "a few steps reduce the loss" checks of the distillers."""
    return _train_steps
