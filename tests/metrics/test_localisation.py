"""Pointing game, top-K IoU and Dice against ground-truth masks."""

from __future__ import annotations

import math

import pytest
import torch

from xkd.metrics import medtex_k_values, pointing_game, top_k_iou
from xkd.metrics.localisation import region_precision_recall


def square_masks(n: int = 3) -> torch.Tensor:
    masks = torch.zeros(n, 8, 8, dtype=torch.bool)
    masks[:, 2:4, 3:5] = True  # 4 pixels
    return masks


def test_pointing_game_perfect_inverted_and_partial():
    masks = square_masks()
    assert pointing_game(masks.float(), masks)["pointing_game"] == 1.0
    assert pointing_game((~masks).float(), masks)["pointing_game"] == 0.0
    maps = masks.float() + 0.0
    maps[2, 7, 7] = 5.0  # the third map points outside
    out = pointing_game(maps, masks)
    assert out == {"pointing_game": pytest.approx(2 / 3), "hits": 2, "evaluated": 3, "skipped_empty": 0}


def test_pointing_game_skips_and_counts_empty_masks():
    masks = square_masks()
    masks[1] = False
    out = pointing_game(masks.float(), masks)
    assert (out["pointing_game"], out["evaluated"], out["skipped_empty"]) == (1.0, 2, 1)
    assert math.isnan(pointing_game(torch.rand(1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool))["pointing_game"])


def test_top_k_iou_equal_map_and_hand_values():
    masks = square_masks()
    out = top_k_iou(masks.float(), masks, k_pixels=4)
    assert out["top_k_iou"] == 1.0 and out["dice"] == 1.0 and out["k_pixels"] == 4
    # the 4 top pixels overlap the 4-pixel mask in 2: IoU 2 / 6, Dice 2 * 2 / 8
    maps = torch.zeros(1, 8, 8)
    maps[0, 2, 3:7] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    out = top_k_iou(maps, masks[:1], k_pixels=4)
    assert out["top_k_iou"] == pytest.approx(1 / 3) and out["dice"] == pytest.approx(0.5)
    # K = 2 inside the mask: IoU 2 / 4, Dice 2 * 2 / (2 + 4)
    out = top_k_iou(masks[:1].float(), masks[:1], k_pixels=2)
    assert out["top_k_iou"] == pytest.approx(0.5) and out["dice"] == pytest.approx(2 / 3)


def test_top_k_iou_over_several_k_and_empty_masks():
    masks = square_masks(2)
    masks[1] = False
    out = top_k_iou(masks.float(), masks, k_pixels=[2, 4])
    assert out["per_k"] == {2: {"iou": 0.5, "dice": pytest.approx(2 / 3)}, 4: {"iou": 1.0, "dice": 1.0}}
    assert out["top_k_iou"] == pytest.approx(0.75) and (out["evaluated"], out["skipped_empty"]) == (1, 1)
    with pytest.raises(ValueError, match="1..64"):
        top_k_iou(masks.float(), masks, k_pixels=65)


def test_medtex_k_values_scale_from_224():
    assert medtex_k_values(224, 224) == [1024, 2048, 3072, 4096, 5120, 6144]
    assert medtex_k_values(28, 28) == [16, 32, 48, 64, 80, 96]  # 1024 * 784 / 50176 = 16
    assert medtex_k_values(4, 4) == [1, 1, 1, 1, 2, 2]
    assert len(top_k_iou(torch.rand(2, 28, 28), torch.ones(2, 28, 28, dtype=torch.bool))["per_k"]) == 6


# ---- top_k_dice, mask_mass (direct module import: registered on import) ----
from xkd.metrics.localisation import mask_mass, top_k_dice  # noqa: E402


def test_perfect_map_scores_one_everywhere():
    masks = square_masks()
    maps = masks.float()
    assert pointing_game(maps, masks)["pointing_game"] == 1.0
    assert top_k_iou(maps, masks, k_pixels=4)["top_k_iou"] == 1.0
    assert top_k_dice(maps, masks, k_pixels=4)["top_k_dice"] == 1.0
    assert mask_mass(maps, masks)["mask_mass"] == 1.0
    assert mask_mass((~masks).float(), masks)["mask_mass"] == 0.0


