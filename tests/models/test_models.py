"""Registered models build for any channels/size; user modules by import path; hooks by path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xkd.config import ConfigError, ModelConfig
from xkd.models import (
    LayerNotFoundError,
    PretrainedUnavailableError,
    build_model,
    capture_features,
    conv_layer_paths,
    default_layer,
    get_module,
)
from xkd.registry import MODELS


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)])
def test_every_registered_model_builds_and_runs(name, shape):
    if name == "densenet121" and shape[0] == 3:
        pytest.skip("one DenseNet shape is enough (slow to build)")
    c, s = shape
    model = build_model(ModelConfig(name), 5, c, s).eval()
    with torch.no_grad():
        out = model(torch.rand(2, c, s, s))
    assert out.shape == (2, 5)
    assert model.num_classes == 5
    get_module(model, default_layer(model))  # the declared default layer exists


def test_kdfmv_student_is_the_paper_architecture():
    model = build_model(ModelConfig("kdfmv_cnn"), 4, 3, 224)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 512]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert model.classifier.in_features == 512 * 7 * 7  # 224 / 2^5 = 7


def test_small_grayscale_stem_keeps_spatial_extent():
    model = build_model(ModelConfig("resnet18"), 10, 1, 28)
    assert model.conv1.in_channels == 1 and model.conv1.stride == (1, 1)
    with capture_features(model, ["layer4"]) as feats:
        model.eval()(torch.rand(1, 1, 28, 28))
    assert feats["layer4"].shape[-1] == 4  # 28 -> 28 -> 14 -> 7 -> 4


def test_pretrained_fails_with_a_clear_message_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(PretrainedUnavailableError, match="pretrained: false"):
        build_model(ModelConfig("resnet18", pretrained=True), 10, 3, 224)


def test_user_module_by_import_path():
    model = build_model(ModelConfig("torch.nn:Linear", params={"in_features": 4, "out_features": 2}), 2, 1, 2)
    assert isinstance(model, nn.Linear)


def test_bad_model_names_and_params():
    with pytest.raises(KeyError, match="registered models: cifar_resnet, densenet121"):
        build_model(ModelConfig("vgg"), 2, 1, 8)
    with pytest.raises(ConfigError, match="cannot import model 'nowhere.Net'"):
        build_model(ModelConfig("nowhere.Net"), 2, 1, 8)
    with pytest.raises(ConfigError, match="has no parameter 'depthh'; accepted: depth, width"):
        build_model(ModelConfig("cifar_resnet", params={"depthh": 8}), 2, 1, 8)
    with pytest.raises(ConfigError, match="6n\\+2"):
        build_model(ModelConfig("cifar_resnet", params={"depth": 10}), 2, 1, 8)


def test_hooked_features_equal_the_modules_real_outputs_and_hooks_are_removed(tiny_model):
    model = tiny_model("teacher").eval()
    x = torch.rand(2, 1, 16, 16)
    with capture_features(model, ["layer1", "layer2"]) as feats:
        model(x)
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(x)))
        l1 = model.layer1(h)
        l2 = model.layer2(l1)
    assert torch.allclose(feats["layer1"], l1) and torch.allclose(feats["layer2"], l2)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_hooked_output_survives_a_following_inplace_relu():
    """torchvision resnet18: ``layer4.1.bn1`` is followed by ``ReLU(inplace=True)``, which used to
    overwrite the hooked tensor (min 0.0). The hooked output must be the BN output as computed."""
    import copy

    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=3).eval()
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), capture_features(model, ["layer4.1.bn1", "layer1.0.bn2"], detach=True) as feats:
        model(x)
    with torch.no_grad(), capture_features(reference, ["layer4.1.bn1", "layer1.0.bn2"], detach=True) as ref:
        reference(x)
    for path in ("layer4.1.bn1", "layer1.0.bn2"):
        assert feats[path].min() < 0  # a BatchNorm output in eval mode with random weights has negatives
        assert torch.equal(feats[path], ref[path])
    # by hand, without hooks: the BN output of the last block from the input of that block
    with torch.no_grad():
        h = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        h = reference.layer4[0](reference.layer3(reference.layer2(reference.layer1(h))))
        bn1 = reference.layer4[1].bn1(reference.layer4[1].conv1(h))
    assert torch.allclose(feats["layer4.1.bn1"], bn1, atol=1e-6)


def test_hooked_output_keeps_gradients_and_reduce_views_are_copied():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 0.0, 2.0]])
    with capture_features(model, ["0"]) as feats:
        model(x)
    pre = model[0](x)
    assert pre.min() < 0 and torch.equal(feats["0"], pre)
    feats["0"].sum().backward()  # the clone is differentiable: gradients reach the hooked module
    assert torch.allclose(model[0].bias.grad, torch.full((4,), 2.0))
    with torch.no_grad(), capture_features(model, ["0"], reduce=lambda _p, o: o.flatten(1)) as got:
        model(x)
    assert torch.equal(got["0"], pre.detach())  # a view of the output is copied too


def test_hooks_are_removed_after_an_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(RuntimeError), capture_features(model, ["0"]):
        model(torch.rand(1, 3, 8, 8))  # wrong channel count
    assert len(model[0]._forward_hooks) == 0


def test_unknown_layer_lists_module_paths():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with pytest.raises(LayerNotFoundError, match="layer 'conv9' not found .* 0, 2, 1"):
        get_module(model, "conv9")
    assert conv_layer_paths(model) == ["0", "2"]
    assert default_layer(model) == "2"


@pytest.mark.parametrize("name", ["kdfmv_cnn", "resnet18", "cifar_resnet"])
def test_non_square_inputs(name):
    model = build_model(ModelConfig(name), 3, 1, (20, 36)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 20, 36)).shape == (2, 3)
