"""Network dissection: known-answer units, the exact streaming quantile, the summed IoU, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset

from xkd.config import DataConfig
from xkd.data import build_dataset
from xkd.data.base import TensorImageDataset
from xkd.data.concepts import CONCEPT_CLASSES, CONCEPT_NAMES, ConceptDataset, generate_concepts
from xkd.metrics import as_result
from xkd.metrics.dissection import DissectionError, concept_detectors, top_unit_panels
from xkd.metrics.quantile import StreamingTopQuantile
from xkd.models.hooks import LayerNotFoundError
from xkd.registry import METRICS
from xkd.report.figures import plot_top_units


class Lookup(nn.Module):
    """Outputs stored maps per image: finds each input among the stored images (exact match)."""

    def __init__(self, images: torch.Tensor, maps: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("images", images.float().flatten(1))
        self.register_buffer("maps", maps.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.cdist(x.reshape(len(x), -1), self.images).argmin(dim=1)
        return self.maps[idx]


class KnownUnits(nn.Module):
    """``units``: unit k = concept k's mask of the image, then one unit of seeded random pixels."""

    def __init__(self, ds: ConceptDataset) -> None:
        super().__init__()
        masks = ds.concept_masks_batch(torch.arange(len(ds))).float()
        noise = torch.rand(len(ds), 1, *masks.shape[-2:], generator=torch.Generator().manual_seed(0))
        self.units = Lookup(ds.images.float() / 255, torch.cat([masks, noise], 1))
        self.head = nn.Linear(masks.shape[1] + 1, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def concepts():
    images, labels, _, maps = generate_concepts(num_per_class=8, size=32, seed=0)
    return ConceptDataset(images, labels, maps)


@pytest.fixture(scope="module")
def dissected(concepts):
    model = KnownUnits(concepts)
    return model, concept_detectors(model, concepts, layer="units", batch_size=16)


# ----------------------------------------------------------------------------------------------
# known answers


def test_unit_that_outputs_a_concept_mask_is_its_detector(dissected):
    _, res = dissected
    for k, name in enumerate(CONCEPT_NAMES):
        unit = res["units"][k]
        assert unit["concept"] == name and unit["iou"] > 0.9 and unit["detector"], unit
        assert unit["iou"] == pytest.approx(1.0)  # region = the mask exactly (full resolution, binary)
    assert res["n_detectors"] == len(CONCEPT_NAMES) == res["concept_detectors"]
    assert res["per_category"] == {"object": 5, "part": 2, "texture": 3, "colour": 9}
    assert all(v == 1 for v in res["per_concept"].values()) and res["empty_concepts"] == []


def test_unit_firing_on_random_pixels_is_not_a_detector(dissected):
    _, res = dissected
    random_unit = res["units"][len(CONCEPT_NAMES)]
    assert not random_unit["detector"] and random_unit["iou"] < 0.05
    # its threshold is the top 0.5 % of uniform noise: close to 0.995
    assert random_unit["threshold"] == pytest.approx(0.995, abs=0.01) and random_unit["rule"] == ">="


def test_iou_is_summed_over_the_data_not_averaged():
    """Two images, one concept: I = 2 + 8, U = 6 + 8, so IoU = 10/14 (the mean of per-image IoUs is 2/3)."""
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 0, :4] = True
    masks[1, 4, :8] = True
    unit = torch.zeros(2, 1, 16, 16)
    unit[0, 0, 0, 2:6] = 1.0  # 2 pixels in the mask, 2 outside
    unit[1, 0, 4, :8] = 1.0  # exactly the mask
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential()
    model.add_module("units", Lookup(images, unit))
    res = concept_detectors(model, TensorImageDataset(images, torch.tensor([0, 1]), masks), layer="units")
    assert res["concepts"] == ["mask"] and res["categories"] == {"mask": "object"}
    assert res["units"][0]["iou"] == pytest.approx(10 / 14)


