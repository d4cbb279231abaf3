"""KD-FMV average feature maps: the channel mean by hand, every conv layer, shallow to deep."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xkd.config import ConfigError
from xkd.explain import FeatureMaps, build_explainer
from xkd.explain.base import check_maps
from xkd.models import LayerNotFoundError, conv_layer_paths

pytestmark = pytest.mark.usefixtures("one_thread")


def one_conv_model() -> nn.Module:
    # channels x, 2x, 3x + 3 -> channel mean (6x + 3) / 3 = 2x + 1
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, 0.0, 3.0]))
    return nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(2))


def test_mean_over_channels_by_hand():
    model = one_conv_model()
    x = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.5, 3.0]]).view(1, 1, 2, 3)
    model(x)  # materialise the lazy layer
    att = FeatureMaps(model, {"layer": "0"}).explain(x, torch.tensor([1]))
    expected = torch.tensor([[[1.0, 3.0, -1.0], [5.0, 2.0, 7.0]]])
    torch.testing.assert_close(att.maps, expected)
    assert att.method == "feature_maps" and att.layer == "0"


def test_upsampled_bilinearly_to_input_resolution():
    conv = nn.Conv2d(1, 2, 2, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2))
    model = nn.Sequential(conv)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    a = torch.tensor([[10.0, 18.0], [42.0, 50.0]]) * 2  # patch sums times the channel mean weight 2
    up = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    maps = FeatureMaps(model, {"layer": "0"}).explain(x, torch.tensor([0])).maps
    torch.testing.assert_close(maps[0], up @ a @ up.T)


def test_one_map_per_conv_layer_shallow_to_deep_from_one_forward(tiny_model):
    model, x = tiny_model("teacher", 0), torch.rand(5, 1, 16, 20)
    executed: list[str] = []
    convs = conv_layer_paths(model)
    names = {m: n for n, m in model.named_modules()}
    handles = [
        m.register_forward_hook(lambda mod, i, o: executed.append(names[mod]))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        atts = FeatureMaps(model).explain_layers(x)
    finally:
        for h in handles:
            h.remove()
    assert len(atts) == len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert [a.layer for a in atts] == convs
    # one forward pass, and the maps come in the order the layers run (shallow to deep)
    assert executed == convs
    for a in atts:
        check_maps(a.maps, (16, 20))


def test_explain_returns_default_layer_and_ignores_targets(tiny_model):
    model, x = tiny_model("teacher", 0), torch.rand(4, 1, 16, 16)
    fm = FeatureMaps(model)
    a = fm.explain(x, torch.tensor([0, 1, 2, 0]))
    b = fm.explain(x, torch.tensor([2, 2, 2, 2]))
    assert a.layer == "layer3"
    torch.testing.assert_close(a.maps, b.maps)
    (c,) = FeatureMaps(model, {"layers": ["layer3"]}).explain_layers(x)
    torch.testing.assert_close(a.maps, c.maps)


def test_explicit_layers_keep_their_order_and_chunks_match(tiny_model):
    model, x = tiny_model("teacher", 0), torch.rand(7, 1, 16, 16)
    layers = ["layer2", "conv1", "layer1.0.bn1"]
    whole = FeatureMaps(model, {"layers": layers}).explain_layers(x)
    chunked = FeatureMaps(model, {"layers": layers, "batch_size": 2}).explain_layers(x)
    assert [a.layer for a in whole] == layers
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a.maps, b.maps)


def test_mode_restored_no_hooks_no_grads(tiny_model):
    model = tiny_model("teacher", 0).train()
    with FeatureMaps(model) as fm:
        fm.explain_layers(torch.rand(3, 1, 16, 16))
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_errors_name_the_problem(tiny_model):
    model = tiny_model("teacher", 0)
    with pytest.raises(LayerNotFoundError, match="layer 'layer9'.*conv1"):
        FeatureMaps(model, {"layers": ["conv1", "layer9"]})
    with pytest.raises(ConfigError, match="layers"):
        build_explainer("feature_maps", model, {"layers": []})
    with pytest.raises(ConfigError, match="unknown key"):
        build_explainer("feature_maps", model, {"relu": True})
