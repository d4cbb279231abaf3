"""Training callbacks: called at the start, after each epoch (once its checkpoints exist) and at the
end; a callback that raises stops training with the epoch's checkpoint kept."""

from __future__ import annotations

import pytest
from tests.engine.test_trainer import blobs

from xkd.config import OptimizerConfig, TrainConfig
from xkd.distill import build_distiller
from xkd.engine import Trainer, load_checkpoint
from xkd.engine.callbacks import Callback


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.stop_after = stop_after

    def on_train_start(self, role, epochs):
        self.calls.append(("start", role, epochs))

    def on_epoch_end(self, role, epoch, stats):
        self.calls.append(("epoch", role, epoch, stats["val_accuracy"], sorted(stats["terms"])))
        if self.stop_after is not None and epoch >= self.stop_after:
            raise KeyboardInterrupt("stop")

    def on_train_end(self, role, history):
        self.calls.append(("end", role, len(history)))


def trainer(tmp_path, tiny_model, callbacks, epochs=3):
    model = tiny_model("student", 0, num_classes=4, size=8, widths=[4, 8])
    cfg = TrainConfig(epochs=epochs, batch_size=16, optimizer=OptimizerConfig(lr=0.01))
    return Trainer(
        build_distiller("scratch", model),
        blobs(),
        blobs(32, 1),
        cfg,
        checkpoint_dir=tmp_path,
        role="s",
        progress=False,
        callbacks=callbacks,
    )


def test_callbacks_see_every_epoch_in_order(tmp_path, tiny_model):
    rec = Recorder()
    result = trainer(tmp_path, tiny_model, [rec]).fit()
    assert [c[0] for c in rec.calls] == ["start", "epoch", "epoch", "epoch", "end"]
    assert rec.calls[0] == ("start", "s", 3)
    assert [c[2] for c in rec.calls[1:4]] == [1, 2, 3]
    assert [c[3] for c in rec.calls[1:4]] == [h["val_accuracy"] for h in result.history]
    assert rec.calls[1][4] == ["ce"]
    assert rec.calls[-1] == ("end", "s", 3)


def test_a_callback_that_raises_stops_training_after_the_checkpoint(tmp_path, tiny_model):
    rec = Recorder(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path, tiny_model, [rec]).fit()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert [c[0] for c in rec.calls] == ["start", "epoch", "epoch"]
