"""Batch augmentation: per-image parameters, reproducible from the caller's generator, exact crops
and flips, torchvision's formulas for rotation and jitter, and the ``data.augment`` config."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from xkd.config import AugmentConfig, DataConfig
from xkd.data.augment import BatchAugment, affine, color_jitter, shift_crop
from xkd.errors import ConfigError
from xkd.plan import load_config

ALL_ON = AugmentConfig(crop_padding=4, hflip=True, resized_crop=[0.6, 1.0], rotation=15.0, color_jitter=0.4)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 16, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=gen(seed))


def test_same_seed_same_batch_and_different_seeds_differ():
    x = batch()
    aug = BatchAugment(ALL_ON, (3, 16, 16))
    assert torch.equal(aug(x, gen(1)), aug(x, gen(1)))
    assert not torch.equal(aug(x, gen(1)), aug(x, gen(2)))
    g = gen(1)
    first, second = aug(x, g), aug(x, g)  # the state advances: the next batch draws anew
    assert not torch.equal(first, second)


def test_draws_from_a_generator_on_the_images_device_never_wait_for_the_host(device, no_host_sync):
    # the trainer's generator lives on the training device: on a GPU no draw is copied from the host
    x = batch().to(device)
    aug = BatchAugment(ALL_ON, (3, 16, 16))
    aug(x, torch.Generator(device=device).manual_seed(0))  # warm-up
    with no_host_sync(device):
        out = aug(x, torch.Generator(device=device).manual_seed(1))
    assert out.device == x.device and out.shape == x.shape and not torch.equal(out, x)
    again = aug(x, torch.Generator(device=device).manual_seed(1))
    assert torch.equal(out, again)


def test_the_global_rng_is_neither_used_nor_moved():
    x = batch()
    aug = BatchAugment(ALL_ON, (3, 16, 16))
    state = torch.get_rng_state()
    torch.manual_seed(123)
    a = aug(x, gen(5))
    torch.manual_seed(456)
    b = aug(x, gen(5))
    assert torch.equal(a, b)
    torch.set_rng_state(state)
    before = torch.get_rng_state()
    aug(x, gen(5))
    assert torch.equal(torch.get_rng_state(), before)


def test_each_image_gets_its_own_flip():
    image = torch.rand(1, 1, 8, 8, generator=gen(0))  # not left-right symmetric
    x = image.expand(64, 1, 8, 8).clone()
    out = BatchAugment(AugmentConfig(hflip=True), (1, 8, 8))(x, gen(0))
    flipped = torch.tensor([torch.equal(o, image[0].flip(-1)) for o in out])
    kept = torch.tensor([torch.equal(o, image[0]) for o in out])
    assert bool((flipped | kept).all())  # exact: the image or its mirror, nothing in between
    assert 10 < int(flipped.sum()) < 54  # about half of 64, each image drawn on its own


def test_each_image_gets_its_own_parameters_with_everything_on():
    x = batch(n=1).expand(32, 3, 16, 16).clone()
    out = BatchAugment(ALL_ON, (3, 16, 16))(x, gen(0))
    assert len({o.numpy().tobytes() for o in out}) == 32


def test_crop_with_padding_keeps_the_shape_and_shifts_by_at_most_the_padding():
    h = w = 12
    x = torch.zeros(64, 1, h, w)
    x[:, 0, 5, 6] = 1.0
    out = BatchAugment(AugmentConfig(crop_padding=3), (1, h, w))(x, gen(0))
    assert out.shape == x.shape
    assert torch.all(out.flatten(1).sum(1) == 1.0)  # the pixel moved whole, nothing interpolated
    where = (out[:, 0] == 1.0).flatten(1).nonzero()[:, 1]  # one per image, in batch order
    dy, dx = where // w - 5, where % w - 6
    assert int(dy.abs().max()) <= 3 and int(dx.abs().max()) <= 3
    assert {int(dy.min()), int(dy.max()), int(dx.min()), int(dx.max())} == {-3, 3}  # the whole range is used
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 20  # per image, not one shift for the batch


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_shift_crop_is_an_exact_translation(mode):
    x = batch(n=2, c=2, h=6, w=7)
    padded = TF.pad(x, [2], padding_mode="constant" if mode == "zero" else "reflect")
    out = shift_crop(x, 2, torch.tensor([[0, 4], [2, 1]]), mode=mode)
    assert torch.equal(out[0], padded[0, :, 0:6, 4:11])
    assert torch.equal(out[1], padded[1, :, 2:8, 1:8])
    assert torch.equal(shift_crop(x, 2, torch.tensor([[2, 2], [2, 2]]), mode=mode), x)  # centre = no shift


def test_small_rotations_keep_shape_and_range_and_match_torchvision():
    x = batch(n=64)
    out = BatchAugment(AugmentConfig(rotation=10.0), (3, 16, 16))(x, gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)
    # the operation itself: torchvision's bilinear rotate, on a square and an oblong image
    for shape in [(1, 3, 16, 16), (1, 3, 12, 20)]:
        img = torch.rand(shape, generator=gen(1))
        for angle in [7.0, -10.0, 90.0]:
            ref = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR)
            torch.testing.assert_close(affine(img, angle=torch.tensor([angle])), ref, atol=1e-5, rtol=0)


def test_resized_crop_matches_torchvision_inside_the_crop():
    img = torch.rand(1, 3, 32, 32, generator=gen(2))
    # the crop rows 8..24, columns 4..28 as fractions of the image and a centre in [-1, 1]
    out = affine(img, crop_size=(torch.tensor([24 / 32]), torch.tensor([16 / 32])), centre=torch.tensor([[0.0, 0.0]]))
    ref = TF.resized_crop(img, 8, 4, 16, 24, [32, 32], interpolation=InterpolationMode.BILINEAR, antialias=False)
    # torchvision repeats the crop's own edge pixels at its border; this reads the image around it
    torch.testing.assert_close(out[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-5, rtol=0)
    aug = BatchAugment(AugmentConfig(resized_crop=[0.5, 0.9]), (3, 32, 32))
    many = aug(img.expand(16, 3, 32, 32), gen(0))
    assert many.shape == (16, 3, 32, 32) and not torch.equal(many[0], many[1])


def test_color_jitter_matches_torchvision_per_image():
    x = batch(n=3)
    b, c, s = torch.tensor([0.7, 1.3, 1.0]), torch.tensor([1.2, 0.6, 1.0]), torch.tensor([0.5, 1.4, 1.0])
    out = color_jitter(x, b, c, s)
    for i in range(3):
        ref = TF.adjust_brightness(x[i], float(b[i]))
        ref = TF.adjust_saturation(TF.adjust_contrast(ref, float(c[i])), float(s[i]))
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2], x[2])  # factors of 1 change nothing


def test_color_jitter_is_refused_on_one_channel_data():
    with pytest.raises(ConfigError, match=r"data.augment.color_jitter = 0.3 needs RGB images.*has 1 channel.*=0"):
        BatchAugment(AugmentConfig(color_jitter=0.3), (1, 28, 28))
    BatchAugment(AugmentConfig(hflip=True, crop_padding=2), (1, 28, 28))  # the rest is fine on grey data


def test_padding_must_be_smaller_than_the_image():
    with pytest.raises(ConfigError, match=r"data.augment.crop_padding = 8 must be smaller than the image \(8 x 8\)"):
        BatchAugment(AugmentConfig(crop_padding=8), (1, 8, 8))


def test_everything_off_is_not_enabled_and_returns_the_input():
    cfg = AugmentConfig()
    assert not cfg.enabled and DataConfig().augment == cfg
    x, g = batch(), gen(0)
    state = g.get_state()
    aug = BatchAugment(cfg, (3, 16, 16))
    assert not aug.enabled and aug(x, g) is x
    assert torch.equal(g.get_state(), state)  # nothing drawn
    for on in [
        {"crop_padding": 1},
        {"hflip": True},
        {"resized_crop": [0.5, 1.0]},
        {"rotation": 5.0},
        {"color_jitter": 0.1},
    ]:
        assert AugmentConfig(**on).enabled


@pytest.mark.parametrize("fill", ["rand", "ones", "zeros"])
def test_output_stays_in_unit_range(fill):
    x = {"rand": batch(n=32), "ones": torch.ones(32, 3, 16, 16), "zeros": torch.zeros(32, 3, 16, 16)}[fill]
    cfg = AugmentConfig(**{**vars(ALL_ON), "crop_padding_mode": "reflect", "color_jitter": 1.0})
    out = BatchAugment(cfg, (3, 16, 16))(x, gen(3))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert out.shape == x.shape and out.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_device_of_the_images(device):
    x = batch().to(device)
    out = BatchAugment(ALL_ON, (3, 16, 16))(x, gen(0))
    assert out.device == x.device
    assert torch.equal(out, BatchAugment(ALL_ON, (3, 16, 16))(x, gen(0)))


def test_a_batch_of_another_shape_is_a_bug():
    with pytest.raises(ValueError, match=r"built for images of shape \(3, 16, 16\)"):
        BatchAugment(ALL_ON, (3, 16, 16))(batch(h=8, w=8), gen(0))


def test_config_from_overrides_is_typed():
    cfg = load_config(None, ["data.augment.hflip=true", "data.augment.crop_padding=4"])
    assert cfg.data.augment == AugmentConfig(crop_padding=4, hflip=True)
    assert cfg.data.augment.enabled
    cfg = load_config(None, ["data.augment={resized_crop: [0.8, 1], rotation: 10, crop_padding_mode: reflect}"])
    assert cfg.data.augment.resized_crop == [0.8, 1.0] and cfg.data.augment.rotation == 10.0
    assert not load_config(None).data.augment.enabled


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("data.augment.crop_padding=-1", r"^data.augment: crop_padding must be >= 0 pixels \(0 = off\), got -1$"),
        ("data.augment.resized_crop=[0.9, 0.5]", r"data.augment: resized_crop must be \[min, max\]"),
        ("data.augment.resized_crop=[0.5]", r"data.augment: resized_crop must be \[min, max\]"),
        ("data.augment.rotation=-5", r"data.augment: rotation must be in \[0, 180\]"),
        ("data.augment.color_jitter=2", r"data.augment: color_jitter must be in \[0, 1\]"),
        ("data.augment.crop_padding_mode=wrap", r"data.augment.crop_padding_mode: 'wrap' is not allowed"),
        ("data.augment.flip=true", r"unknown key 'data.augment.flip'; allowed keys here: crop_padding"),
    ],
)
def test_bad_values_are_one_clear_config_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])
