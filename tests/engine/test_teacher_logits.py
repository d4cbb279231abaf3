"""Batches carry their items' indices; a distiller that reads only the teacher's logits gets them
from a cache computed once per training image, with the same loss as running the teacher."""

from __future__ import annotations

import pytest
import torch

from xkd.data import BatchLoader, make_loader
from xkd.data.base import Batch
from xkd.distill import build_distiller
from xkd.engine.runtime import predict_logits
from xkd.engine.trainer import Trainer
from xkd.files import read_json
from xkd.plan import load_config
from xkd.registry import DISTILLERS
from xkd.runner import run


def test_in_memory_and_item_datasets_give_the_same_batches_with_their_indices(tiny_data, item_by_item):
    ds = tiny_data(n=10)
    ds.images = (ds.images * 255).to(torch.uint8)  # stored as bytes, scaled on access
    order = torch.tensor([3, 1, 4, 0, 9, 2, 6, 5, 8, 7])
    fast = list(BatchLoader(ds, 4, order))
    slow = list(BatchLoader(item_by_item(ds), 4, order))
    assert [len(b) for b in fast] == [4, 4, 2]
    for a, b in zip(fast, slow):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        assert a.images.dtype == torch.float32 and a.images.max() <= 1.0
    assert torch.equal(torch.cat([b.indices for b in fast]), order)


def test_the_epoch_order_is_the_seeded_random_sampler_order(tiny_data):
    ds = tiny_data(n=10)
    g = torch.Generator().manual_seed(7)
    expected = list(torch.utils.data.RandomSampler(ds, generator=g))
    trainer_order = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    assert trainer_order == expected  # the permutation the trainer draws is RandomSampler's
    shuffled = make_loader(ds, 3, shuffle=True, seed=1)
    first, second = ([int(i) for b in shuffled for i in b.indices] for _ in range(2))
    assert sorted(first) == list(range(10)) and first != second  # reshuffled every pass


# XDistillation reads cached logits too; its student needs the CAE phase first, so the pipeline test covers it
LOGITS_ONLY = [n for n in DISTILLERS if DISTILLERS.get(n).teacher_logits_only and n != "xdistill"]


@pytest.mark.parametrize("with_labels", [False, True], ids=["logits", "logits_and_labels"])
@pytest.mark.parametrize("name", LOGITS_ONLY)
def test_cached_logits_give_the_loss_of_the_teacher_forward(
    name, with_labels, tiny_pair, tiny_data, device, monkeypatch
):
    # with the labels a method may also compute its label-dependent teacher terms once (DKD's table);
    # tables are built by chunks of rows (3 here: 3 + 3 + 2 of the 8 images)
    monkeypatch.setattr("xkd.distill.base.TABLE_ROWS", 3)
    student, teacher = tiny_pair
    data = tiny_data(n=8)
    d = build_distiller(name, student, teacher, {}).to(device)
    batch = data.batch(torch.tensor([5, 2, 7, 0])).to(device)
    _, direct = d(batch)
    logits = predict_logits(teacher, data, device).to(device)  # on the device, as the pipeline hands them over
    d.use_teacher_logits(logits, data.labels if with_labels else None)  # labels on the CPU, as dataset_labels gives
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    _, cached = d(batch)
    hook.remove()
    assert not calls  # the teacher did not run
    if name == "dkd":  # its teacher side is read by index only when the labels were given
        assert (d.cached_teacher_table is not None) == with_labels
    # methods that turn the logits into their own per-image table do not also keep the logits
    replaced = name in ("hinton_kd", "dist") or (name == "dkd" and with_labels)
    assert (d.cached_teacher_logits is None) == replaced
    for k in direct:
        torch.testing.assert_close(cached[k], direct[k], rtol=1e-6, atol=1e-7)
    # a batch built by hand has no indices: the teacher runs
    d(Batch(batch.images, batch.labels))


def test_a_method_that_needs_the_teacher_forward_refuses_cached_logits(tiny_pair):
    student, teacher = tiny_pair
    at = build_distiller("at", student, teacher, {})
    with pytest.raises(ValueError, match="needs the teacher's forward pass"):
        at.use_teacher_logits(torch.zeros(4, 3))


def test_a_kd_run_computes_the_teacher_logits_once_and_records_it(tmp_path, make_tiny_args, monkeypatch):
    seen = []
    real = Trainer._train_epoch

    def count_teacher(self, model, epoch, progress):
        teacher = getattr(self.distiller, "teacher", None)
        hook = teacher.register_forward_hook(lambda *a: seen.append(self.role)) if teacher is not None else None
        try:
            return real(self, model, epoch, progress)
        finally:
            if hook is not None:
                hook.remove()

    monkeypatch.setattr(Trainer, "_train_epoch", count_teacher)
    students = (
        "students=[{name: kd, distiller: hinton_kd}, {name: at, distiller: at}, "
        "{name: e2kd, distiller: e2kd, params: {frozen_explanations: true}}]"
    )
    args = make_tiny_args(tmp_path, students)
    run_dir = run(load_config(None, args), progress=False)
    # KD read cached logits, frozen e2KD its cached logits and maps; AT needs the teacher's features
    assert "kd" not in seen and "e2kd" not in seen and "at" in seen
    models = read_json(run_dir / "records" / "models.json")["models"]
    assert models["kd"]["train"]["teacher_outputs"] == "cached logits"
    assert models["e2kd"]["train"]["teacher_outputs"] == "frozen logits and Grad-CAMs (computed once, cached)"
    assert models["at"]["train"]["teacher_outputs"] == "forward per batch"
    assert models["teacher"]["train"]["teacher_outputs"] is None
    assert list((tmp_path / "runs" / ".cache" / "teacher_logits").glob("train-*.safetensors"))
    # a second run with the same teacher and data reads them and counts what they cost
    again = run(load_config(None, [*args, "name=again"]), progress=False)
    kd = read_json(again / "records" / "models.json")["models"]["kd"]["train"]
    assert kd["setup_reused_seconds"] > 0
