"""The explainer contract for every registered explainer, on the CPU and (``device`` fixture) a CUDA
device when there is one: shape, dtype, finiteness, maps on the images' device, eval mode restored,
hooks released, bounded memory over many calls; the superpixel form; NaN attributions named."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn

import xkd.explain  # noqa: F401  (registers explainers)
from xkd.explain import Attribution, build_explainer
from xkd.explain.base import NonFiniteAttributionError, check_maps
from xkd.explain.superpixel import SuperpixelParams, segment_sums, slic_segments, superpixel_maps
from xkd.registry import EXPLAINERS

# small budgets so 100 calls of every explainer stay cheap
FAST = {
    "kernel_shap": {"n_samples": 16},
    "lime": {"n_samples": 16},
    "gradient_shap": {"n_samples": 2},
    "integrated_gradients": {"n_steps": 4},
    "deep_shap": {"n_background": 2},
    "occlusion": {"window": 4, "stride": 4},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tiny_model):
    """``tiny(seed=0)``: the tiny student with two blocks (widths [4, 8])."""
    return lambda seed=0: tiny_model("student", seed, widths=[4, 8])


def images(n: int = 4) -> torch.Tensor:
    x = torch.zeros(n, 1, 16, 16)
    x[:, :, 2:8, 3:9] = 1.0  # a bright square gives SLIC something to segment
    x[:, :, 10:14, 9:15] = 0.5
    return x + 0.01 * torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def model_for(tiny):
    """``model_for(name, seed=0)``: a tiny model the explainer applies to (MED-TEX's Θ needs a MED-TEX student)."""

    def build(name: str, seed: int = 0) -> nn.Module:
        missing = EXPLAINERS.get(name).missing_packages()
        if missing:
            pytest.skip(f"{name} needs the optional package {missing[0][0]!r} (pip install 'xkd[{missing[0][1]}]')")
        model = tiny(seed)
        if not EXPLAINERS.get(name).applies_to(model):
            from xkd.distill.medtex import ExplainerNet, MaskedStudent

            model = MaskedStudent(ExplainerNet(1, (2, 4)), model)
        assert EXPLAINERS.get(name).applies_to(model)
        return model

    return build


def make(name: str, model: nn.Module, teacher: nn.Module) -> xkd.explain.Explainer:
    return build_explainer(name, model, FAST.get(name, {}), teacher=teacher)


@pytest.mark.parametrize("name", EXPLAINERS.names())
def test_contract_and_modes_restored(name, model_for, tiny, device):
    model, teacher = model_for(name, 0).to(device), tiny(1).to(device)
    model.train()
    x, y = images().to(device), torch.tensor([0, 1, 2, 0]).to(device)
    with make(name, model, teacher) as ex:
        a = ex.explain(x, y)
    assert isinstance(a, Attribution)
    check_maps(a.maps, (16, 16))
    assert a.maps.shape == (4, 16, 16)
    assert a.maps.device == x.device  # on the images' device, as the scoring loop reads them
    assert model.training and all(m.training for m in model.modules())
    assert all_hooks(model) == 0 and all_hooks(teacher) == 0


def allocated_bytes(device: torch.device) -> int:
    """Memory held for tensors on ``device``: the resident set size on the CPU, the bytes the caching
    allocator hands out on CUDA (device memory is not in the resident set; its cache is not a leak)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the resident set size")
@pytest.mark.parametrize("name", EXPLAINERS.names())
def test_memory_does_not_grow_over_100_calls(name, model_for, tiny, device):
    model, teacher = model_for(name, 0).to(device), tiny(1).to(device)
    x, y = images(4).to(device), torch.tensor([0, 1, 2, 0]).to(device)  # UniCAM's statistic needs >= 4 images

    def call() -> None:
        with make(name, model, teacher) as ex:
            ex.explain(x, y)

    for _ in range(10):  # allocator and lazy-init warm-up
        call()
    gc.collect()
    before = allocated_bytes(device)
    for _ in range(100):
        call()
    gc.collect()
    grown = allocated_bytes(device) - before
    # one call's tensors are a few KB; a leak of one map per call would already show, a leak of
    # the model's activations per call would be megabytes
    assert grown < 8 * 2**20, f"{name}: {device.type} memory grew by {grown / 2**20:.1f} MiB over 100 calls"
    assert all_hooks(model) == 0


def live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): the latter dereferences weak proxies, which may be dead
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.parametrize("name", EXPLAINERS.names())
def test_a_reused_explainer_keeps_no_tensor_per_call(name, model_for, tiny, device):
    # exact where RSS is coarse: a map, an activation or a hook kept per call would add >= 30 tensors
    # (the count is of tensor objects, wherever their storage lives)
    model, teacher = model_for(name, 0).to(device), tiny(1).to(device)
    x, y = images(4).to(device), torch.tensor([0, 1, 2, 0]).to(device)
    with make(name, model, teacher) as ex:
        for _ in range(5):
            ex.explain(x, y)
        before = live_tensors()
        for _ in range(30):
            ex.explain(x, y)
        grown = live_tensors() - before
    assert grown < 5, f"{name}: {grown} more live tensors after 30 calls of one explainer"
    assert all_hooks(model) == 0 and all_hooks(teacher) == 0


def test_superpixel_form_sums_each_superpixel():
    seg = torch.tensor([[[0, 0, 1], [0, 2, 1], [2, 2, 1]]])
    maps = torch.arange(9, dtype=torch.float32).view(1, 3, 3)
    # segment 0: pixels 0, 1, 3 -> 0 + 1 + 3 = 4; segment 1: 2, 5, 8 -> 15; segment 2: 4, 6, 7 -> 17
    assert segment_sums(maps, seg).tolist() == [[4.0, 15.0, 17.0]]
    expected = torch.tensor([[[4, 4, 15], [4, 17, 15], [17, 17, 15]]], dtype=torch.float32)
    assert torch.equal(superpixel_maps(maps, seg), expected)


def test_superpixel_explainer_is_constant_per_segment_and_keeps_the_total(tiny, device):
    model, x, y = tiny().to(device), images().to(device), torch.tensor([0, 1, 2, 0]).to(device)
    params = {"superpixel": {"n_segments": 6}}
    with build_explainer("grad_cam+superpixel", model, params) as ex:
        a = ex.explain(x, y)
    with build_explainer("grad_cam", model) as ex:
        raw = ex.explain(x, y).maps
    seg = slic_segments(x, SuperpixelParams(n_segments=6)).to(device)
    assert a.method == "grad_cam+superpixel" and a.maps.device == x.device
    for i in range(len(x)):
        for s in seg[i].unique():
            inside = a.maps[i][seg[i] == s]
            assert torch.allclose(inside, inside[0].expand_as(inside))  # one value per superpixel
            assert inside[0].item() == pytest.approx(raw[i][seg[i] == s].sum().item(), rel=1e-5, abs=1e-6)


def test_slic_finds_the_objects():
    seg = slic_segments(images(1), SuperpixelParams(n_segments=4))
    assert seg.shape == (1, 16, 16) and seg.dtype == torch.int64
    bright = seg[0, 3:7, 4:8].unique()
    assert len(bright) == 1  # the inside of the bright square is one superpixel
    assert (seg[0] == bright).sum() <= 6 * 6 + 8  # ... that does not spill far beyond it


def test_nan_attributions_name_the_method_and_images():
    maps = torch.zeros(5, 4, 4)
    maps[1, 0, 0] = float("nan")
    maps[3, 2, 2] = float("inf")
    with pytest.raises(NonFiniteAttributionError, match=r"explainer 'lime' produced NaN or inf.*image index 1, 3"):
        Attribution(maps, method="lime")


def test_nan_model_output_is_reported_by_the_explainer():
    class NaNModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            z = self.conv(x).mean(dim=(2, 3))
            return z * torch.where(x[:, :1, 0, 0] > 0.5, float("nan"), 1.0)

    x = images(3)
    x[2, 0, 0, 0] = 1.0
    with pytest.raises(NonFiniteAttributionError, match=r"'grad_cam'.*image index 2"):
        with build_explainer("grad_cam", NaNModel(), {"layer": "conv"}) as ex:
            ex.explain(x, torch.tensor([0, 0, 0]))


def test_an_explainer_whose_optional_package_is_missing_fails_when_resolved(monkeypatch):
    from xkd.config import ConfigError
    from xkd.explain.base import resolve_explainer
    from xkd.explain.gradients import DeepSHAP

    monkeypatch.setattr(DeepSHAP, "requires", (("xkd_no_such_module", "shap"),))
    with pytest.raises(ConfigError, match=r"deep_shap.*'xkd_no_such_module'.*pip install 'xkd\[shap\]'"):
        resolve_explainer("deep_shap")
    with pytest.raises(ConfigError, match="xkd_no_such_module"):
        resolve_explainer("deep_shap+superpixel")
