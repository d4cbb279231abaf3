"""Teacher-student map agreement: correlations and top-k IoU by hand."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from xkd.metrics import map_pearson, map_spearman, top_k_iou_maps, top_n_mask

A = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
B = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]])  # deviations (-1.5, .5, -.5, 1.5) vs (-1.5, -.5, .5, 1.5): r = 4 / 5


def test_pearson_identical_negated_and_by_hand():
    maps = torch.rand(3, 5, 6)
    assert map_pearson(maps, maps) == pytest.approx(1.0)
    assert map_pearson(maps, -maps) == pytest.approx(-1.0)
    assert map_pearson(A, B) == pytest.approx(0.8)
    assert map_pearson(A, 3 * A + 7) == pytest.approx(1.0)


def test_spearman_is_rank_based_with_average_ties():
    assert map_spearman(A, B) == pytest.approx(0.8)
    assert map_spearman(A, A**3) == pytest.approx(1.0)  # monotone transform
    tied_a = torch.tensor([[[0.0, 0.0, 1.0], [2.0, 0.0, 3.0]]])
    tied_b = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]]])
    expected = spearmanr(tied_a.flatten().numpy(), tied_b.flatten().numpy()).statistic
    assert map_spearman(tied_a, tied_b) == pytest.approx(expected)


@pytest.mark.parametrize("fn", [map_pearson, map_spearman])
def test_constant_maps_are_nan_and_left_out_of_the_mean(fn):
    a = torch.cat([A, torch.zeros(1, 2, 2)])
    b = torch.cat([A, B])
    assert fn(a, b) == pytest.approx(1.0)  # the all-zero map's image is skipped, not scored 0
    per_image = fn(a, b, reduction="none")
    assert per_image[0] == pytest.approx(1.0) and math.isnan(per_image[1])
    assert math.isnan(fn(torch.zeros(2, 2, 2), b))
    assert math.isnan(fn(torch.full((1, 2, 2), 1e-3), B))


def test_top_k_agreement():
    maps = torch.rand(4, 4, 4)
    assert top_k_iou_maps(maps, maps, k=0.25) == 1.0
    left, right = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    left[..., :2] = 1.0
    right[..., 2:] = 1.0
    assert top_k_iou_maps(left, right, k=0.5) == 0.0
    # top 4 pixels: rows 0 of both maps share 2 pixels -> IoU 2 / 6
    a, b = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    a[0, 0, :] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    b[0, 0, :2] = 1.0
    b[0, 3, :2] = 1.0
    assert top_k_iou_maps(a, b, k=0.25) == pytest.approx(1 / 3)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same shape"):
        map_pearson(torch.rand(2, 4, 4), torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match="k must be"):
        top_k_iou_maps(A, A, k=0)


def test_top_k_agreement_sparse_maps_are_not_padded_with_zero_pixels():
    zero = torch.zeros(2, 4, 4)
    assert math.isnan(top_k_iou_maps(zero, zero, k=0.5))  # no evidence in either map: undefined, not 1
    a = torch.zeros(1, 4, 4)
    b = torch.zeros(1, 4, 4)
    a[0, 0, 0] = 1.0
    b[0, 3, 3] = 1.0
    # one evidence pixel each, in different places: disjoint (the old padding with zeros gave 0.78)
    assert top_k_iou_maps(a, b, k=0.5) == 0.0
    assert top_k_iou_maps(a, a, k=0.5) == 1.0
    c = a.clone()
    c[0, 0, 1] = 0.5  # a superset: 1 shared pixel of 2
    assert top_k_iou_maps(a, c, k=0.5) == pytest.approx(0.5)


def test_top_n_mask_without_ties_is_the_largest_values_whatever_the_seed():
    flat = torch.randperm(100, generator=torch.Generator().manual_seed(3)).float().view(2, 50)
    for n in (1, 7, 50):
        expected = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, flat.topk(n, dim=1).indices, True)
        for seed in (0, 1, 9):
            assert torch.equal(top_n_mask(flat, n, seed), expected)


def test_top_n_mask_breaks_ties_in_a_seeded_random_order():
    # a Grad-CAM-like 20x20 map: 16 distinct positive values, 384 zeros; 56 pixels asked for
    maps = torch.zeros(1, 20, 20)
    maps[0, 8:12, 8:12] = torch.arange(1.0, 17.0).view(4, 4)
    flat = maps.flatten(1)
    picked = top_n_mask(flat, 56)[0]
    # reference: the blob, then the first 40 zeros in the order of the seeded permutation of positions
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    zeros = [i for i in perm if flat[0, i] == 0]
    expected = flat[0] > 0
    expected[zeros[:40]] = True
    assert torch.equal(picked, expected)
    # the tied zeros taken are spread over the image (rows 0..19, middle 9.5), not the top two rows
    rows = torch.nonzero((picked & (flat[0] == 0)).view(20, 20))[:, 0].double()
    assert 6.5 < rows.mean() < 12.5 and len(rows.unique()) >= 12
    # same seed, same pixels; another seed, other zeros (the blob always)
    assert torch.equal(top_n_mask(flat, 56, 0)[0], picked)
    other = top_n_mask(flat, 56, 5)[0]
    assert not torch.equal(other, picked) and bool(other[flat[0] > 0].all())


def test_top_k_agreement_ties_above_the_minimum_are_not_taken_by_index():
    # map a is 1 on the whole top half (8 tied pixels), b on row 0: with k = 1/4 the index tie-break
    # took row 0 from a's plateau and scored a perfect IoU of 1
    a, b = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    a[0, :2, :] = 1.0
    b[0, 0, :] = 1.0
    for seed in (0, 1, 2):
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(seed)).tolist()
        head = [i for i in perm if i < 8][:4]  # a's top 4: the first plateau pixels in the permutation
        shared = len(set(head) & {0, 1, 2, 3})  # IoU with row 0: shared / (4 + 4 - shared)
        assert top_k_iou_maps(a, b, k=0.25, tie_seed=seed) == pytest.approx(shared / (8 - shared))
    assert top_k_iou_maps(a, b, k=0.25) == top_k_iou_maps(a, b, k=0.25, tie_seed=0) < 1.0
