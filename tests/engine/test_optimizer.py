"""The optimiser the trainer builds: torch's fused implementation on a GPU (``train.optimizer.fused:
auto``), torch's default elsewhere, the same algorithm either way, and checkpoints that resume."""

from __future__ import annotations

import warnings

import pytest
import torch
from rich.progress import Progress

from xkd.config import OptimizerConfig, TrainConfig
from xkd.config_files import read_config
from xkd.distill import build_distiller
from xkd.engine import runtime as R
from xkd.engine.runtime import build_optimizer
from xkd.engine.trainer import SYNC_EVERY, Trainer
from xkd.errors import ConfigError
from xkd.pipeline import train_key

NAMES = ["adam", "adamw", "sgd"]


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]


@pytest.mark.parametrize("name", NAMES)
def test_fused_auto_is_fused_on_a_gpu_only(name):
    # the parameters are on the CPU (the trainer builds its optimiser before moving the model);
    # torch accepts fused=True for them and runs the fused kernel of whatever device they are on
    cfg = TrainConfig(optimizer=OptimizerConfig(name))
    assert build_optimizer(params(), cfg, "cuda").defaults["fused"] is True
    assert not build_optimizer(params(), cfg, "cpu").defaults["fused"]
    off = TrainConfig(optimizer=OptimizerConfig(name, fused=False))
    assert not build_optimizer(params(), off, "cuda").defaults["fused"]
    on = TrainConfig(optimizer=OptimizerConfig(name, fused=True))
    assert build_optimizer(params(), on, "cpu").defaults["fused"] is True


@pytest.mark.parametrize("name", NAMES)
def test_fused_is_the_same_update(name):
    """Fused and default optimisers get the same hyper-parameters: four steps on a fixed quadratic
    land on the same weights (to float32 rounding)."""
    out = []
    for fused in (False, True):
        torch.manual_seed(0)
        ps = params()
        cfg = TrainConfig(optimizer=OptimizerConfig(name, lr=0.05, weight_decay=0.1, momentum=0.8, fused=fused))
        opt = build_optimizer(ps, cfg, "cpu")
        for _ in range(4):
            opt.zero_grad()
            sum(((p - 1.0) ** 2).sum() for p in ps).backward()
            opt.step()
        out.append([p.detach().clone() for p in ps])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out[0][0], params()[0])  # the steps moved the weights


def test_fused_training_resumes_to_the_same_weights(tiny_model, tiny_data, tmp_path):
    data = tiny_data(n=24)

    def trainer(model, epochs, folder):
        cfg = TrainConfig(epochs=epochs, batch_size=8, optimizer=OptimizerConfig(lr=0.01, fused=True))
        return Trainer(build_distiller("scratch", model), data, data, cfg, checkpoint_dir=folder, progress=False)

    straight = tiny_model("student", 0)
    trainer(straight, 3, tmp_path / "straight").fit()
    trainer(tiny_model("student", 0), 2, tmp_path / "split").fit()
    resumed = tiny_model("student", 5)
    split = trainer(resumed, 3, tmp_path / "split")
    assert split.optimizer.defaults["fused"] is True
    result = split.fit(resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.record()["optimizer"] == "adam (fused)"  # recorded per model, shown by the report
    default = Trainer(
        build_distiller("scratch", tiny_model("student", 1)), data, data, TrainConfig(epochs=1), progress=False
    )
    assert default.fit().optimizer == "adam"  # auto on the CPU: torch's default
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("before", "after"), [(False, True), (True, "auto")])
def test_a_resumed_run_steps_with_its_own_optimiser_not_the_checkpoints(before, after, tiny_model, tiny_data, tmp_path):
    """torch's load_state_dict restores the saved groups' ``fused`` flag: a checkpoint written unfused
    (or before the setting existed) would resume unfused on a GPU, and a GPU's fused one fused on the
    CPU, while the record said otherwise. The run's own choice wins, and the record tells the truth."""
    data = tiny_data(n=16)

    def trainer(epochs, fused):
        cfg = TrainConfig(epochs=epochs, batch_size=8, optimizer=OptimizerConfig(lr=0.01, fused=fused))
        model = tiny_model("student", 0)
        return Trainer(build_distiller("scratch", model), data, data, cfg, checkpoint_dir=tmp_path, progress=False)

    trainer(1, before).fit()
    resumed = trainer(2, after)
    result = resumed.fit(resume=True)
    want = after is True
    assert bool(resumed.optimizer.param_groups[0]["fused"]) is want
    assert result.optimizer == ("adam (fused)" if want else "adam")
    step = resumed.optimizer.state[resumed.optimizer.param_groups[0]["params"][0]]["step"]
    assert float(step) == 4  # two epochs of two steps: the restored state went on counting


