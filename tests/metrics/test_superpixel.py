"""XDistillation's superpixel MSE and top-k sign agreement on hand-made segmentations."""

from __future__ import annotations

import math

import pytest
import torch

from xkd.explain.superpixel import slic_segments
from xkd.metrics.superpixel import superpixel_mse, superpixel_sign_agreement


def quadrants(n: int = 1) -> torch.Tensor:
    """4x4 images cut into 4 superpixels of 4 pixels: labels 0 1 / 2 3 by quadrant."""
    seg = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    return seg.expand(n, 4, 4).clone()


def from_values(values: list[float]) -> torch.Tensor:
    """A 4x4 map whose quadrant sums are ``values`` (each spread evenly over its 4 pixels)."""
    v = torch.tensor(values, dtype=torch.float32) / 4
    return v[quadrants()[0]][None]


def test_identical_maps_mse_zero_sign_agreement_one():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 16, 16)
    seg = slic_segments(images)
    maps = torch.randn(3, 16, 16)
    assert superpixel_mse(maps, maps, seg)["superpixel_mse"] == 0.0
    for select in ("each", "teacher"):
        assert superpixel_sign_agreement(maps, maps, seg, k=3, select=select)["superpixel_sign_agreement"] == 1.0


def test_mse_by_hand_raw_and_normalized():
    a = from_values([4.0, -2.0, 0.0, 1.0])
    b = from_values([2.0, -2.0, 1.0, 1.0])
    # raw sums: differences (2, 0, -1, 0) -> (4 + 1) / 4
    out = superpixel_mse(a, b, quadrants())
    assert out["superpixel_mse"] == pytest.approx(1.25) and (out["evaluated"], out["skipped"]) == (1, 0)
    # each divided by its max |value|: (1, -.5, 0, .25) vs (1, -1, .5, .5): (0 + .25 + .25 + .0625) / 4
    assert superpixel_mse(a, b, quadrants(), normalize=True)["superpixel_mse"] == pytest.approx(0.140625)
    # scale-free when normalised, not when raw
    assert superpixel_mse(a, 10 * a, quadrants(), normalize=True)["superpixel_mse"] == pytest.approx(0.0)
    assert superpixel_mse(a, 10 * a, quadrants())["superpixel_mse"] == pytest.approx(81 * 21 / 4)


def test_mse_averages_over_the_labels_present_and_the_selected_images():
    a = torch.cat([from_values([4.0, 0.0, 0.0, 0.0]), from_values([1.0, 1.0, 1.0, 1.0])])
    b = torch.zeros(2, 4, 4)
    seg = quadrants(2)
    seg[1] = torch.where(seg[1] == 3, 7, seg[1])  # a gap in the labels: still 4 superpixels
    out = superpixel_mse(a, b, seg)
    assert out["per_image"].tolist() == [4.0, 1.0] and out["superpixel_mse"] == 2.5
    out = superpixel_mse(a, b, seg, correct=torch.tensor([False, True]))
    assert out["superpixel_mse"] == 1.0 and math.isnan(out["per_image"][0]) and out["skipped"] == 1


def test_sign_agreement_each_vs_teacher_by_hand():
    t = from_values([5.0, -4.0, 1.0, 0.5])  # teacher's top 2 by |value|: superpixels 0 (+) and 1 (-)
    s = from_values([3.0, 0.1, -6.0, 0.2])  # student's top 2: superpixels 2 (-) and 0 (+)
    seg = quadrants()
    # "each": overlap of the two top sets is {0}, same sign -> 1 / 2
    assert superpixel_sign_agreement(t, s, seg, k=2)["superpixel_sign_agreement"] == 0.5
    # "teacher": teacher's top {0, 1}; the student's signs there are (+, +): 0 matches, 1 does not -> 1 / 2
    assert superpixel_sign_agreement(t, s, seg, k=2, select="teacher")["superpixel_sign_agreement"] == 0.5
    # k = 3: each -> top(T) = {0, 1, 2}, top(S) = {2, 0, 3}: overlap {0, 2}, signs (+,+) and (+,-) -> 1 / 3
    assert superpixel_sign_agreement(t, s, seg, k=3)["superpixel_sign_agreement"] == pytest.approx(1 / 3)
    # teacher -> {0, 1, 2}: matches only at 0 -> 1 / 3
    out = superpixel_sign_agreement(t, s, seg, k=3, select="teacher")
    assert out["superpixel_sign_agreement"] == pytest.approx(1 / 3)
    # a student with every sign flipped agrees nowhere
    assert superpixel_sign_agreement(t, -t, seg, k=2)["superpixel_sign_agreement"] == 0.0
    # k larger than the number of superpixels: k_i = 4
    assert superpixel_sign_agreement(t, t.abs(), seg, k=10)["superpixel_sign_agreement"] == 0.75