def test_empty_concept_is_reported_not_divided_by_zero(concepts):
    circles = concepts.subset(torch.nonzero(concepts.labels == 0).flatten())  # no other shape anywhere
    model = KnownUnits(circles)
    res = concept_detectors(model, circles, layer="units")
    assert res["empty_concepts"] == CONCEPT_CLASSES[1:]
    empty = [CONCEPT_NAMES.index(c) for c in CONCEPT_CLASSES[1:]]
    for u in range(res["n_units"]):
        assert all(res["iou"][u][k] is None for k in empty)
        assert res["units"][u]["concept"] not in CONCEPT_CLASSES[1:]
    for k in empty:  # those units are all zero: T = their minimum, strict rule, nothing marked
        assert res["units"][k]["rule"] == ">" and not res["units"][k]["detector"]
    assert res["units"][0]["concept"] == "circle" and res["units"][0]["iou"] == pytest.approx(1.0)
    json.dumps(res.to_record(), allow_nan=False)  # no NaN anywhere


# ----------------------------------------------------------------------------------------------
# streaming quantile


@pytest.mark.parametrize("q", [0.0, 0.3, 0.9, 0.995, 0.999, 1.0])
def test_streaming_quantile_matches_torch_quantile(q):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 20_000, generator=g, dtype=torch.float64) ** 3  # heavy tails
    sq = StreamingTopQuantile(7, x.shape[1], q)
    for chunk in x.split(1_531, dim=1):
        sq.update(chunk)
    got = sq.result()
    assert torch.allclose(got, torch.quantile(x, q, dim=1), rtol=0, atol=1e-12)
    # float32 activations: compared with numpy's float64 computation on the same float32 values
    x32 = x.float()
    sq = StreamingTopQuantile(7, x.shape[1], q)
    for chunk in x32.split(4_096, dim=1):
        sq.update(chunk)
    ref = torch.from_numpy(np.quantile(x32.double().numpy(), q, axis=1))
    assert (sq.result().double() - ref).abs().max() <= 1e-6 * max(1.0, float(ref.abs().max()))


def test_streaming_quantile_with_ties_and_relu_zeros():
    g = torch.Generator().manual_seed(3)
    relu = torch.relu(torch.randn(3, 5_000, generator=g) - 2.7)  # ~99.7 % zeros: T = 0 at q = 0.995
    ints = torch.randint(0, 4, (3, 5_000), generator=g).float()  # heavy ties
    for x in (relu, ints):
        sq = StreamingTopQuantile(3, 5_000, 0.995)
        for chunk in x.split(999, dim=1):
            sq.update(chunk)
        assert torch.equal(sq.result(), torch.quantile(x, 0.995, dim=1))
        assert torch.equal(sq.min, x.amin(dim=1))


def test_streaming_quantile_memory_is_bounded_and_checked():
    sq = StreamingTopQuantile(4, 100_000, 0.995)
    for chunk in torch.rand(4, 100_000).split(10_000, dim=1):
        sq.update(chunk)
        assert sq.top.shape[1] <= 500 + 1  # only the top 0.5 % is ever held
    with pytest.raises(DissectionError, match="use a higher quantile"):
        StreamingTopQuantile(512, 10**7, 0.5)
    with pytest.raises(ValueError, match="expected 100000"):
        StreamingTopQuantile(4, 100_000, 0.99).result()


# ----------------------------------------------------------------------------------------------
# inputs, state, registry, figure


def test_bad_layer_lists_module_paths(concepts):
    with pytest.raises(LayerNotFoundError, match="module paths") as err:
        concept_detectors(KnownUnits(concepts), concepts, layer="layer9")
    assert "units" in str(err.value) and "head" in str(err.value)
    with pytest.raises(DissectionError, match="needs a \\(N, units, H, W\\) activation map"):
        concept_detectors(KnownUnits(concepts), concepts, layer="head")


def test_dataset_without_masks_names_the_datasets_that_have_them(concepts):
    plain = TensorImageDataset(concepts.images, concepts.labels)
    with pytest.raises(DissectionError, match="no concept masks") as err:
        concept_detectors(KnownUnits(concepts), plain, layer="units")
    assert all(name in str(err.value) for name in ("`concepts`", "`lesions`", "`imagefolder`"))


def test_loader_subset_and_dataset_give_the_same_result(concepts, dissected):
    model, res = dissected
    via_loader = concept_detectors(model, DataLoader(concepts, batch_size=11), layer="units")
    via_subset = concept_detectors(model, Subset(concepts, range(len(concepts))), layer="units", batch_size=20)
    for other in (via_loader, via_subset):
        assert other["iou"] == res["iou"] and other["thresholds"] == res["thresholds"]


