"""DiffROAR on data whose discriminative pixels are known: an oracle ranking is positive, the reversed
ranking negative; results are cached by key."""

from __future__ import annotations

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
    def explain(self, images: Tensor, targets: Tensor | None) -> Attribution:
        return Attribution(-images.mean(1).float(), method="test_darkness")


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