def test_sign_agreement_only_over_images_both_models_get_right():
    t = torch.cat([from_values([1.0, 2.0, 3.0, 4.0]), from_values([1.0, 2.0, 3.0, 4.0])])
    s = torch.cat([from_values([1.0, 2.0, 3.0, 4.0]), -from_values([1.0, 2.0, 3.0, 4.0])])
    seg = quadrants(2)
    assert superpixel_sign_agreement(t, s, seg)["superpixel_sign_agreement"] == 0.5
    out = superpixel_sign_agreement(t, s, seg, correct=torch.tensor([True, False]))
    assert out["superpixel_sign_agreement"] == 1.0 and out["evaluated"] == 1 and math.isnan(out["per_image"][1])
    none = superpixel_sign_agreement(t, s, seg, correct=torch.tensor([False, False]))
    assert math.isnan(none["superpixel_sign_agreement"]) and (none["evaluated"], none["skipped"]) == (0, 2)


def test_bad_inputs_are_clear_errors():
    a = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="segments"):
        superpixel_mse(a, a, quadrants(1))
    with pytest.raises(ValueError, match="integer"):
        superpixel_mse(a, a, quadrants(2).float())
    with pytest.raises(ValueError, match="same shape"):
        superpixel_sign_agreement(a, a[:, :3], quadrants(2))
    with pytest.raises(ValueError, match="boolean tensor of shape"):
        superpixel_sign_agreement(a, a, quadrants(2), correct=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="k must be"):
        superpixel_sign_agreement(a, a, quadrants(2), k=0)


def unequal_segments() -> torch.Tensor:
    """4x4 image cut into a 12-pixel superpixel (label 0) and a 4-pixel one (label 1, bottom-right)."""
    seg = torch.zeros(1, 4, 4, dtype=torch.long)
    seg[0, 2:, 2:] = 1
    return seg


def test_superpixel_form_maps_are_read_once_not_weighted_by_area():
    # KernelSHAP/LIME/+superpixel maps hold each superpixel's value at every pixel: phi = (1, 2)
    seg = unequal_segments()
    teacher = torch.where(seg == 0, 1.0, 2.0).float()
    student = torch.where(seg == 0, 1.0, 1.0).float()
    # read once: (1-1)^2 and (2-1)^2 averaged over 2 superpixels
    assert superpixel_mse(teacher, student, seg, form="superpixel")["superpixel_mse"] == pytest.approx(0.5)
    # summed (the pixel-attribution transform): 12*1 vs 12*1 and 4*2 vs 4*1 -> (0 + 16) / 2
    assert superpixel_mse(teacher, student, seg)["superpixel_mse"] == pytest.approx(8.0)
    # the ranking by importance follows the values, not value x area: top-1 of the teacher is label 1
    flipped = torch.where(seg == 0, 1.0, -2.0).float()
    res = superpixel_sign_agreement(teacher, flipped, seg, k=1, form="superpixel")
    assert res["superpixel_sign_agreement"] == 0.0  # both pick label 1 (|2|), signs differ
    res = superpixel_sign_agreement(teacher, flipped, seg, k=1)  # summed: label 0 (12) beats label 1 (8)
    assert res["superpixel_sign_agreement"] == 1.0
    with pytest.raises(ValueError, match="form must be"):
        superpixel_mse(teacher, student, seg, form="area")


def test_empty_explanations_do_not_agree():
    seg = quadrants(2)
    zero = torch.zeros(2, 4, 4)
    some = torch.cat([from_values([1.0, 0.0, 0.0, 0.0]), from_values([0.0, 0.0, 0.0, -3.0])])
    res = superpixel_sign_agreement(zero, zero, seg, k=2)
    assert math.isnan(res["superpixel_sign_agreement"]) and res["undefined"] == 2 and res["evaluated"] == 0
    res = superpixel_sign_agreement(some, zero, seg, k=2)
    assert math.isnan(res["superpixel_sign_agreement"]) and res["undefined"] == 2
    # a sparse map has fewer important superpixels: identical sparse maps agree fully (scored 1/2
    # when the count was divided by k)
    for select in ("each", "teacher"):
        res = superpixel_sign_agreement(some, some, seg, k=2, select=select)
        assert res["superpixel_sign_agreement"] == 1.0 and res["undefined"] == 0
    # the teacher singles out one superpixel, the student that one (same sign) and another: "each"
    # counts the student's extra one against it, "teacher" asks only about the teacher's
    wider = from_values([1.0, 0.5, 0.0, 0.0])
    assert superpixel_sign_agreement(some[:1], wider, seg[:1], k=2)["superpixel_sign_agreement"] == 0.5
    res = superpixel_sign_agreement(some[:1], wider, seg[:1], k=2, select="teacher")
    assert res["superpixel_sign_agreement"] == 1.0
    assert superpixel_sign_agreement(some[:1], -wider, seg[:1], k=2, select="teacher")["superpixel_sign_agreement"] == 0


def test_tied_superpixels_are_taken_in_the_seeded_random_order_not_by_index():
    from xkd.metrics.ranking import tie_permutation
    from xkd.metrics.superpixel import _top_k

    values = torch.ones(1, 6, dtype=torch.float64)  # six equally important superpixels
    real = torch.ones(1, 6, dtype=torch.bool)
    expected = tie_permutation(6, 0)[:2]  # the first two positions of the seeded order
    chosen = _top_k(values, real, 2).nonzero()[:, 1]
    assert sorted(chosen.tolist()) == sorted(expected.tolist())
    assert sorted(_top_k(values, real, 2, tie_seed=5).nonzero()[:, 1].tolist()) == sorted(
        tie_permutation(6, 5)[:2].tolist()
    )
