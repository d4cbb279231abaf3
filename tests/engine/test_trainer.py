"""The trainer: checkpoints, resume, NaN stop, determinism, safe loading."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from torch import nn

from xkd.config import ConfigError, OptimizerConfig, SchedulerConfig, TrainConfig
from xkd.data.base import TensorImageDataset
from xkd.distill import build_distiller
from xkd.distill.base import Distiller
from xkd.engine import CheckpointError, NonFiniteLossError, Trainer, load_checkpoint, load_weights, save_checkpoint


def blobs(n=96, seed=0) -> TensorImageDataset:
    """Class k = a bright square in quadrant k: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.2
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, r * 4 : r * 4 + 4, q * 4 : q * 4 + 4] += 0.8
    return TensorImageDataset(x, labels)


@pytest.fixture
def student(tiny_model):
    """``student(seed=0)``: the tiny kdfmv_cnn (widths [4, 8]) for the 4 classes of 8x8 :func:`blobs`."""
    return lambda seed=0: tiny_model("student", seed, num_classes=4, size=8, widths=[4, 8])


@pytest.fixture
def fit(student):
    """``fit(folder, epochs=2, resume=False, model=None, **train)``: scratch training on :func:`blobs`;
    returns the result and the trained model."""

    def run(tmp_path, epochs=2, resume=False, model=None, **kw):
        model = model or student()
        cfg = TrainConfig(
            epochs=epochs, batch_size=16, optimizer=OptimizerConfig(lr=0.01), scheduler=SchedulerConfig("cosine"), **kw
        )
        tr = Trainer(
            build_distiller("scratch", model),
            blobs(),
            blobs(32, 1),
            cfg,
            checkpoint_dir=tmp_path,
            seed=0,
            progress=False,
        )
        return tr.fit(resume=resume), model

    return run


def test_training_learns_and_writes_best_and_last(tmp_path, fit):
    result, model = fit(tmp_path, epochs=3)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_accuracy > 0.5
    last = load_checkpoint(tmp_path / "last.pt")
    best = load_checkpoint(tmp_path / "best.pt")
    assert last["epoch"] == 3 and best["epoch"] == result.best_epoch
    assert set(last["history"][0]) >= {"train_loss", "val_accuracy", "terms", "lr"}


def test_same_seed_same_weights(tmp_path, fit):
    _, a = fit(tmp_path / "a")
    _, b = fit(tmp_path / "b")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


class FailAfter(Distiller):
    """Scratch training whose forward pass number ``calls + 1`` and later fail: with ``"interrupt"``
    they raise KeyboardInterrupt (Ctrl-C), with ``"nan"`` their loss is NaN."""

    needs_teacher = False

    def __init__(self, student, calls, failure):
        super().__init__(student)
        self.calls, self.failure, self.n = calls, failure, 0

    def forward(self, batch):
        self.n += 1
        failing = self.n > self.calls
        if failing and self.failure == "interrupt":
            raise KeyboardInterrupt
        logits = self.student(batch.images)
        loss = nn.functional.cross_entropy(logits, batch.labels)
        return logits, {"ce": loss * float("nan") if failing else loss}


def test_resume_after_interruption_gives_the_same_weights(tmp_path, student, fit):
    _, straight = fit(tmp_path / "straight", epochs=3)
    cfg = TrainConfig(epochs=3, batch_size=16, optimizer=OptimizerConfig(lr=0.01), scheduler=SchedulerConfig("cosine"))
    interrupted = Trainer(
        FailAfter(student(), 96 // 16 + 2, "interrupt"),
        blobs(),
        blobs(32, 1),
        cfg,
        checkpoint_dir=tmp_path / "split",
        seed=0,
        progress=False,
    )
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()  # stops in epoch 2; last.pt holds epoch 1
    assert load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 1
    before = load_checkpoint(tmp_path / "split" / "last.pt")["seconds"]  # epoch 1's time, kept for the resume
    result, resumed = fit(tmp_path / "split", epochs=3, resume=True, model=student(seed=123))
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    for (k, va), vb in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    # the time counts every process: the first one's epoch too (it counted 0 s for a finished training)
    assert before > 0 and result.seconds > before
    assert load_checkpoint(tmp_path / "split" / "last.pt")["seconds"] > before
    again, _ = fit(tmp_path / "split", epochs=3, resume=True, model=student(seed=123))  # nothing left to train
    assert again.seconds >= load_checkpoint(tmp_path / "split" / "last.pt")["seconds"]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, student):
    model = student()
    steps_per_epoch = 96 // 16
    tr = Trainer(
        FailAfter(model, steps_per_epoch + 2, "nan"),
        blobs(),
        blobs(32, 1),
        TrainConfig(epochs=3, batch_size=16),
        checkpoint_dir=tmp_path,
        progress=False,
        role="kd",
    )
    with pytest.raises(
        NonFiniteLossError, match=r"kd: the loss became nan at epoch 2, step 3 .*last good checkpoint is kept"
    ):
        tr.fit()
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_epoch_loss_and_accuracy_weigh_every_image_once_with_a_partial_last_batch(student):
    # learning rate 0 and no batch norm: every step sees the same weights, so the epoch's loss and
    # accuracy are the per-image means over the whole split, computed here in one pass.
    # 803 images in batches of 16: 51 steps (two full 25-step windows and one of 1 step), the last 3 images.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    data = blobs(803)
    cfg = TrainConfig(epochs=1, batch_size=16, optimizer=OptimizerConfig("sgd", lr=0.0, weight_decay=0.0))
    h = Trainer(build_distiller("scratch", model), data, blobs(32, 1), cfg, progress=False).fit().history[0]
    with torch.no_grad():
        logits = model(data.images)
    per_image = nn.functional.cross_entropy(logits, data.labels, reduction="none")
    assert h["images"] == 803
    assert h["train_loss"] == pytest.approx(float(per_image.double().mean()), rel=1e-6)
    assert h["terms"]["ce"] == pytest.approx(h["train_loss"], rel=1e-12)
    assert h["train_accuracy"] == pytest.approx(float((logits.argmax(1) == data.labels).double().mean()), abs=1e-12)


