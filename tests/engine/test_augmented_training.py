"""Training with `data.augment`: batches are augmented on the device, reproducibly per epoch (also
after a resume); validation is not; the teacher then runs on the augmented batch."""

from __future__ import annotations

import torch

from xkd.config import AugmentConfig, TrainConfig
from xkd.data.augment import BatchAugment
from xkd.distill import build_distiller
from xkd.engine.trainer import Trainer
from xkd.files import read_json
from xkd.plan import load_config
from xkd.runner import run

FLIP_CROP = AugmentConfig(crop_padding=2, hflip=True)


def train(tiny_model, data, augment, epochs=2, **kwargs):
    model = tiny_model("student", 0)
    d = build_distiller("scratch", model)
    aug = None if augment is None else BatchAugment(augment, tuple(data.images.shape[1:]))
    result = Trainer(d, data, data, TrainConfig(epochs=epochs, batch_size=6), progress=False, augment=aug,
                     **kwargs).fit()  # fmt: skip
    return model, result


def test_augmented_training_is_reproducible_and_differs_from_plain(tiny_model, tiny_data):
    data = tiny_data(n=12)
    a, _ = train(tiny_model, data, FLIP_CROP)
    b, _ = train(tiny_model, data, FLIP_CROP)
    plain, _ = train(tiny_model, data, None)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)  # same seed, same augmented batches
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), plain.parameters()))


def test_validation_never_sees_augmented_images(tiny_model, tiny_data, monkeypatch):
    data = tiny_data(n=12)
    seen = []
    real = BatchAugment.__call__
    monkeypatch.setattr(BatchAugment, "__call__", lambda self, x, g: seen.append(len(x)) or real(self, x, g))
    _, result = train(tiny_model, data, FLIP_CROP, epochs=1)
    assert sum(seen) == 12  # the training images once; the 12 validation images were not augmented


def test_a_resumed_run_sees_the_batches_it_would_have_seen(tiny_model, tiny_data, tmp_path):
    data = tiny_data(n=12)
    straight, _ = train(tiny_model, data, FLIP_CROP, epochs=2)
    train(tiny_model, data, FLIP_CROP, epochs=1, checkpoint_dir=tmp_path)
    model = tiny_model("student", 0)
    aug = BatchAugment(FLIP_CROP, tuple(data.images.shape[1:]))
    Trainer(build_distiller("scratch", model), data, data, TrainConfig(epochs=2, batch_size=6), progress=False,
            augment=aug, checkpoint_dir=tmp_path).fit(resume=True)  # fmt: skip
    for p, q in zip(straight.parameters(), model.parameters()):
        torch.testing.assert_close(p, q)


def test_with_augmentation_the_teacher_runs_on_every_augmented_batch(tmp_path, make_tiny_args):
    args = make_tiny_args(
        tmp_path,
        "students=[{name: kd, distiller: hinton_kd}]",
        "data.augment.hflip=true",
        "data.augment.crop_padding=2",
    )
    run_dir = run(load_config(None, args), progress=False)
    kd = read_json(run_dir / "records" / "models.json")["models"]["kd"]["train"]
    assert kd["teacher_outputs"] == "forward per batch (augmented images)"
    assert not list((tmp_path / "runs" / ".cache").glob("teacher_logits/*"))
