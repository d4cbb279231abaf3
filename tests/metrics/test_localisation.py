"""Pointing game, top-K IoU and Dice against ground-truth masks."""

from __future__ import annotations

import math

import pytest
import torch

from xkd.metrics import medtex_k_values, pointing_game, top_k_iou


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
