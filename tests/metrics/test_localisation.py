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


def test_top_k_iou_and_region_precision_take_tied_pixels_in_the_seeded_order():
    # an all-zero map (no evidence) against a mask on the top two rows: an index tie-break took the top
    # K pixels row-major, i.e. the mask itself, and scored this evidence-free map IoU = precision = 1
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :2] = True  # 16 pixels
    flat_map = torch.zeros(1, 8, 8)
    for seed in (0, 1):
        head = torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:16].tolist()
        inside = sum(i < 16 for i in head)
        out = top_k_iou(flat_map, masks, k_pixels=16, tie_seed=seed)
        assert out["top_k_iou"] == pytest.approx(inside / (32 - inside)) and out["dice"] == pytest.approx(inside / 16)
        res = region_precision_recall(flat_map, masks, fraction=16 / 64, tie_seed=seed)
        assert res["region_precision"] == pytest.approx(inside / 16) == res["region_recall"]
    assert top_k_iou(flat_map, masks, k_pixels=16)["top_k_iou"] < 1.0


# ---- MED-TEX's eq. 14, mask mass of superpixel-form maps, MED-TEX's K (issue 13, findings 6, 9, 11) ----
import xkd.metrics.localisation as localisation  # noqa: E402


def test_medtex_eq14_as_printed_is_twice_the_iou_and_xkd_reports_iou_and_dice():
    # seed 001, eq. 14: IoU_topK = 2 |Θ_topK ∩ X_lesion| / |Θ_topK ∪ X_lesion|, computed here on pixel sets
    maps = torch.zeros(1, 8, 8)
    maps[0, 2, 3:7] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    top = {(2, 3), (2, 4), (2, 5), (2, 6)}  # the K = 4 most salient pixels
    lesion = {(2, 3), (2, 4), (3, 3), (3, 4)}  # square_masks: rows 2-3, columns 3-4
    eq14 = 2 * len(top & lesion) / len(top | lesion)  # 2 * 2 / 6 = 2/3
    iou = len(top & lesion) / len(top | lesion)  # 1/3
    dice = 2 * len(top & lesion) / (len(top) + len(lesion))  # 1/2
    assert eq14 == pytest.approx(2 * iou) and eq14 != pytest.approx(dice)
    assert 2 * len(lesion) / len(lesion) == 2  # a perfect map: eq. 14 as printed reaches 2, not 1
    out = top_k_dice(maps, square_masks(1), k_pixels=4)
    assert out["top_k_iou"] == pytest.approx(iou) and out["top_k_dice"] == pytest.approx(dice)
    # the documentation names eq. 14 for what it prints and says its factor 2 is dropped
    for doc in (localisation.__doc__, top_k_iou.__doc__, top_k_dice.__doc__):
        assert "2 |A ∩ B| / |A ∪ B|" in doc and "factor 2" in doc, doc
    assert "eq. 14 as written" not in top_k_dice.__doc__
    assert "is the Dice coefficient" not in localisation.__doc__


