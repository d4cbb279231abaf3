"""Fidelity and deletion/insertion AUC on models whose evidence region is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xkd.metrics import deletion_auc, fidelity, insertion_auc, saliency_ranks


class RegionModel(nn.Module):
    """Reads only the top-left 2x2 of a 4x4 image: logits (0, 10 * mean(region) - 5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 10 * x[:, 0, :2, :2].mean(dim=(1, 2)) - 5
        return torch.stack([torch.zeros_like(s), s], dim=1)


class MeanProbability(nn.Module):
    """p(class 1) = mean pixel value q exactly: logits (log(1 - q), log q)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.log1p(-q), torch.log(q)], dim=1)


def region_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.rand(6, 1, 4, 4) * 0.5
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    images[:, 0, :2, :2] = labels.view(6, 1, 1).float()  # class 1: region lit, class 0: region dark
    right = torch.zeros(6, 4, 4)
    right[:, :2, :2] = 1.0
    return images, labels, right


def test_saliency_ranks_break_ties_by_index():
    ranks = saliency_ranks(torch.tensor([[[0.5, 1.0], [0.5, 0.0]]]))
    assert ranks.tolist() == [[1, 0, 2, 3]]


def test_fidelity_is_one_when_the_kept_pixels_are_the_evidence():
    images, labels, right = region_data()
    out = fidelity(RegionModel(), images, labels, right, keep=0.25)
    assert out["fidelity"] == 1.0 and out["retained"] == pytest.approx(1.0)
    assert out["per_class"]["0"]["fidelity"] == out["per_class"]["1"]["fidelity"] == 1.0
    assert out["n"] == 6 and out["keep"] == 0.25


def test_fidelity_of_an_inverted_map_by_hand():
    # keeping the other 12 pixels zeros the region: class-0 images are unchanged (ratio 1); class-1
    # images drop from sigmoid(5) to sigmoid(-5), a ratio of (1 + e^-5) / (1 + e^5) = e^-5
    images, labels, right = region_data()
    out = fidelity(RegionModel(), images, labels, 1 - right, keep=0.75, class_names=["dark", "lit", "empty"])
    assert out["per_class"]["dark"] == {
        "fidelity": 1.0,
        "retained": pytest.approx(1.0),
        "retained_clipped": pytest.approx(1.0),
        "n": 3,
    }
    lit = out["per_class"]["lit"]
    assert lit["fidelity"] == 0.0 and lit["retained"] == pytest.approx(math.exp(-5), rel=1e-5) and lit["n"] == 3
    assert out["fidelity"] == 0.5 and out["retained"] == pytest.approx((1 + math.exp(-5)) / 2, rel=1e-5)
    assert out["per_class"]["empty"]["n"] == 0 and math.isnan(out["per_class"]["empty"]["fidelity"])


def test_retained_is_not_clipped_but_its_clipped_mean_is_reported():
    # p(1) = mean pixel q = 0.3, so class 0 is predicted with p = 0.7; keeping the two brightest pixels
    # (0.6, 0.4) gives q = 0.25 and p(0) = 0.75: the masked image is more confident, ratio 15/14
    images = torch.tensor([[0.6, 0.4], [0.2, 0.0]]).view(1, 1, 2, 2)
    out = fidelity(MeanProbability(), images, torch.tensor([0]), images[:, 0], keep=0.5, baseline=0.0)
    assert out["retained"] == pytest.approx(0.75 / 0.7) and out["retained_clipped"] == 1.0
    assert out["fidelity"] == 1.0


def test_deletion_and_insertion_auc_by_hand():
    # pixels 1.0, 0.8, 0.6, 0.4 (map = image): p(class 1) = mean = 0.7 predicted class 1.
    # deletion keeps 0.7, 0.45, 0.25, 0.1, 0 -> AUC = 0.25 * 1.15; insertion 0, 0.25, 0.45, 0.6, 0.7 -> 0.25 * 1.65
    x = torch.tensor([1.0, 0.8, 0.6, 0.4]).view(1, 1, 2, 2)
    d = deletion_auc(MeanProbability(), x, x[:, 0], steps=4)
    i = insertion_auc(MeanProbability(), x, x[:, 0], steps=4)
    torch.testing.assert_close(d["curve"], torch.tensor([0.7, 0.45, 0.25, 0.1, 0.0], dtype=torch.float64))
    assert d["deletion_auc"] == pytest.approx(0.2875, abs=1e-6)
    assert i["insertion_auc"] == pytest.approx(0.4125, abs=1e-6)
    assert d["fractions"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_right_map_beats_inverted_map():
    images, labels, right = region_data()
    model = RegionModel()
    lit = labels == 1  # the region is the evidence of class 1
    d_right = deletion_auc(model, images[lit], right[lit], steps=8)["deletion_auc"]
    d_wrong = deletion_auc(model, images[lit], 1 - right[lit], steps=8)["deletion_auc"]
    i_right = insertion_auc(model, images[lit], right[lit], steps=8)["insertion_auc"]
    i_wrong = insertion_auc(model, images[lit], 1 - right[lit], steps=8)["insertion_auc"]
    assert d_right < d_wrong - 0.3 and i_right > i_wrong + 0.3


def test_chunking_does_not_change_curves_and_mode_is_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 3)).train()
    images, maps = torch.rand(5, 1, 4, 4), torch.rand(5, 4, 4)
    a = deletion_auc(model, images, maps, steps=4, batch_size=5)  # one image per forward
    b = deletion_auc(model, images, maps, steps=4, batch_size=500)
    torch.testing.assert_close(a["per_image"], b["per_image"])
    f1 = fidelity(model, images, torch.tensor([0, 1, 2, 0, 1]), maps, batch_size=2)
    f2 = fidelity(model, images, torch.tensor([0, 1, 2, 0, 1]), maps)
    assert f1 == f2
    assert model.training and model[1].training
