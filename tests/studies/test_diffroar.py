"""DiffROAR on data whose discriminative pixels are known: an oracle ranking is positive, the reversed
ranking negative; results are cached by key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from xkd.config import DiffROARConfig, ModelConfig
from xkd.data.base import TensorImageDataset
from xkd.explain.base import Attribution, Explainer
from xkd.registry import EXPLAINERS
from xkd.studies.diffroar import diffroar, keep_pixels


class _Brightness(Explainer):
    """Test oracle: the evidence is the bright square, so brightness ranks it first."""

    def explain(self, images: Tensor, targets: Tensor | None) -> Attribution:
        return Attribution(images.mean(1).float(), method="test_brightness")


class _Darkness(_Brightness):
    """The reversed oracle. Pixels rank by ``|value|`` (Shah et al.'s code), so the negated brightness
    would rank like the brightness itself; ``1 - brightness`` (images lie in [0, 1]) reverses it."""

    def explain(self, images: Tensor, targets: Tensor | None) -> Attribution:
        return Attribution(1 - images.mean(1).float(), method="test_darkness")


for _name, _cls in (("test_brightness", _Brightness), ("test_darkness", _Darkness)):
    if _name not in EXPLAINERS:
        EXPLAINERS.register(_name)(_cls)


def squares(n: int, seed: int) -> TensorImageDataset:
    """Class 0: a bright 4x4 square in the left half; class 1: in the right half; noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(n, 1, 12, 12, generator=g)
    y = torch.arange(n) % 2
    for i in range(n):
        r = int(torch.randint(0, 8, (1,), generator=g))
        c = int(torch.randint(0, 2, (1,), generator=g)) + (0 if y[i] == 0 else 6)
        x[i, 0, r : r + 4, c : c + 4] = 1.0
    return TensorImageDataset(x, y)


def test_keep_pixels_by_hand():
    images = torch.arange(4.0).view(1, 1, 2, 2)
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.2]]])
    fill = torch.tensor([-1.0])
    top = keep_pixels(images, maps, 0.5, "top", fill)
    bottom = keep_pixels(images, maps, 0.5, "bottom", fill)
    assert top.flatten().tolist() == [-1.0, 1.0, 2.0, -1.0]
    assert bottom.flatten().tolist() == [0.0, -1.0, -1.0, 3.0]
    with pytest.raises(ValueError, match="side must be"):
        keep_pixels(images, maps, 0.5, "middle", fill)


def test_keep_pixels_ranks_by_magnitude():
    # Shah et al.'s get_attribution_indices ranks np.abs(attribution): -5 is as salient as +5
    images = torch.arange(4.0).view(1, 1, 2, 2)
    maps = torch.tensor([[[-5.0, 0.1], [5.0, -0.2]]])
    fill = torch.tensor([-1.0])
    # |values| 5, 0.1, 5, 0.2: the top half is both 5s, the bottom half 0.1 and |-0.2|
    assert keep_pixels(images, maps, 0.5, "top", fill).flatten().tolist() == [0.0, -1.0, 2.0, -1.0]
    assert keep_pixels(images, maps, 0.5, "bottom", fill).flatten().tolist() == [-1.0, 1.0, -1.0, 3.0]
    # a quarter: keep-bottom keeps the smallest magnitude 0.1, never the strongly negative pixel
    assert keep_pixels(images, maps, 0.25, "bottom", fill).flatten().tolist() == [-1.0, 1.0, -1.0, -1.0]


def gradcam_like(h: int = 16, w: int = 16) -> Tensor:
    """A Grad-CAM after its ReLU: a bright 4x4 blob of distinct values, exactly 0 everywhere else."""
    maps = torch.zeros(1, h, w)
    maps[0, 6:10, 9:13] = torch.arange(1.0, 17.0).view(4, 4)
    return maps


