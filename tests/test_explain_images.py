"""``xkd explain`` on a user's own images: image decoding, and the errors of a wrong input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xkd.errors import ImageInputError
from xkd.explain_images import explain_images, image_channels, load_image


def _gray_palette_png(path, values: np.ndarray):
    Image.fromarray(values.astype("uint8"), "L").convert("P").save(path)
    return path


def test_palette_images_count_channels_by_their_palette(tmp_path):
    values = np.arange(64).reshape(8, 8) * 3
    gray = _gray_palette_png(tmp_path / "gray.png", values)
    with Image.open(gray) as im:
        assert im.mode == "P" and image_channels(im) == 1
    x = load_image(gray, 1, (8, 8))  # read through its palette: the gray levels, not the indices
    assert x.shape == (1, 8, 8)
    np.testing.assert_allclose(x[0].numpy() * 255, values, atol=1e-3)

    colour = tmp_path / "colour.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(colour)
    with Image.open(colour) as im:
        assert im.mode == "P" and image_channels(im) == 3
    assert load_image(colour, 3, (8, 8))[:, 0, 0].mul(255).round().tolist() == [200, 10, 10]
    with pytest.raises(
        ImageInputError, match=r"has 3 channel\(s\) \(mode P, a colour palette\).*convert it to grayscale"
    ):
        load_image(colour, 1, (8, 8))
    gray_on_rgb = r"has 1 channel\(s\) \(mode P, a gray palette\).*convert it to RGB"
    with pytest.raises(ImageInputError, match=gray_on_rgb):
        load_image(gray, 3, (8, 8))


def test_a_folder_or_a_missing_file_is_one_clear_error_before_the_run_is_read(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _gray_palette_png(folder / "a.png", np.zeros((8, 8)))
    nowhere = tmp_path / "no_run"  # not read: the images are checked first
    with pytest.raises(ImageInputError, match=r"'.*imgs' is a folder; pass image files, e.g. --images .*imgs/\*\.png"):
        explain_images(nowhere, [folder])
    with pytest.raises(ImageInputError, match=r"image '.*missing\.png' does not exist"):
        explain_images(nowhere, [folder / "a.png", tmp_path / "missing.png"])
