"""``xkd explain`` on a user's own images: image decoding, the run's explainers (UniCAM too), and the
errors of a wrong input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xkd.cli import main
from xkd.errors import ConfigError, ImageInputError
from xkd.explain import UniCAM
from xkd.files import read_json
from xkd.pipeline import load_run_models
from xkd.user_images import explain_images, image_channels, load_image


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
    with pytest.raises(ImageInputError, match=r"image '.*missing\.png' does not exist"):  # paths as strings too
        explain_images(str(nowhere), [str(folder / "a.png"), str(tmp_path / "missing.png")])


PAIR_RUN = [
    "students=[{name: scratch, distiller: scratch}, {name: kd, distiller: hinton_kd}]",
    "evaluation.metrics=[fidelity]",
    "evaluation.explainers=[{name: grad_cam}, {name: unicam, label: unicam_distilled, params: {kind: distilled}},"
    " {name: unicam, label: unicam_kd, params: {kind: kd_given_base}}]",
]


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, make_tiny_args):
    """A finished tiny run (a scratch and a KD student) that explained with two UniCAM kinds."""
    tmp = tmp_path_factory.mktemp("pair_run")
    args = ["run", "--no-progress"]
    for o in make_tiny_args(tmp, *PAIR_RUN):
        args += ["--set", o]
    assert main(args) == 0
    return tmp / "runs" / "tiny"


def _images(folder, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray((np.random.default_rng(i).random((20, 20)) * 255).astype("uint8"), "L").save(p)
        paths.append(str(p))
    return paths


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:unicam. all images of a batch have the same class")
def test_unicam_explains_the_students_with_the_runs_teacher_by_the_runs_labels(pair_run, tmp_path, capsys):
    images = _images(tmp_path, 4)
    out = tmp_path / "distilled"
    argv = ["explain", "--run", str(pair_run), "--images", *images, "--out", str(out)]
    assert main([*argv, "--explainer", "unicam_distilled"]) == 0
    rec = read_json(out / "explanations.json")
    assert rec["explainer"] == "unicam_distilled" and rec["explained"] == ["scratch", "kd"]
    saved = load_file(str(out / "maps.safetensors"))
    assert "maps/teacher" not in saved  # a pair explainer explains students only, as the run does
    _, models, record = load_run_models(pair_run)
    c, h, w = record["dataset"]["image_shape"]
    x = torch.stack([load_image(Path(p), c, (h, w)) for p in images])
    with torch.no_grad():
        targets = models["teacher"](x).argmax(1)
    with UniCAM(models["kd"], {"kind": "distilled"}, teacher=models["teacher"]) as uc:
        torch.testing.assert_close(saved["maps/kd"], uc.explain(x, targets).maps)
    assert saved["maps/kd"].abs().sum() > 0
    # the KD-vs-base kind takes the run's scratch student as the base; the scratch student has none
    assert main([*argv[:-1], str(tmp_path / "kd"), "--explainer", "unicam_kd"]) == 0
    assert read_json(tmp_path / "kd/explanations.json")["explained"] == ["kd"]
    assert main([*argv[:-1], str(tmp_path / "plain"), "--explainer", "unicam"]) == 0  # the registered name
    assert main([*argv[:-1], str(tmp_path / "cam"), "--explainer", "grad_cam"]) == 0  # one model at a time: all
    assert read_json(tmp_path / "cam/explanations.json")["explained"] == ["teacher", "scratch", "kd"]
    capsys.readouterr()
    assert main(["explain", "--run", str(pair_run), "--images", *images[:2], "--explainer", "unicam"]) == 2
    assert "unicam_distilled needs at least 4 images, got 2" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unknown_explainer_lists_the_runs_explainers_and_the_registered_ones(pair_run, tmp_path, capsys):
    images = _images(tmp_path, 1)
    assert main(["explain", "--run", str(pair_run), "--images", *images, "--explainer", "unicam_residual"]) == 2
    err = capsys.readouterr().err
    assert "unknown explainer 'unicam_residual'; pass one of this run's explainers (grad_cam, unicam_distilled," in err
    assert "or a registered explainer (deep_shap," in err and "\n" not in err.strip()
    # an explainer that applies to none of the models says why, as the explainer does
    assert main(["explain", "--run", str(pair_run), "--images", *images, "--explainer", "medtex_theta"]) == 2
    assert "only students trained with the distillers 'medtex' or 'medex' have it" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kind", "runs", "said"),
    [
        (
            "comparison",
            "seeds/seed_{}",
            "a comparison (`xkd compare`), not a run: pass one of its seeds/seed_N folders",
        ),
        (
            "study",
            "teachers/t8/seeds/seed_{}",
            "a study (`xkd study`), not a run: pass one of its seeds/seed_N folders",
        ),
        ("sweep", "trial-000{}", "a sweep (`xkd sweep`), not a run: pass one of its trial-NNNN folders"),
    ],
)
def test_a_comparison_study_or_sweep_names_one_of_its_runs(tmp_path, finished_run, kind, runs, said):
    image = _gray_palette_png(tmp_path / "a.png", np.zeros((8, 8)))
    folder = tmp_path / kind
    for i in range(2):
        run = folder / runs.format(i)
        (run / "records").mkdir(parents=True)
        (run / "config.yaml").write_text("name: tiny\n")
    finished = finished_run(folder / runs.format(1)).path  # the first finished run is the example
    (folder / "config.yaml").write_text("name: tiny\n")
    with pytest.raises(ConfigError, match=re.escape(f"{folder} is {said}, e.g. --run {finished}")):
        explain_images(folder, [image])


def test_a_folder_that_is_not_a_finished_run_says_what_it_is(tmp_path):
    # every case said "run `xkd run` first", also for a folder xkd never wrote
    with pytest.raises(ConfigError, match=r"nope does not exist: pass the folder of a finished run"):
        load_run_models(tmp_path / "nope")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"mine is not a folder xkd wrote"):
        load_run_models(tmp_path / "mine")
    with pytest.raises(ConfigError, match=r"notes.txt is a file, not a folder"):  # was a NotADirectoryError
        load_run_models(tmp_path / "mine" / "notes.txt")
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "config.yaml").write_text("name: stopped\n")
    with pytest.raises(ConfigError, match=r"run.json is missing \(finish it with `xkd run --resume`\)"):
        load_run_models(tmp_path / "stopped")