def test_model_mode_restored_and_hooks_removed(concepts):
    model = KnownUnits(concepts).train()
    concept_detectors(model, concepts, layer="units")
    assert model.training and model.units.training and not model.units._forward_hooks


def test_model_that_rejects_channels_last_inputs_still_works():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.view(len(x), -1).view(len(x), 3, 16, 16)  # .view fails on a channels-last input
            return self.conv(x).mean(dim=(2, 3))

    images = torch.rand(6, 3, 16, 16)
    ds = TensorImageDataset(images, torch.zeros(6, dtype=torch.long), images[:, 0] > 0.5)
    res = concept_detectors(Flat(), ds, layer="conv", batch_size=4)
    assert res["n_units"] == 4 and res["feature_size"] == [16, 16]


def test_registered_with_metadata_and_headline(dissected):
    info = METRICS.get("concept_detectors")
    assert info.fn is concept_detectors and info.higher_is_better is True
    assert info.category == "interpretability" and "concept_data" in info.needs and info.description
    assert info.scope == "study"  # a run cannot select it: a study computes it
    _, res = dissected
    r = as_result("concept_detectors", res)
    assert r.value == res.n_detectors == 19 and r.details["per_category"]["colour"] == 9
    assert len(res.detectors()) == 19


def test_figure_of_top_units(tmp_path, concepts, dissected):
    model, res = dissected
    path = plot_top_units(top_unit_panels(res, model, concepts, n_units=3, n_images=2), tmp_path / "units.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_imagefolder_with_a_mask_tree_per_concept_is_dissected_per_concept(tmp_path):
    # concepts/<category>/<concept>/<class>/<stem>.png; an image without a file lacks that concept
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(12):
            (tmp_path / cls).mkdir(exist_ok=True)
            img = (rng.random((16, 16)) * 255).astype("uint8")
            Image.fromarray(img).save(tmp_path / cls / f"{cls}{i}.png")
            r, c = 4 * (i % 3), 4 * (i % 2)
            m = np.zeros((16, 16), "uint8")
            m[r : r + 8, c : c + 8] = 255
            folder = tmp_path / "concepts" / "texture" / "stripes" / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(folder / f"{cls}{i}.png")
            if i % 2 == 0:  # "red" only in every other image
                folder = tmp_path / "concepts" / "colour" / "red" / cls
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(255 - m).save(folder / f"{cls}{i}.png")
    (tmp_path / "concepts" / "part" / "handle").mkdir(parents=True)  # a concept with no image at all
    data = build_dataset(DataConfig("imagefolder", root=str(tmp_path)))
    assert data.class_names == ["a", "b"]  # `concepts` is not a class
    test = data.train
    assert sorted(test.concept_names) == ["handle", "red", "stripes"]
    masks = torch.stack([test.concept_masks(i) for i in range(len(test))])
    k = {n: j for j, n in enumerate(test.concept_names)}
    assert masks[:, k["stripes"]].flatten(1).sum(1).eq(64).all() and not masks[:, k["handle"]].any()
    assert masks[:, k["red"]].flatten(1).sum(1).unique().tolist() == [0, 192]
    # a unit reporting the stripes mask at HALF resolution (the upsampling path) is its detector
    images = torch.stack([test[i][0] for i in range(len(test))])
    half = masks[:, [k["stripes"]]].float()[:, :, ::2, ::2]
    res = concept_detectors(nn.Sequential(Lookup(images, half)), test, layer="0", batch_size=8)
    unit = res["units"][0]
    assert unit["concept"] == "stripes" and unit["detector"] and unit["threshold"] == 1.0
    # by hand: bilinear upsampling blurs each block's edge to 0.75, so only pixels at exactly 1
    # (the block's interior, and its edges on the image border) pass the threshold of 1
    on = torch.nn.functional.interpolate(half, size=(16, 16), mode="bilinear", align_corners=False) >= 1.0
    truth = masks[:, [k["stripes"]]]
    assert unit["iou"] == pytest.approx(float((on & truth).sum() / (on | truth).sum()), abs=1e-6)
    assert 0.5 < unit["iou"] < 0.8
    assert res["empty_concepts"] == ["handle"] and res["categories"]["stripes"] == "texture"
