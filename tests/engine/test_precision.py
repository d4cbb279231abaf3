"""Mixed precision, channels-last, torch.compile, out-of-memory and determinism settings of the
trainer, on the CPU (the CUDA cases of the same paths run under `make test-gpu`)."""

from __future__ import annotations

import pytest
import torch

from xkd.config import TrainConfig
from xkd.distill import build_distiller
from xkd.distill.logits import kd_loss
from xkd.engine import trainer as T
from xkd.engine.runtime import configure_determinism, resolve_amp
from xkd.engine.trainer import Trainer, validation_batch_size
from xkd.errors import ConfigError, DeviceMemoryError, XkdError

CPU = torch.device("cpu")


def test_amp_choices_resolve_per_device():
    assert resolve_amp("auto", CPU) is None  # auto: bf16 only on a CUDA device that supports it
    assert resolve_amp("off", CPU) is None
    assert resolve_amp("bf16", CPU) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device.*use bf16 or off"):
        resolve_amp("fp16", CPU)


@pytest.mark.parametrize("name", ["scratch", "hinton_kd"])
def test_bf16_training_runs_records_its_precision_and_resumes(name, tiny_pair, tiny_data, tmp_path):
    student, teacher = tiny_pair
    data = tiny_data(n=24)
    cfg = TrainConfig(epochs=2, batch_size=8, amp="bf16")
    d = build_distiller(name, student, teacher if name != "scratch" else None)
    result = Trainer(d, data, data, cfg, checkpoint_dir=tmp_path, progress=False).fit()
    assert result.precision == "bf16" and result.device.startswith("cpu")
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)
    assert result.images_per_second() > 0 and result.history[0]["images"] == 24
    assert all(p.dtype == torch.float32 for p in student.parameters())  # autocast, not a cast of the weights
    more = Trainer(
        d, data, data, TrainConfig(epochs=3, batch_size=8, amp="bf16"), checkpoint_dir=tmp_path, progress=False
    )
    resumed = more.fit(resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


def test_kd_loss_stays_fp32_under_autocast():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    exact = kd_loss(s, t, 4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = kd_loss(s.bfloat16(), t.bfloat16(), 4.0)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, kd_loss(s.bfloat16().float(), t.bfloat16().float(), 4.0))
    assert abs(float(mixed - exact)) < 0.05 * abs(float(exact)) + 1e-3


def test_channels_last_trains_the_same_model(tiny_model, tiny_data):
    data = tiny_data(n=16)
    plain, cl = tiny_model("student", 0), tiny_model("student", 0)
    for model, flag in ((plain, False), (cl, True)):
        Trainer(build_distiller("scratch", model), data, data, TrainConfig(epochs=1, batch_size=8, channels_last=flag),
                progress=False).fit()  # fmt: skip
    conv = next(m for m in cl.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain.parameters(), cl.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the same training, another memory layout


def test_compile_wraps_the_training_step(tiny_model, tiny_data, monkeypatch):
    compiled = []
    monkeypatch.setattr(T.torch, "compile", lambda m: compiled.append(m) or m)
    data = tiny_data(n=8)
    d = build_distiller("scratch", tiny_model("student", 0))
    Trainer(d, data, data, TrainConfig(epochs=1, batch_size=4, compile=True), progress=False).fit()
    assert compiled == [d]


def test_compiled_training_is_eager_training_and_resumes(tiny_model, tiny_data, tmp_path):
    # torch.compile for real (inductor on the CPU; about 30 s of compiling here with a cold cache): a KD
    # student trains to the same weights as in eager mode, and its checkpoint (uncompiled modules) resumes
    pytest.importorskip("torch._inductor")
    data = tiny_data(n=12)
    runs = {}
    for compile_ in (False, True):
        student, teacher = tiny_model("student", 0), tiny_model("teacher", 1)
        torch.manual_seed(0)
        d = build_distiller("hinton_kd", student, teacher, {"alpha": 0.5, "temperature": 2.0})
        cfg = TrainConfig(epochs=1, batch_size=4, compile=compile_)
        folder = tmp_path / str(compile_)
        runs[compile_] = Trainer(d, data, data, cfg, checkpoint_dir=folder, progress=False).fit(), student
    (eager, s_eager), (compiled, s_compiled) = runs[False], runs[True]
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-5)
    for a, b in zip(s_eager.parameters(), s_compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    student, teacher = tiny_model("student", 0), tiny_model("teacher", 1)
    d = build_distiller("hinton_kd", student, teacher, {"alpha": 0.5, "temperature": 2.0})
    cfg = TrainConfig(epochs=2, batch_size=4, compile=True)
    more = Trainer(d, data, data, cfg, checkpoint_dir=tmp_path / "True", progress=False).fit(resume=True)
    assert [h["epoch"] for h in more.history] == [1, 2]


def test_out_of_memory_names_the_batch_size_and_keeps_the_last_checkpoint(tiny_model, tiny_data, tmp_path):
    data = tiny_data(n=8)
    d = build_distiller("scratch", tiny_model("student", 0))
    real = d.forward
    calls = []

    def forward(batch):
        calls.append(1)
        if len(calls) > 2:  # epoch 2 (two batches per epoch)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)

    d.forward = forward
    trainer = Trainer(d, data, data, TrainConfig(epochs=3, batch_size=4), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(
        DeviceMemoryError,
        match=r"ran out of memory in epoch 2 at batch size 4 \(CUDA out of memory. Tried to allocate 2.00 GiB\); "
        r"lower train.batch_size \(e.g. 2\).*--resume",
    ) as e:
        trainer.fit()
    assert isinstance(e.value, XkdError)  # the CLI prints it as one line, exit code 2
    assert (tmp_path / "last.pt").is_file()


def test_out_of_memory_while_validating_falls_back_to_the_training_batch(
    tiny_model, tiny_data, tmp_path, monkeypatch, caplog
):
    # validation ran at 256 images per batch whatever train.batch_size, and an OOM there was a raw traceback
    data = tiny_data(n=8)
    d = build_distiller("scratch", tiny_model("student", 0))
    trainer = Trainer(d, data, data, TrainConfig(epochs=2, batch_size=2), checkpoint_dir=tmp_path, progress=False)
    assert trainer.val_loader.batch_size == 8  # 4x the training batch
    assert [validation_batch_size(b) for b in (1, 32, 64, 100, 256, 512)] == [4, 128, 256, 256, 256, 512]
    real, seen = T.evaluate_model, []

    def tight(model, loader, *args):  # room for the training batch only
        seen.append(loader.batch_size)
        if loader.batch_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(model, loader, *args)

    monkeypatch.setattr(T, "evaluate_model", tight)
    with caplog.at_level("WARNING", logger="xkd"):
        result = trainer.fit()
    assert seen == [8, 2, 2]  # one failed try, then the training batch from then on
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert "out of memory validating 8 images per batch; validating 2 per batch from now on" in caplog.text

    def never(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(T, "evaluate_model", never)
    again = Trainer(d, data, data, TrainConfig(epochs=1, batch_size=2), progress=False)
    with pytest.raises(
        DeviceMemoryError, match=r"validating after epoch 1 at batch size 2 \(CUDA out of memory. Tried to allocate 3"
    ):
        again.fit()


def test_deterministic_flag_turns_torch_determinism_on_and_off_leaves_it_alone():
    assert not torch.are_deterministic_algorithms_enabled()
    configure_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        configure_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
