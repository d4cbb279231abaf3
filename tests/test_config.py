"""Config: YAML -> dataclasses, overrides, and errors that name the key and the allowed values."""

from __future__ import annotations

import pytest
import yaml

from xkd.config import ConfigError, RunConfig
from xkd.config_files import apply_override
from xkd.plan import load_config
from xkd.schema import to_dict


def write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = load_config(None)
    again = load_config(write(tmp_path, to_dict(cfg)))
    assert again == cfg
    assert [s.distiller for s in cfg.students] == ["scratch", "hinton_kd", "label_smoothing"]


def test_overrides_reach_nested_keys_and_list_items():
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "students.1.params.alpha=0.4",
            "data.image_size=32",
            "evaluation.explainers=[{name: grad_cam}]",
        ],
    )
    assert cfg.train.epochs == 3
    assert cfg.students[1].params == {"alpha": 0.4}
    assert cfg.data.image_size == 32
    assert [e.name for e in cfg.evaluation.explainers] == ["grad_cam"]


def test_superpixel_form_and_labels_are_accepted():
    cfg = load_config(
        None,
        [
            "evaluation.explainers=[{name: grad_cam+superpixel, params: {layer: null, superpixel: {n_segments: 8}}},"
            " {name: grad_cam, label: gc2, params: {relu: false}}]",
        ],
    )
    assert [e.key for e in cfg.evaluation.explainers] == ["grad_cam+superpixel", "gc2"]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["data.sise=3"], r"unknown key 'data.sise'; allowed keys here: name, root, image_size"),
        (["train.epochs=two"], r"train.epochs: expected an integer, got 'two'"),
        (
            ["train.optimizer.name=rmsprop"],
            r"train.optimizer.name: 'rmsprop' is not allowed; allowed values: 'adam', 'adamw', 'sgd'",
        ),
        (
            ["data.name=cifar10"],
            r"data.name: unknown dataset 'cifar10'; registered: concepts, digits, fashion-mnist, imagefolder, lesions, mnist5k",
        ),
        (
            ["students.0.distiller=fitnet"],
            r"students\[0\].distiller: unknown distiller 'fitnet'; registered: ab, at, cat_kd, crd, dist, dkd, e2kd, fitnets, hinton_kd",
        ),
        (["students.1.params.temperature=-1"], r"students\[1\].params: temperature must be > 0"),
        (["evaluation.explainers=[{name: lyme}]"], r"unknown explainer 'lyme'; registered: deep_shap, feature_maps"),
        (["evaluation.explainers=[{name: grad_cam+superpixel, params: {superpixel: {n_segments: 0}}}]"], r"n_segments"),
        (["evaluation.explainers=[{name: grad_cam}, {name: grad_cam}]"], r"listed twice; give each entry a distinct"),
        (["evaluation.metrics=[accuracy, roadd]"], r"evaluation.metrics\[1\]: unknown metric 'roadd'"),
        (["evaluation.metric_params={road: {stepz: 3}}"], r"metric_params.road.stepz: unknown argument"),
        # a metric argument's value against its annotation: these failed inside the metric, after training
        (["evaluation.metric_params={road: {percentages: x}}"], r"metric_params.road.percentages: expected a list"),
        (["evaluation.metric_params={road: {noise: cheap}}"], r"metric_params.road.noise: expected a number"),
        (
            ["evaluation.metric_params={road: {neighbours: 6}}"],
            r"road.neighbours: 6 is not allowed; allowed values: 4, 8",
        ),
        # and against its range, and the arguments the run passes itself: these too failed after training
        (
            ["evaluation.metric_params={road: {percentages: [1.5, -2]}}"],
            r"metric_params.road: ROAD percentages must lie in \[0, 1\)",
        ),
        (["evaluation.metric_params={deletion_auc: {steps: 0}}"], r"metric_params.deletion_auc: steps must be >= 1"),
        (["evaluation.metric_params={randomisation_sanity: {max_steps: 0}}"], r"max_steps must be >= 1 or None, got 0"),
        (["evaluation.metric_params={region_precision: {fraction: 2}}"], r"fraction must be in \(0, 1\], got 2"),
        (["evaluation.metric_params={met: {repeats: 0}}"], r"metric_params.met: repeats must be >= 1"),
        (["evaluation.metric_params={superpixel_sign_agreement: {k: 0}}"], r"k must be >= 1, got 0"),
        (["evaluation.metric_params={road: {tol: 0}}"], r"the solver needs tol > 0"),
        (
            ["evaluation.metric_params={road: {model: 3}}"],
            r"road.model: the run passes it \(the explained model\); arguments you may set: percentages, noise,",
        ),
        (
            ["evaluation.metric_params={fidelity: {keep: 5}}"],
            r"fidelity.keep: the run passes it \(evaluation.fidelity_keep\); arguments you may set: baseline, tie_seed$",
        ),
        (["evaluation.transfer_layers={teacherr: x}"], r"unknown key; allowed keys: teacher, student"),
        (["evaluation.sanity_images=-1"], r"sanity_images must be >= 0"),
        (["teacher.model.name=vgg"], r"teacher.model.name: unknown model 'vgg'; registered: cifar_resnet"),
        (["students.5.name=x"], r"index '5' is not one of 0..2"),
        (["train.epochs=0"], r"train.epochs must be >= 1"),
        (["students=[]"], r"at least one student"),
        (["students.1.name=scratch"], r"names must be unique"),
        # a name is a folder of the run: "../x" wrote checkpoints outside output_dir
        (["students.1.name=../../escaped"], r"students\[1\].name '\.\./\.\./escaped'.*may not .* start with '\.'"),
        (["students.0.name=a/b"], r"students\[0\].name 'a/b'.*contain '/'"),
        (["students.0.name=''"], r"students\[0\].name ''.*may not be empty"),
        # 0 trained every student on nothing; a step scheduler with step_size 0 failed after the teacher
        (["train.max_steps_per_epoch=0"], r"train.max_steps_per_epoch must be >= 1 or null, got 0"),
        (["teacher.train.scheduler={name: step, step_size: 0}"], r"teacher.train.scheduler: step needs step_size >= 1"),
        (["train.scheduler={name: step, gamma: -1}"], r"train.scheduler: step needs .* gamma > 0.*gamma -1"),
        # a missing teacher checkpoint trained a teacher from scratch, and config.yaml named the file
        (["teacher.checkpoint=/no/such/teacher.pt"], r"teacher.checkpoint: '/no/such/teacher.pt' is not a file"),
        (["train.batch_size=true"], r"expected an integer, got True"),
        (["train.epochs"], r"must look like key.path=value"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_off_is_a_string_and_only_true_false_are_booleans(tmp_path):
    # YAML 1.1 read `amp: off` as False, which train.amp refused: the documented value failed
    cfg = load_config(write(tmp_path, {"train": {"tensorboard": False}}), ["train.amp=off", "teacher.train.amp=off"])
    assert (cfg.train.amp, cfg.teacher.train.amp, cfg.train.tensorboard) == ("off", "off", False)
    f = tmp_path / "amp.yaml"
    f.write_text("train:\n  amp: off\n  compile: true\n")
    assert (load_config(f).train.amp, load_config(f).train.compile) == ("off", True)
    with pytest.raises(ConfigError, match=r"train.tensorboard: expected true or false, got 'yes'"):
        load_config(None, ["train.tensorboard=yes"])


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: a\ntrain:\n  epochs: 2\nname: b\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: 'name' is given twice in one mapping; keep one"):
        load_config(twice)
    with pytest.raises(ConfigError, match=r"override 'train=\{epochs: 1, epochs: 2\}': the value is not valid YAML: "):
        load_config(None, ["train={epochs: 1, epochs: 2}"])
    with pytest.raises(ConfigError, match=r"override 'train=\[1,': the value is not valid YAML"):  # was a traceback
        load_config(None, ["train=[1,"])
    merged = tmp_path / "merged.yaml"  # a merge key's values may be overridden: not a key given twice
    merged.write_text("teacher:\n  train: &b {epochs: 2, batch_size: 8}\ntrain:\n  <<: *b\n  epochs: 3\n")
    cfg = load_config(merged)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.teacher.train.epochs) == (3, 8, 2)


