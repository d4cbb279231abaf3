"""Network dissection makes no host-device copy per batch or per unit slice (a GPU would stall on each)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import xkd.metrics.dissection as dissection
from xkd.data.concepts import CONCEPT_NAMES, ConceptDataset, generate_concepts
from xkd.metrics.dissection import DissectionError, concept_detectors


class Maps(nn.Module):
    """``units``: unit k = concept k's mask of the image (found by exact match), then a copy of unit 0."""

    def __init__(self, ds: ConceptDataset) -> None:
        super().__init__()
        masks = ds.concept_masks_batch(torch.arange(len(ds))).float()
        self.register_buffer("images", (ds.images.float() / 255).flatten(1))
        self.register_buffer("maps", torch.cat([masks, masks[:, :1]], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maps[torch.cdist(x.reshape(len(x), -1), self.images).argmin(dim=1)]


@pytest.fixture(scope="module")
def concepts():
    images, labels, _, maps = generate_concepts(num_per_class=4, size=16, seed=0)
    return ConceptDataset(images, labels, maps)


def _dissect_counting_cpu(monkeypatch, model, data, batch_size, slice_units):
    """One dissection with unit slices of ``slice_units`` units; the number of ``Tensor.cpu`` calls."""
    h, w = data[0][0].shape[-2:]
    monkeypatch.setattr(dissection, "_UPSAMPLE_BUDGET", batch_size * h * w * slice_units)
    calls = []
    cpu = torch.Tensor.cpu

    def counted(self, *args, **kwargs):
        calls.append(1)
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    try:
        res = concept_detectors(model, data, layer="maps_", batch_size=batch_size)
    finally:
        monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    return res, len(calls)


def _model(concepts):
    model = nn.Sequential()
    model.add_module("maps_", Maps(concepts))
    return model


def test_cpu_copies_do_not_grow_with_batches_or_unit_slices(monkeypatch, concepts):
    model = _model(concepts)
    n = len(concepts)
    (r2, c2), (r4, c4) = (_dissect_counting_cpu(monkeypatch, model, concepts, bs, 5) for bs in (n // 2, n // 4))
    (r1s, c1s), (r7s, c7s) = (_dissect_counting_cpu(monkeypatch, model, concepts, n // 4, s) for s in (20, 3))
    assert c2 == c4 == c1s == c7s, (c2, c4, c1s, c7s)  # 2 or 4 batches, 1 or 7 unit slices per batch
    for res in (r2, r4, r1s, r7s):  # the known answer: unit k is concept k's detector, IoU 1 exactly
        for k, name in enumerate(CONCEPT_NAMES):
            assert res["units"][k]["concept"] == name and res["units"][k]["iou"] == 1.0
        assert res["units"][-1]["concept"] == CONCEPT_NAMES[0] and res["units"][-1]["iou"] == 1.0
        assert res["iou"] == r2["iou"] and res["thresholds"] == r2["thresholds"]
        assert res["n_detectors"] == len(CONCEPT_NAMES) + 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, -1])
def test_non_finite_activation_still_raises(concepts, bad, where):
    """A non-finite value in the first or the last batch: the same error, before any result."""
    model = _model(concepts)
    model.maps_.maps[where, 2, 3, 4] = bad
    with pytest.raises(DissectionError, match=r"^layer 'maps_' produced non-finite activations \(nan or inf\)$"):
        concept_detectors(model, concepts, layer="maps_", batch_size=len(concepts) // 4)