def test_top_k_dice_is_top_k_iou_dice():
    maps = torch.zeros(1, 8, 8)
    maps[0, 2, 3:7] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    out = top_k_dice(maps, square_masks(1), k_pixels=4)
    assert out["top_k_dice"] == pytest.approx(0.5) and out["top_k_iou"] == pytest.approx(1 / 3)
    assert "dice" not in out and out["evaluated"] == 1
    several = top_k_dice(maps, square_masks(1), k_pixels=[2, 4])
    # K = 2: both top pixels (2, 3), (2, 4) are inside: Dice 2 * 2 / (2 + 4); K = 4: 0.5
    assert several["top_k_dice"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert several["per_k"][2]["dice"] == pytest.approx(2 / 3)


def test_mask_mass_by_hand_signed_and_undefined():
    masks = square_masks(4)  # 4 of 64 pixels
    maps = torch.zeros(4, 8, 8)
    maps[0] = 1.0  # uniform: the mask's area fraction
    maps[1, 2, 3], maps[1, 0, 0], maps[1, 7, 7] = 3.0, 1.0, -5.0  # negative evidence is ignored: 3 / 4
    masks[2] = False  # empty mask -> undefined
    # maps[3] is all zero: no positive evidence -> undefined
    out = mask_mass(maps, masks)
    assert out["per_image"][0].item() == pytest.approx(4 / 64) and out["per_image"][1].item() == pytest.approx(0.75)
    assert math.isnan(out["per_image"][2]) and math.isnan(out["per_image"][3])
    assert out["mask_mass"] == pytest.approx((4 / 64 + 0.75) / 2)
    assert (out["evaluated"], out["skipped_empty"], out["skipped_no_positive"]) == (2, 1, 1)
    assert math.isnan(mask_mass(torch.rand(1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool))["mask_mass"])


@pytest.mark.parametrize("fn", [pointing_game, top_k_iou, top_k_dice, mask_mass])
def test_maps_and_masks_of_different_sizes_are_one_clear_error(fn):
    with pytest.raises(ValueError, match="resize the masks"):
        fn(torch.rand(2, 8, 8), torch.ones(2, 16, 16, dtype=torch.bool))


def test_region_precision_and_recall_by_hand():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0, :] = True  # 4-pixel region
    masks[1, :2, :2] = True  # 4-pixel region
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, :2] = 1.0  # top 2 pixels both inside the region
    maps[1, 3, 3], maps[1, 0, 0] = 2.0, 1.0  # top 2: one outside, one inside
    res = region_precision_recall(maps, masks, fraction=2 / 16)
    # image 0: precision 2/2, recall 2/4; image 1: precision 1/2, recall 1/4
    assert res["region_precision"] == pytest.approx((1.0 + 0.5) / 2)
    assert res["region_recall"] == pytest.approx((0.5 + 0.25) / 2)
    perfect = region_precision_recall(masks.float(), masks, fraction=4 / 16)
    assert perfect["region_precision"] == 1.0 and perfect["region_recall"] == 1.0
    inverted = region_precision_recall((~masks).float(), masks, fraction=4 / 16)
    assert inverted["region_precision"] == 0.0 and inverted["region_recall"] == 0.0
    empty = region_precision_recall(maps, torch.zeros_like(masks))
    assert math.isnan(empty["region_precision"]) and empty["skipped_empty"] == 2
    with pytest.raises(ValueError, match="fraction must be in"):
        region_precision_recall(maps, masks, fraction=0.0)


def test_pointing_game_ties_score_the_share_of_tied_pixels_inside_the_mask():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 2:, 2:] = True  # 4 of 16 pixels
    superpixel = torch.zeros(2, 4, 4)
    superpixel[0, 1:, 1:] = 1.0  # the top superpixel: 9 pixels, 4 in the mask (row-major first is outside)
    out = pointing_game(superpixel[:1], masks[:1])
    assert out["pointing_game"] == pytest.approx(4 / 9)
    constant = torch.ones(1, 4, 4)  # no evidence anywhere: chance, the mask's area share
    assert pointing_game(constant, masks[:1])["pointing_game"] == pytest.approx(4 / 16)