def test_a_partial_file_takes_defaults_for_the_rest(tmp_path):
    cfg = load_config(write(tmp_path, {"name": "x", "train": {"epochs": 2}}))
    assert cfg.name == "x" and cfg.train.epochs == 2 and cfg.train.batch_size == RunConfig().train.batch_size


def test_apply_override_parses_yaml_values():
    raw: dict = {}
    apply_override(raw, "a.b=1.5")
    apply_override(raw, "a.c=[1, 2]")
    apply_override(raw, "a.d=null")
    assert raw == {"a": {"b": 1.5, "c": [1, 2], "d": None}}


def test_shipped_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert {"default.yaml", "lesions.yaml"} <= {f.name for f in files}
    for f in files:
        load_config(f)


def test_study_only_metric_is_not_accepted_by_a_run():
    with pytest.raises(ConfigError, match="'concept_detectors' is not computed by a run: a study computes it"):
        load_config(None, ["evaluation.metrics=[fidelity, concept_detectors]"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("study.distiller=fitnet", r"study.distiller: unknown distiller 'fitnet'; registered: ab, at"),
        ("study.teachers=[{name: vgg}]", r"study.teachers\[0\].name: unknown model 'vgg'"),
        ("study.diffroar.fractions=[0.0]", "fractions must be a non-empty list of values in"),
        ("study.quantile=1.5", "quantile must be in"),
        ("study.explainer=lyme", "study.explainer: unknown explainer 'lyme'"),
    ],
)
def test_study_section_is_validated(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unicam_needs_four_images_per_call_checked_before_training(tmp_path):
    base = [f"output_dir={tmp_path}", "evaluation.explainers=[{name: grad_cam}, {name: unicam}]"]
    with pytest.raises(ConfigError, match=r"evaluation.met_images = 2, but unicam explains at least 4 images"):
        load_config(None, [*base, "evaluation.met_images=2"])
    with pytest.raises(ConfigError, match=r"evaluation.sanity_images = 3.*\(or 0 to skip the check\)"):
        load_config(None, [*base, "evaluation.sanity_images=3"])
    load_config(None, [*base, "evaluation.sanity_images=0", "evaluation.samples_per_class=1"])  # samples are padded
    load_config(None, [f"output_dir={tmp_path}", "evaluation.met_images=1"])  # grad_cam alone: one image is fine


def test_floats_in_scientific_notation_are_numbers():
    # YAML 1.1 reads 1e-3 as a string (a float needs a dot and a signed exponent there): `--set
    # train.optimizer.lr=1e-3` failed with "expected a number, got '1e-3'"
    cfg = load_config(None, ["train.optimizer.lr=1e-3", "train.optimizer.weight_decay=5E-4"])
    assert cfg.train.optimizer.lr == 0.001 and cfg.train.optimizer.weight_decay == 0.0005
    cfg = load_config(None, ["evaluation.metric_params={road: {tol: 1e-6, percentages: [.2, 5e-1]}}"])
    assert cfg.evaluation.metric_params["road"] == {"tol": 1e-6, "percentages": [0.2, 0.5]}
    assert load_config(None, ["name='1e3'"]).name == "1e3"  # quoted: still a string