def test_keep_top_and_bottom_do_not_overlap_on_a_gradcam_like_map():
    maps = gradcam_like()
    images, fill = torch.ones(1, 1, 16, 16), torch.zeros(1)
    count = round(0.3 * 256)  # 77 pixels: the 16 blob pixels and 61 of the 240 tied zeros for keep-top
    top = keep_pixels(images, maps, 0.3, "top", fill)[0, 0].flatten().bool()
    bottom = keep_pixels(images, maps, 0.3, "bottom", fill)[0, 0].flatten().bool()
    assert int(top.sum()) == int(bottom.sum()) == count
    assert not (top & bottom).any()  # an index tie-break gave both sides the same top rows of zeros
    # reference: the zeros in the order of the seeded permutation; keep-top takes its head, keep-bottom its tail
    blob = maps[0].flatten() > 0
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0)).tolist()
    zeros = [i for i in perm if not blob[i]]
    expected_top, expected_bottom = blob.clone(), torch.zeros(256, dtype=torch.bool)
    expected_top[zeros[: count - 16]] = True
    expected_bottom[zeros[-count:]] = True
    assert torch.equal(top, expected_top) and torch.equal(bottom, expected_bottom)
    # the bottom is spread over the image, not a band of rows (rows 0..15, middle 7.5)
    rows = torch.nonzero(bottom.view(16, 16))[:, 0].double()
    assert 5.5 < rows.mean() < 9.5 and len(rows.unique()) >= 12
    # seeded: the same seed repeats, another seed picks other zeros; pixels without ties do not move
    again = keep_pixels(images, maps, 0.3, "bottom", fill, tie_seed=0)[0, 0].flatten().bool()
    other = keep_pixels(images, maps, 0.3, "bottom", fill, tie_seed=1)[0, 0].flatten().bool()
    assert torch.equal(again, bottom) and not torch.equal(other, bottom)
    assert torch.equal(keep_pixels(images, maps, 16 / 256, "top", fill, tie_seed=1)[0, 0].flatten().bool(), blob)


@pytest.mark.slow
def test_oracle_ranking_is_positive_reversed_is_negative_and_cached(tmp_path):
    splits = {"train": squares(240, 0), "val": squares(60, 1), "test": squares(100, 2)}
    arch = ModelConfig("kdfmv_cnn", params={"widths": [8, 16]})
    model = nn.Identity()  # the oracle explainers ignore the model
    kwargs = dict(splits=splits, num_classes=2, retrain_model=arch, data_key="squares", seed=0,
                  device=torch.device("cpu"), cache_dir=tmp_path)  # fmt: skip
    cfg = DiffROARConfig(explainer="test_brightness", fractions=[0.15], epochs=4, batch_size=32, lr=5e-3)
    good = diffroar(model, "oracle", cfg=cfg, **kwargs)
    # the kept 15% (22 pixels) of the oracle cover the 16-pixel square: its side is visible. The bottom
    # 15% (darkest noise) still leak some position through where they are not (ROAR's known leak)
    assert good["keep_top"][0] > 0.9 and good["keep_bottom"][0] < good["keep_top"][0] - 0.1
    assert good["diffroar"][0] == pytest.approx(good["keep_top"][0] - good["keep_bottom"][0])
    assert good["diffroar"][0] > 0.1 and good["cached"] == [False, False]
    # the reversed ranking keeps exactly the pixels the oracle's bottom kept, and vice versa
    bad = diffroar(model, "reversed", cfg=DiffROARConfig(**{**cfg.__dict__, "explainer": "test_darkness"}), **kwargs)
    assert bad["keep_top"][0] == pytest.approx(good["keep_bottom"][0])
    assert bad["diffroar"][0] == pytest.approx(-good["diffroar"][0])
    again = diffroar(model, "oracle", cfg=cfg, **kwargs)
    assert again["cached"] == [True, True] and again["diffroar"] == good["diffroar"]


def test_the_cache_key_names_a_gpu_not_the_cpu(monkeypatch):
    """A GPU retrains in bf16 (amp: auto), so its accuracies are cached apart; CPU keys are unchanged
    (results cached before the study followed the configured device stay valid)."""
    import xkd.studies.diffroar as R

    seen = []

    class Stop(Exception):
        pass

    def key(what):
        seen.append(dict(what))
        raise Stop

    monkeypatch.setattr(R.Cache, "key", staticmethod(key))
    splits = {"train": squares(8, 0), "val": squares(4, 1), "test": squares(4, 2)}
    cfg = DiffROARConfig(explainer="test_brightness", fractions=[0.5])
    for device in ("cpu", "meta"):
        with pytest.raises(Stop):
            diffroar(
                nn.Identity(), "m", splits, 2, cfg, ModelConfig("kdfmv_cnn"), "d", 0, torch.device(device), Path(".")
            )
    assert "device" not in seen[0] and seen[1]["device"] == "meta"
    assert {k: v for k, v in seen[1].items() if k != "device"} == seen[0]