def two_superpixels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A superpixel-form map valued 1 on two superpixels: row 0 (10 px, the mask) and rows 1-9 (90 px)."""
    segments = torch.ones(1, 10, 10, dtype=torch.long)
    segments[0, 0] = 0
    return torch.ones(1, 10, 10), segments == 0, segments


def test_mask_mass_scores_superpixel_form_maps_once_per_superpixel():
    maps, masks, segments = two_superpixels()
    # per superpixel: values (1, 1), shares inside the mask (10/10, 0/90): (1 * 1 + 1 * 0) / (1 + 1)
    out = mask_mass(maps, masks, segments=segments, form="superpixel")
    assert out["mask_mass"] == pytest.approx(0.5) and out["evaluated"] == 1
    # read pixel by pixel, the same map weighs each superpixel by its area: 10 / 100
    assert mask_mass(maps, masks)["mask_mass"] == pytest.approx(0.1)
    assert mask_mass(maps, masks, segments=segments, form="pixel")["mask_mass"] == pytest.approx(0.1)


def test_mask_mass_of_superpixel_maps_by_hand_straddling_signed_and_undefined():
    segments = torch.zeros(3, 4, 4, dtype=torch.long)
    segments[:, :2, 2:] = 1  # s1: 4 px, top right
    segments[:, 2:, 2:] = 2  # s2: 4 px, bottom right; s0: the left half, 8 px
    values = torch.tensor([2.0, 4.0, -3.0])
    maps = values[segments]  # every pixel holds its superpixel's value
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[:, :, 0] = True  # 4 of s0's 8 px
    masks[:, 0, 2] = True  # 1 of s1's 4 px
    masks[1] = False  # image 1: empty mask -> undefined
    maps[2] = -maps[2].abs()  # image 2: no positive value -> undefined
    out = mask_mass(maps, masks, segments=segments, form="superpixel")
    # image 0: shares (4/8, 1/4, 0), positive values (2, 4, 0): (2 * 1/2 + 4 * 1/4) / (2 + 4) = 1/3
    assert out["per_image"][0].item() == pytest.approx(1 / 3)
    assert math.isnan(out["per_image"][1]) and math.isnan(out["per_image"][2])
    assert (out["evaluated"], out["skipped_empty"], out["skipped_no_positive"]) == (1, 1, 1)
    # area-weighted (pixel form): (4 * 2 + 1 * 4) / (8 * 2 + 4 * 4) = 12 / 32
    assert mask_mass(maps, masks)["per_image"][0].item() == pytest.approx(12 / 32)
    with pytest.raises(ValueError, match="need their segments"):
        mask_mass(maps, masks, form="superpixel")
    with pytest.raises(ValueError, match="form must be"):
        mask_mass(maps, masks, segments=segments, form="superpixels")


def test_the_scoring_loop_reads_superpixel_form_maps_once_per_superpixel_for_mask_mass():
    from torch import nn

    from xkd.config import EvaluationConfig
    from xkd.metrics.base import INPUTS
    from xkd.scoring import Scorer, run_inputs, score_maps

    info = mask_mass.info
    assert {"segments", "map_form"} <= set(info.needs) <= set(INPUTS)
    maps, masks, segments = two_superpixels()
    sc = Scorer(EvaluationConfig(metrics=["mask_mass"]))
    common = run_inputs(sc, torch.rand(1, 1, 10, 10), torch.zeros(1, dtype=torch.long), masks, ["a"])
    assert common["segments"] is not None and common["map_form"] == "pixel"  # SLIC, and the default form
    values = {**common, "model": nn.Identity(), "maps": maps, "segments": segments}
    assert score_maps(sc, {**values, "map_form": "superpixel"})["mask_mass"] == pytest.approx(0.5)
    assert score_maps(sc, {**values, "map_form": "pixel"})["mask_mass"] == pytest.approx(0.1)
    assert score_maps(sc, values)["mask_mass"] == pytest.approx(0.1)


def test_explain_and_score_gives_mask_mass_each_explainers_map_form(tiny_model):
    from types import SimpleNamespace

    from rich.console import Console

    from xkd.config import EvaluationConfig
    from xkd.explain.base import resolve_explainer
    from xkd.scoring import Scorer, explain, explain_and_score, run_inputs

    ev = EvaluationConfig(metrics=["mask_mass"])
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[:, 3:9, 4:10] = True
    teacher = SimpleNamespace(role="teacher", model=tiny_model("teacher", 1).eval())
    specs = [resolve_explainer("grad_cam"), resolve_explainer("grad_cam+superpixel")]
    plan = SimpleNamespace(cfg=SimpleNamespace(evaluation=ev), explainers=specs)
    out = explain_and_score(plan, [teacher], images, labels, masks, ["a", "b", "c"], Console(quiet=True))
    segments = run_inputs(Scorer(ev), images, labels, masks, ["a"])["segments"]
    for spec in specs:
        maps = explain(spec, teacher.model, images, labels)
        expected = mask_mass(maps, masks, segments=segments, form=spec.map_form)["mask_mass"]
        assert out["per_model"]["teacher"][spec.key]["mask_mass"] == pytest.approx(expected), spec.key
    sp = explain(specs[1], teacher.model, images, labels)
    assert specs[1].map_form == "superpixel"
    assert mask_mass(sp, masks)["mask_mass"] != pytest.approx(
        out["per_model"]["teacher"][specs[1].key]["mask_mass"]
    )  # the area-weighted reading would differ


def test_medtex_k_values_keep_the_papers_share_of_an_assumed_224_px_image():
    # seed 001: topK in {k * 32 * 32 | k = 1..6} pixels, input size not stated; at an assumed 224 x 224
    # that is the share k * 1024 / 50176 of the pixels, kept at any image size
    assert medtex_k_values(224, 224) == [k * 32 * 32 for k in range(1, 7)]
    assert (
        medtex_k_values(64, 64)
        == [round(k * 1024 * 4096 / 50176) for k in range(1, 7)]
        == [84, 167, 251, 334, 418, 502]
    )
    assert medtex_k_values(32, 48) == [round(k * 1024 * 1536 / 50176) for k in range(1, 7)]
    doc = medtex_k_values.__doc__
    assert "does not state" in doc and "224" in doc
