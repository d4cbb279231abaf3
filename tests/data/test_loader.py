"""The batch loader: how many worker processes a dataset gets, and datasets held on the device."""

from __future__ import annotations

import pytest
import torch

from xkd.data.base import BatchLoader, resolve_workers
from xkd.engine.trainer import on_device


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
