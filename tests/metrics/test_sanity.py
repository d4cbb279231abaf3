"""Adebayo et al.'s sanity checks: Grad-CAM depends on the weights (PASS), the input itself does not (FAIL)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xkd.explain.base import Attribution, Explainer
from xkd.explain.gradcam import GradCAM
from xkd.metrics.sanity import cascade_layers, data_randomisation_sanity, randomisation_sanity, similarity

pytestmark = pytest.mark.usefixtures("one_thread")


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    w = 16
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, w, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(w, 3),
    )


def images(n: int = 6) -> torch.Tensor:
    x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.2
    x[:, :, 2:7, 2:7] = 1.0
    x[:, :, 9:14, 9:14] = -1.0
    return x


def grad_cam(model: nn.Module) -> GradCAM:
    # without the ReLU: an untrained model's rectified CAMs are often all zero, which says nothing
    return GradCAM(model, {"layer": "4", "relu": False})


class InputExplainer(Explainer):
    """The image itself as the "explanation": independent of the weights (the paper's edge detector)."""

    def explain(self, images: torch.Tensor, targets: torch.Tensor | None) -> Attribution:
        return Attribution(images[:, 0].float().clone(), method="input")


def test_similarity_by_hand():
    a = torch.arange(16.0).view(1, 4, 4)
    out = similarity(torch.cat([a, a, a]), torch.cat([a, -a, torch.zeros(1, 4, 4)]))
    # |a| = |-a|: rank 1 and SSIM 1; a map that became constant has changed: rank 0
    assert out["per_image"].tolist() == [1.0, 1.0, 0.0] and out["rank_correlation"] == pytest.approx(2 / 3)
    assert similarity(a, a)["ssim"] == pytest.approx(1.0)
    assert similarity(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))["rank_correlation"] == 1.0  # unchanged


def test_cascade_goes_from_the_top_layer_down_and_leaves_the_model_alone():
    model = net(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    assert cascade_layers(model, images(1)) == ["8", "4", "2", "0"]
    out = randomisation_sanity(model, images(), grad_cam)
    assert out["layers"] == ["8", "4", "2", "0"]
    assert len(out["rank_correlation"]) == len(out["ssim"]) == 4 and out["n_images"] == 6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())


def test_grad_cam_passes_model_randomisation():
    # the original and fully randomised maps are unrelated; for this 16-wide net the final rank
    # correlation over 8 model/randomisation seeds ranged from -0.57 to 0.27
    out = randomisation_sanity(net(100), images(), grad_cam, seed=0)
    assert out["verdict"] == "PASS" and out["randomisation_sanity"] < 0.3
    assert out["randomisation_sanity"] == out["rank_correlation"][-1] and out["ssim"][-1] < 0.5
    again = randomisation_sanity(net(100), images(), grad_cam, seed=0)
    assert again["rank_correlation"] == out["rank_correlation"]  # seeded


def test_the_input_as_explanation_fails_both_checks():
    out = randomisation_sanity(net(100), images(), InputExplainer)
    assert out["verdict"] == "FAIL"
    assert out["rank_correlation"] == pytest.approx([1.0] * 4) and out["ssim"] == pytest.approx([1.0] * 4)
    data = data_randomisation_sanity(net(100), net(7), images(), InputExplainer)
    assert data["verdict"] == "FAIL" and data["data_randomisation_sanity"] == pytest.approx(1.0)
    assert data["ssim"] == pytest.approx(1.0)


def test_data_randomisation_compares_the_two_models():
    same = data_randomisation_sanity(net(100), net(100), images(), grad_cam)
    assert same["verdict"] == "FAIL" and same["data_randomisation_sanity"] == pytest.approx(1.0)
    # an independently initialised model stands in for the random-label one
    other = data_randomisation_sanity(net(100), net(7), images(), grad_cam)
    assert other["verdict"] == "PASS" and other["data_randomisation_sanity"] < 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        randomisation_sanity(net(0), images(), grad_cam, threshold=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        randomisation_sanity(net(0), images()[:0], grad_cam)
    with pytest.raises(ValueError, match="no layer with reset_parameters"):
        randomisation_sanity(nn.Sequential(nn.Flatten(), nn.Softmax(dim=1)), images(), InputExplainer)
