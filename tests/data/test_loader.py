"""The batch loader: how many worker processes a dataset gets, and datasets held on the device."""

from __future__ import annotations

import pytest
import torch

from xkd.data.base import Batch, BatchLoader, TensorImageDataset, resolve_workers
from xkd.engine.runtime import on_device


def test_workers_only_for_data_that_decodes_lazily(tiny_data, item_by_item, monkeypatch):
    ds = tiny_data(n=6)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert resolve_workers("auto", ds) == 0 and resolve_workers(4, ds) == 0  # gathered by index instead
    assert resolve_workers("auto", item_by_item(ds)) == 8 and resolve_workers(2, item_by_item(ds)) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert resolve_workers("auto", item_by_item(ds)) == 1


def test_lazy_data_through_worker_processes_gives_the_same_batches(tiny_data, item_by_item):
    ds = tiny_data(n=10)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    direct = list(BatchLoader(ds, 4, order))
    workers = list(BatchLoader(item_by_item(ds), 4, order, num_workers=2))
    for a, b in zip(direct, workers, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)


def test_a_dataset_on_the_device_batches_there(tiny_data, device):
    ds = tiny_data(n=6)
    held = ds.to(device)
    assert held.images.device.type == device.type and ds.images.device.type == "cpu"  # a copy, not a move
    assert held.nbytes() == ds.nbytes() > 0
    (batch,) = list(BatchLoader(held, 6, torch.tensor([5, 0, 3, 1, 2, 4])))
    assert batch.images.device.type == device.type
    torch.testing.assert_close(batch.images.cpu(), ds.images[[5, 0, 3, 1, 2, 4]])
    assert on_device(ds, torch.device("cpu")) is ds  # the CPU keeps the dataset as it is


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_trainer_holds_in_memory_data_on_the_gpu(tiny_data):
    held = on_device(tiny_data(n=6), torch.device("cuda"))
    assert held.images.is_cuda


def test_scaled_images_give_the_batches_uint8_images_give(device):
    images = torch.randint(0, 256, (7, 1, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = TensorImageDataset(images, torch.arange(7) % 3).to(device)
    scaled = ds.scaled()
    assert scaled.images.dtype == torch.float32 and ds.images.dtype == torch.uint8
    assert scaled.scaled() is scaled  # float images are kept as they are
    index = torch.tensor([6, 0, 3])
    a, b = ds.batch(index), scaled.batch(index)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)  # bit for bit
    assert torch.equal(a.images.cpu(), images[index].float().div_(255.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_uint8_data_held_on_the_gpu_is_scaled_once():
    ds = TensorImageDataset(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
    held = on_device(ds, torch.device("cuda"))
    assert held.images.is_cuda and held.images.dtype == torch.float32 and ds.images.dtype == torch.uint8


def test_a_batch_moves_to_the_device_and_back_whole(tiny_data, device):
    """To a GPU the copy does not wait; back to the CPU it does: the CPU batch holds the values right away
    (a non-blocking copy from a GPU could be read before it arrived). A batch large enough that a copy takes
    a while, behind a kernel still running, makes the race visible on a GPU."""
    images = torch.rand(64, 3, 128, 128)
    batch = TensorImageDataset(images, torch.arange(64) % 3).batch(torch.arange(64))
    there = batch.to(device)
    assert there.images.device.type == device.type and there.indices.device.type == device.type
    there.images = there.images @ there.images.transpose(2, 3) @ there.images  # keeps a GPU busy
    back = there.to("cpu")
    read_at_once = back.images.clone()  # a CPU read, before anything else waits for the GPU
    assert back.images.device.type == "cpu" and back.masks is None
    assert torch.equal(read_at_once, there.images.cpu()) and torch.equal(back.labels, batch.labels)


class _Wrapping(torch.utils.data.Dataset):
    """A split that wraps an in-memory one, as an image folder with concept masks does."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(free, cached)``: torch.cuda's memory figures, and ``TensorImageDataset.to`` recording
    the device instead of copying (no GPU here)."""
    moved = []

    def setup(free: int, cached: int) -> list:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free, 10 * free))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 5000 + cached)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 5000)
        monkeypatch.setattr(TensorImageDataset, "to", lambda self, device: moved.append(device) or self)
        return moved

    return setup


def test_on_device_counts_torchs_cached_memory_as_free(tiny_data, fake_gpu):
    ds = tiny_data(n=6)  # float images: nbytes() bytes
    cuda = torch.device("cuda")
    moved = fake_gpu(free=2 * ds.nbytes(), cached=0)
    assert on_device(ds, cuda) is ds and moved == []  # 2x the data > a quarter of the free memory
    moved = fake_gpu(free=2 * ds.nbytes(), cached=2 * ds.nbytes())
    assert on_device(ds, cuda) is ds and moved == [cuda]  # torch's cached, unused blocks are free too


def test_on_device_holds_the_in_memory_split_a_wrapper_carries(tiny_data, fake_gpu):
    ds = tiny_data(n=6)
    cuda = torch.device("cuda")
    moved = fake_gpu(free=100 * ds.nbytes(), cached=0)
    assert on_device(_Wrapping(ds), cuda) is ds and moved == [cuda]
    lazy = _Wrapping([(torch.zeros(1, 4, 4), 0, None)])  # wraps no in-memory split: kept as it is
    assert on_device(lazy, cuda) is lazy


def test_in_memory_batches_are_pinned_for_a_gpu(tiny_data, monkeypatch):
    pinned = []
    monkeypatch.setattr(Batch, "pin_memory", lambda self: pinned.append(len(self)) or self)
    ds = tiny_data(n=10)
    assert [len(b) for b in BatchLoader(ds, 4)] == [4, 4, 2] and pinned == []
    assert [len(b) for b in BatchLoader(ds, 4, pin_memory=True)] == [4, 4, 2] and pinned == [4, 4, 2]


def test_batch_copies_wait_only_when_they_go_to_the_cpu(monkeypatch):
    """A non-blocking copy to a GPU lets the host run ahead (from pinned memory); one to the CPU could
    be read before it arrives, so it must block."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "to", lambda t, device, non_blocking=False: calls.append(non_blocking) or t)
    batch = Batch(torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.long), None, torch.arange(2))
    batch.to("cuda")
    assert calls == [True, True, True]  # images, labels, indices (no masks)
    calls.clear()
    batch.to(torch.device("cpu"))
    assert calls == [False, False, False]