@pytest.mark.parametrize("before", [False, True])
def test_a_run_resumed_with_the_other_memory_layout_keeps_moments_in_its_parameters_layout(
    before, tiny_model, tiny_data, tmp_path
):
    """Adam's moments are saved in the layout of the run that wrote them; torch's fused kernels (fused:
    auto on a GPU) refuse a parameter and a moment of different layouts, so a resume that flips
    ``train.channels_last`` brings the moments into the parameters' layout (same values)."""
    data = tiny_data(n=16)

    def trainer(epochs, channels_last):
        cfg = TrainConfig(epochs=epochs, batch_size=8, channels_last=channels_last)
        model = tiny_model("student", 0)
        return Trainer(build_distiller("scratch", model), data, data, cfg, checkpoint_dir=tmp_path, progress=False)

    first = trainer(1, before)
    first.fit()
    saved = {id(p): {k: v.clone() for k, v in first.optimizer.state[p].items()} for p in first.modules.parameters()}
    resumed = trainer(1, not before)
    resumed.fit(resume=True)  # nothing left to train: the state is as loaded
    flipped = 0
    for p_old, p in zip(first.modules.parameters(), resumed.modules.parameters()):
        for key, value in resumed.optimizer.state[p].items():
            if value.shape == p.shape:
                flipped += saved[id(p_old)][key].stride() != p.stride()
                assert value.stride() == p.stride(), key
                torch.testing.assert_close(value, saved[id(p_old)][key], rtol=0, atol=0)
    assert flipped  # some moments were saved in the other layout (a conv's, with more than one input channel)


def test_the_optimiser_is_built_on_the_training_device(tiny_model, tiny_data):
    # torch 2.3 checks a fused optimiser's parameter devices when it is built (CPU ones are refused
    # there): the trainer moves its modules first ("meta" stands in for a GPU here)
    data = tiny_data(n=8)
    trainer = Trainer(build_distiller("scratch", tiny_model("student", 0)), data, data, TrainConfig(), device="meta")
    assert {p.device.type for g in trainer.optimizer.param_groups for p in g["params"]} == {"meta"}


def refusing_fused(cls):
    """``cls`` as a torch that has no fused kernel for it."""

    def build(*args, fused=None, **kw):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return cls(*args, **kw)

    return build


def test_fused_true_without_a_fused_kernel_is_one_clear_error(monkeypatch):
    sgd = torch.optim.SGD
    monkeypatch.setattr(R.torch.optim, "SGD", refusing_fused(sgd))
    with pytest.raises(
        ConfigError,
        match=r"optimizer.fused: true is not supported for sgd on cpu .*set fused: auto in that train.optimizer",
    ):
        build_optimizer(params(), TrainConfig(optimizer=OptimizerConfig("sgd", fused=True)), "cpu")
    # auto falls back to torch's default where this torch has no fused kernel
    opt = build_optimizer(params(), TrainConfig(optimizer=OptimizerConfig("sgd")), "cuda")
    assert isinstance(opt, sgd) and not opt.defaults["fused"]


def test_fused_setting_is_checked_and_left_out_of_cache_keys_at_auto():
    with pytest.raises(ConfigError, match="fused"):
        read_config(None, ["train.optimizer.fused=sometimes"])
    auto, on = read_config(None), read_config(None, ["train.optimizer.fused=true"])
    assert on.train.optimizer.fused is True
    assert "fused" not in train_key(auto.train)["optimizer"]  # teachers cached before the setting stay valid
    assert train_key(on.train)["optimizer"]["fused"] is True


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_training_on_a_gpu_steps_with_the_fused_optimizer(tiny_model, tiny_data, no_host_sync):
    cuda = torch.device("cuda")
    data = tiny_data(n=16)
    model = tiny_model("student", 0)
    trainer = Trainer(
        build_distiller("scratch", model), data, data, TrainConfig(epochs=1, batch_size=8), device=cuda, progress=False
    )
    assert trainer.optimizer.defaults["fused"] is True
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit()
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, model.parameters()))
    with no_host_sync(cuda):  # one fused step waits for nothing
        trainer.optimizer.step()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_gpu_training_epoch_reads_the_device_once_per_window_not_per_step(tiny_model, tiny_data):
    # a host read per step stalls a launch-bound GPU step; the engine reads its bookkeeping once per
    # SYNC_EVERY steps, plus the epoch's order copied to the device once
    cuda, steps = torch.device("cuda"), 3 * SYNC_EVERY + 5
    data = tiny_data(n=8 * steps)
    trainer = Trainer(
        build_distiller("scratch", tiny_model("student", 0)), data, data, TrainConfig(epochs=2, batch_size=8),
        device=cuda, progress=False,
    )  # fmt: skip
    trainer.distiller.to(cuda)
    quiet = Progress(disable=True)
    trainer._train_epoch(trainer.distiller, 1, quiet)  # first-step allocations, optimiser state
    torch.cuda.synchronize(cuda)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stats = trainer._train_epoch(trainer.distiller, 2, quiet)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    assert stats["images"] == 8 * steps
    # expected: one per window (4) and the epoch's order copied to the device; one per step would be 80
    assert 1 <= len(syncs) <= -(-steps // SYNC_EVERY) + 2, [str(w.message) for w in syncs[:3]]  # 1: captured
