"""perturbation_curves and fidelity make a fixed number of host-device round trips per call, not one per chunk.

On a GPU each ``.cpu()``, each host-to-device copy of the baseline and each tie permutation drawn on
the CPU and copied over blocks the host until the device has finished its queue; counted here on
the CPU, where the calls are the same.
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch
from torch import nn

from xkd.metrics import fidelity, perturbation_curves

faithfulness = importlib.import_module("xkd.metrics.faithfulness")
ranking = importlib.import_module("xkd.metrics.ranking")


pytestmark = pytest.mark.usefixtures("one_thread")


def data() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    g = torch.Generator().manual_seed(1)
    images, maps = torch.rand(6, 3, 6, 6, generator=g), torch.rand(6, 6, 6, generator=g)
    maps[:, :3] = 0.0  # tied pixels: the seeded tie-break order is used
    return model, images, maps, torch.tensor([0, 1, 2, 3, 4, 0])


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Counts of ``Tensor.cpu``, ``torch.as_tensor`` and ``tie_permutation`` calls."""
    seen: Counter = Counter()

    def counting(name, real):
        def wrapper(*args, **kwargs):
            seen[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.Tensor, "cpu", counting("cpu", torch.Tensor.cpu))
    monkeypatch.setattr(torch, "as_tensor", counting("as_tensor", torch.as_tensor))
    perm = counting("tie_permutation", ranking.tie_permutation)
    monkeypatch.setattr(ranking, "tie_permutation", perm)
    if hasattr(faithfulness, "tie_permutation"):  # however faithfulness reaches it
        monkeypatch.setattr(faithfulness, "tie_permutation", perm)
    return seen


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("targets", [False, True])
def test_perturbation_curves_round_trips_do_not_grow_with_chunks(calls, mode, targets):
    model, images, maps, labels = data()
    steps, counts, results = 4, [], []
    for batch_size in (5, 10, 500):  # 6, 3 and 1 chunks of steps + 1 = 5 forwards per image
        calls.clear()
        results.append(
            perturbation_curves(model, images, maps, mode, steps, 0.25, batch_size, labels if targets else None)
        )
        counts.append(dict(calls))
    assert counts[0] == counts[1] == counts[2], counts
    assert all(n <= 2 for n in counts[0].values()) and counts[0]["tie_permutation"] == 1, counts
    for curve, fractions in results:  # and the results do not depend on the chunking
        torch.testing.assert_close(curve, results[0][0])
        assert torch.equal(fractions, results[0][1])
        assert curve.device.type == "cpu" and curve.dtype == torch.float64 and curve.shape == (6, steps + 1)


def test_fidelity_round_trips_do_not_grow_with_chunks(calls):
    model, images, maps, labels = data()
    counts, results = [], []
    for batch_size in (1, 2, 500):  # 6, 3 and 1 chunks
        calls.clear()
        results.append(
            fidelity(model, images, labels, maps, 0.3, torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1), batch_size)
        )
        counts.append(dict(calls))
    assert counts[0] == counts[1] == counts[2], counts
    assert all(n <= 2 for n in counts[0].values()) and counts[0]["tie_permutation"] == 1, counts
    for out in results:  # the same decisions whatever the chunking; the ratios up to batch-size rounding
        assert out["fidelity"] == results[0]["fidelity"] and out["n"] == 6
        assert out["retained"] == pytest.approx(results[0]["retained"], rel=1e-6)
