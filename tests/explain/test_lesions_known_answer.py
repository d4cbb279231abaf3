"""Known answer on the `lesions` data: a model that, by construction, reads only the lesion pixels.

For each lesion image, the model multiplies its per-pixel features by that image's lesion mask (a
constant of the model) before classifying, so nothing outside the lesion can change its output,
whatever the input: no gradient reaches an outside pixel, and perturbing one (occlusion windows,
KernelSHAP/LIME coalitions, baselines) leaves the output as it was. Every explainer's map must then
put (nearly) all its positive mass inside the lesion mask. Maps whose features straddle the lesion's
border (occlusion windows, superpixels) may spill over it, hence their lower floors; a map blind to
the lesion would score about the lesions' area share (checked below to be under 15 %).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import xkd.explain  # noqa: F401  (registers explainers)
from xkd.data.lesions import generate_lesions
from xkd.explain import build_explainer
from xkd.explain.superpixel import slic_segments
from xkd.metrics.localisation import mask_mass
from xkd.registry import EXPLAINERS

# occlusion windows straddle the lesion's border; LIME's ridge regression on 128 sampled coalitions
# leaves noise on superpixels that play no part (KernelSHAP's efficiency constraint does not)
FLOOR = {"occlusion": 0.6, "lime": 0.85}
SUPERPIXEL_FEATURES = ("kernel_shap", "lime")  # their unit of evidence is a whole superpixel
PARAMS = {
    "kernel_shap": {"n_samples": 128},
    "lime": {"n_samples": 128},
    "occlusion": {"window": 2, "stride": 1},
    "integrated_gradients": {"n_steps": 16},
    "gradient_shap": {"n_samples": 8},
    "deep_shap": {"background": "zero"},
}
SKIP = {
    "unicam": "explains what a student took from a teacher (a pair of models), not one model's evidence",
    "medtex_theta": "exists only for MED-TEX students (tested in tests/distill/test_medtex.py)",
}


class LesionOnly(nn.Module):
    """Per-pixel (1x1) features of the image times ``mask`` (this image's lesion), summed, then a
    head in which those non-negative features vote for class 0 only (the other logits are 0): the
    lesion is the evidence for class 0, and nothing else enters the output."""

    xkd_default_layer = "gated"

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("mask", mask.float()[None, None])
        self.features = nn.Sequential(nn.Conv2d(1, 8, 1), nn.ReLU())  # 1x1: no pixel reads a neighbour
        self.gated = nn.Identity()  # the explained layer
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.head.weight.abs_()[1:] = 0.0
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.gated(self.features(x) * self.mask)
        return self.head(a.sum(dim=(2, 3)) / 64.0)


@pytest.fixture(scope="module")
def lesions():
    images, labels, masks = generate_lesions(num_per_class=1, size=32, seed=0)
    assert float(masks.float().mean()) < 0.15
    return images.float() / 255, masks


@pytest.mark.parametrize("name", [n for n in EXPLAINERS.names() if n not in SKIP])
def test_every_explainer_puts_its_mass_inside_the_lesion(name, lesions):
    x, masks = lesions
    maps = []
    for i in range(len(x)):
        model = LesionOnly(masks[i]).eval()
        with torch.no_grad():
            assert model(x[i : i + 1]).argmax(dim=1).item() == 0
        with build_explainer(name, model, PARAMS.get(name, {})) as ex:
            maps.append(ex.explain(x[i : i + 1], torch.tensor([0])).maps)
    maps = torch.cat(maps)
    region = masks
    if name in SUPERPIXEL_FEATURES:
        # the evidence region at the explainer's resolution: the superpixels that touch the lesion
        # (a superpixel's value is spread over all its pixels); the others are null players
        seg = slic_segments(x).flatten(1)
        touched = torch.zeros(len(x), int(seg.max()) + 1, dtype=torch.bool)
        for i in range(len(x)):
            touched[i, seg[i][masks[i].flatten()].unique()] = True
        region = touched.gather(1, seg).view_as(masks)
        assert float(region.float().mean()) < 0.5  # still a small part of the image
    res = mask_mass(maps, region)
    assert res["evaluated"] == len(x), f"{name}: maps without positive mass: {res}"
    assert res["mask_mass"] >= FLOOR.get(name, 0.99), f"{name}: mass inside the lesion {res['per_image']}"