@pytest.mark.parametrize(
    ("fail_after", "cap", "where"),
    [
        (25, None, "epoch 1, step 26"),  # the first step of the second window
        (50, None, "epoch 1, step 51"),  # the last, partial window (1 step, 3 images)
        (30 + 28, 30, "epoch 2, step 29"),  # epochs capped at 30 steps: 25 + a window of 5
    ],
)
def test_a_nan_loss_is_reported_at_its_exact_step_in_any_window(fail_after, cap, where, student):
    cfg = TrainConfig(epochs=2, batch_size=16, max_steps_per_epoch=cap)
    tr = Trainer(
        FailAfter(student(), fail_after, "nan"),
        blobs(803),
        blobs(32, 1),
        cfg,
        progress=False,
        role="kd",
    )
    with pytest.raises(NonFiniteLossError, match=f"kd: the loss became nan at {where} "):
        tr.fit()


def test_checkpoint_of_another_architecture_is_refused(tmp_path, fit, tiny_model):
    fit(tmp_path, epochs=1)
    other = tiny_model("student", num_classes=4, size=8, widths=[4, 16])
    state = load_checkpoint(tmp_path / "best.pt")
    weights = {k.removeprefix("student."): v for k, v in state["model"].items()}
    with pytest.raises(CheckpointError, match="different architecture .* shape mismatch"):
        load_weights(other, weights, "best.pt")


def test_checkpoints_never_unpickle_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": ConfigError("x")}, path)  # an arbitrary class instance
    with pytest.raises(CheckpointError, match="could not be read safely"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_is_atomic_and_round_trips(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(2)}, "history": [{"a": 1}]})
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.ones(2)) and state["history"] == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left behind


def test_written_files_get_the_usual_permissions(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"model": {}})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"epochs": 0}, r"cfg.epochs must be >= 1, got 0"),
        ({"max_steps_per_epoch": 0}, r"cfg.max_steps_per_epoch must be >= 1 or null, got 0"),
    ],
)
def test_a_trainer_refuses_a_budget_that_trains_nothing(tmp_path, fit, kw, match):
    # from Python, TrainConfig(epochs=0) fitted nothing without a word (the CLI's config check refused it)
    with pytest.raises(ConfigError, match=match):
        fit(tmp_path, **kw)
    assert not any(tmp_path.iterdir())


def test_a_resume_under_other_distiller_parameters_is_refused(tmp_path, tiny_pair, tiny_data):
    """A default changed in the code (a user's plugin, a new xkd) while the config stayed the same: the
    checkpoint keeps the resolved parameters it was trained with, and the resume says what changed."""
    from xkd.distill import build_distiller

    student, teacher = tiny_pair
    data = tiny_data()
    cfg = TrainConfig(epochs=2, batch_size=4, max_steps_per_epoch=1)
    old = build_distiller("hinton_kd", student, teacher, {"alpha": 0.5})  # as if 0.5 were the default then
    Trainer(old, data, data, TrainConfig(epochs=1, batch_size=4), checkpoint_dir=tmp_path, progress=False).fit()
    assert load_checkpoint(tmp_path / "last.pt")["distiller_params"]["alpha"] == 0.5
    new = build_distiller("hinton_kd", student, teacher)  # alpha 0.7 now
    with pytest.raises(CheckpointError, match=r"other distiller parameters \(alpha: 0.5 -> 0.7\); resume with"):
        Trainer(new, data, data, cfg, checkpoint_dir=tmp_path, progress=False).fit(resume=True)
    same = build_distiller("hinton_kd", student, teacher, {"alpha": 0.5})
    result = Trainer(same, data, data, cfg, checkpoint_dir=tmp_path, progress=False).fit(resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_a_checkpoint_stays_readable_whatever_the_distillers_params_hold(tmp_path, tiny_pair, tiny_data):
    """An Any-typed param holding a YAML date or a numpy scalar: the checkpoint keeps its JSON form
    (pickled objects made it unreadable under the safe loader)."""
    import dataclasses
    import datetime
    from typing import Any

    import numpy as np
    import torch.nn.functional as F

    from xkd.distill import Distiller

    @dataclasses.dataclass
    class Loose:
        extra: Any = dataclasses.field(default_factory=lambda: {"day": datetime.date(2024, 1, 1), "w": np.float32(0.5)})

    class Plain(Distiller):
        Params = Loose
        needs_teacher = False

        def forward(self, batch):
            logits = self.student(batch.images)
            return logits, {"ce": F.cross_entropy(logits, batch.labels)}

    student, _ = tiny_pair
    data = tiny_data()
    Trainer(
        Plain(student, None, Loose()),
        data,
        data,
        TrainConfig(epochs=1, batch_size=4),
        checkpoint_dir=tmp_path,
        progress=False,
    ).fit()
    extra = load_checkpoint(tmp_path / "last.pt")["distiller_params"]["extra"]  # the safe loader reads it
    assert extra["day"] == "datetime.date(2024, 1, 1)" and isinstance(extra["w"], str)  # numpy's repr varies
