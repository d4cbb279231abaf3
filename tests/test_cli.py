"""End to end through the CLI on a tiny config: run, report, explain, list, resume, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xkd.cli import main
from xkd.files import read_json
from xkd.pipeline import load_run_models


def cli(*argv: str, overrides: list[str] = ()) -> int:
    args = list(argv)
    for o in overrides:
        args += ["--set", o]
    return main(args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, make_tiny_args):
    tmp = tmp_path_factory.mktemp("e2e")
    assert cli("run", "--no-progress", overrides=make_tiny_args(tmp)) == 0
    return tmp / "runs" / "tiny"


@pytest.mark.slow
def test_run_writes_the_run_directory(run_dir):
    for rel in [
        "config.yaml",
        "metrics.json",
        "report.html",
        "records/run.json",
        "records/models.json",
        "records/explanations.json",
        "records/samples.json",
        "records/samples.safetensors",
        "checkpoints/teacher/best.pt",
        "checkpoints/kd/best.pt",
        "checkpoints/kd/last.pt",
    ]:
        assert (run_dir / rel).is_file(), rel
    assert any((run_dir / "figures").glob("*.png"))
    run = read_json(run_dir / "records/run.json")
    assert run["seed"] == 0 and "torch" in run["versions"]
    models = read_json(run_dir / "records/models.json")
    assert models["roles"] == ["teacher", "scratch", "kd", "ls"]
    assert models["models"]["kd"]["distiller_params"] == {"alpha": 0.7, "temperature": 5.0, "standardize": False}
    assert 0.0 <= models["models"]["kd"]["test"]["accuracy"] <= 1.0
    assert set(models["models"]["teacher"]["met"]) == {"grad_cam", "feature_maps"}


@pytest.mark.slow
def test_every_summary_number_is_copied_from_a_record(run_dir):
    summary = read_json(run_dir / "metrics.json")["models"]
    models = read_json(run_dir / "records/models.json")["models"]
    expl = read_json(run_dir / "records/explanations.json")
    for role, s in summary.items():
        assert s["accuracy"] == models[role]["test"]["accuracy"]
        assert s["params"] == models[role]["params"]
        assert s["fidelity"]["grad_cam"] == expl["per_model"][role]["grad_cam"]["fidelity"]["mean"]
    html = (run_dir / "report.html").read_text()
    assert f"{models['teacher']['params']:,}" in html


@pytest.mark.slow
def test_same_seed_gives_the_same_metrics(run_dir, tmp_path, make_tiny_args):
    assert cli("run", "--no-progress", overrides=make_tiny_args(tmp_path)) == 0
    a = read_json(run_dir / "records/explanations.json")
    b = read_json(tmp_path / "runs/tiny/records/explanations.json")
    assert a["per_model"] == b["per_model"] and a["agreement"] == b["agreement"]
    ma = read_json(run_dir / "records/models.json")["models"]
    mb = read_json(tmp_path / "runs/tiny/records/models.json")["models"]
    for role in ma:
        assert ma[role]["test"] == mb[role]["test"], role


@pytest.mark.slow
def test_report_rerenders_from_records(run_dir):
    (run_dir / "report.html").unlink()
    assert cli("report", str(run_dir)) == 0
    assert (run_dir / "report.html").is_file()


@pytest.mark.slow
def test_existing_run_needs_resume_or_overwrite_and_resume_reuses_checkpoints(
    run_dir, capsys, make_tiny_args, monkeypatch
):
    out_dir = run_dir.parents[1]
    assert cli("run", "--no-progress", overrides=make_tiny_args(out_dir)) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    before = (run_dir / "checkpoints/kd/last.pt").read_bytes()
    # a finished run with the same config is neither trained nor explained again: its report is re-rendered
    monkeypatch.setattr("xkd.pipeline.evaluate_run", lambda *a, **k: pytest.fail("explained and scored again"))
    (run_dir / "report.html").unlink()
    assert cli("run", "--no-progress", "--resume", overrides=make_tiny_args(out_dir)) == 0
    assert (run_dir / "checkpoints/kd/last.pt").read_bytes() == before  # nothing retrained
    assert (run_dir / "report.html").is_file()


@pytest.mark.slow
def test_teacher_is_loaded_from_the_cache_keyed_by_its_config(run_dir, make_tiny_args, capsys):
    out_dir = run_dir.parents[1]
    assert cli("run", "--no-progress", overrides=make_tiny_args(out_dir, "name=again", "students=[{name: kd}]")) == 0
    models = read_json(out_dir / "runs/again/records/models.json")["models"]
    assert models["teacher"]["train"]["from_cache"] is True
    # --no-progress hides the bars, not the lines (it printed nothing but warnings, not even the report's path)
    err = capsys.readouterr().err
    for line in ("xkd run 'again'", "kd epoch 1/1: loss", "explaining kd with grad_cam", "report: "):
        assert line in err, line


@pytest.mark.slow
def test_explain_user_images(run_dir, tmp_path, capsys):
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray((np.random.default_rng(i).random((20, 20)) * 255).astype("uint8"), "L").save(p)
        paths.append(str(p))
    assert cli("explain", "--run", str(run_dir), "--images", *paths, "--out", str(tmp_path / "out")) == 0
    assert (tmp_path / "out/explanations.png").is_file()
    rec = read_json(tmp_path / "out/explanations.json")
    assert set(rec["predictions"]) == {"teacher", "scratch", "kd", "ls"} and len(rec["target"]) == 2


@pytest.mark.slow
def test_explain_runs_the_models_where_asked(run_dir, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((20, 20)) * 255).astype("uint8"), "L").save(image)
    args = ("explain", "--run", str(run_dir), "--images", str(image))
    assert cli(*args, "--device", "cpu", "--out", str(tmp_path / "cpu")) == 0
    _, models, _ = load_run_models(run_dir, "meta")  # any device: the models follow
    assert all(p.device.type == "meta" for m in models.values() for p in m.parameters())
    if not torch.cuda.is_available():
        assert cli(*args, "--device", "cuda") == 2
        assert "--device cuda: no GPU is available here; use --device auto or --device cpu" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_explain_on_the_gpu_gives_the_cpu_maps(run_dir, tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((20, 20)) * 255).astype("uint8"), "L").save(image)
    maps = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert cli("explain", "--run", str(run_dir), "--images", str(image), "--device", device, "--out", str(out)) == 0
        maps[device] = load_file(str(out / "maps.safetensors"))
    for key, cpu in maps["cpu"].items():
        torch.testing.assert_close(maps["cuda"][key], cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_explain_rejects_wrong_channels_and_unreadable_files(run_dir, tmp_path, capsys):
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (16, 16), (10, 200, 30)).save(rgb)
    assert cli("explain", "--run", str(run_dir), "--images", str(rgb)) == 2
    assert (
        "has 3 channel(s) (mode RGB) but the run's models take 1-channel images; convert it to grayscale"
        in capsys.readouterr().err
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert cli("explain", "--run", str(run_dir), "--images", str(broken)) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_list_prints_every_registry(capsys):
    assert cli("list") == 0
    out = capsys.readouterr().out
    for kind in ["datasets:", "models:", "distillers:", "explainers:", "metrics:"]:
        assert kind in out
    from xkd.registry import ALL_REGISTRIES

    lines = out.splitlines()
    for reg in ALL_REGISTRIES.values():
        for name in reg.names():  # every registered name on a line of its own
            assert any(line.split()[:1] == [name] for line in lines), name
    for name in ["grad_cam_pp", "kernel_shap", "lime", "unicam", "occlusion", "deep_shap", "road", "fss", "rs"]:
        assert any(line.split()[:1] == [name] for line in lines), name
    road = next(line for line in lines if line.split()[:1] == ["road"])
    assert "faithfulness" in road and "higher is better" in road and "needs: model, images, maps" in road
    assert "grad_cam+superpixel" in out


def test_bad_config_key_is_one_clear_error(capsys):
    assert cli("run", overrides=["train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.epoch'" in err and "Traceback" not in err


def test_resume_into_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path, make_tiny_args, capsys):
    # --resume exited 0 and trained a new run beside the user's file.txt
    folder = tmp_path / "runs" / "notrun"
    folder.mkdir(parents=True)
    (folder / "file.txt").write_text("hi")
    assert cli("run", "--no-progress", "--resume", overrides=make_tiny_args(tmp_path, "name=notrun")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xkd: error: --resume: {folder} is not empty and is not an xkd run") and err.count("\n") == 1
    assert "nothing to resume; choose another name (--set name=NEW) or remove the folder" in err
    assert [p.name for p in folder.iterdir()] == ["file.txt"]


@pytest.mark.slow
def test_lesions_run_fills_every_explanation_record(tmp_path, make_tiny_args):
    args = make_tiny_args(
        tmp_path,
        "name=les",
        "data.name=lesions",
        "data.image_size=null",
        "data.params={num_per_class: 40, size: 32}",
        "students=[{name: kd}]",
        "evaluation.explainers=[{name: grad_cam}, {name: kernel_shap, params: {n_samples: 32}},"
        " {name: grad_cam+superpixel}, {name: unicam, params: {kind: residual}}]",
        "evaluation.metric_params={road: {percentages: [0.2, 0.6]}}",
        "evaluation.metrics=[fidelity, deletion_auc, insertion_auc, road, pointing_game, top_k_iou, top_k_dice,"
        " mask_mass, map_pearson, rank_correlation, top_k_agreement, superpixel_mse, superpixel_sign_agreement,"
        " fss, rs, randomisation_sanity, data_randomisation_sanity, met]",
    )
    assert cli("run", "--no-progress", overrides=args) == 0
    expl = read_json(tmp_path / "runs/les/records/explanations.json")
    assert expl["explainers"] == ["grad_cam", "kernel_shap", "grad_cam+superpixel", "unicam"]
    for role in ("teacher", "kd"):
        for ex in ("grad_cam", "kernel_shap", "grad_cam+superpixel"):
            entry = expl["per_model"][role][ex]
            assert 0.0 <= entry["pointing_game"] <= 1.0
            assert len(entry["top_k"]) == 6 and all(
                0.0 <= v["iou"] <= v["dice"] <= 1.0 for v in entry["top_k"].values()
            )
            assert entry["top_k_iou"] == pytest.approx(sum(v["iou"] for v in entry["top_k"].values()) / 6)
            assert 0.0 <= entry["mask_mass"] <= 1.0
            assert entry["road"]["percentages"] == [0.2, 0.6] and -1.0 <= entry["road"]["road"] <= 1.0
            assert entry["sanity"]["verdict"] in ("PASS", "FAIL")
            assert 0.0 <= entry["fidelity"]["mean"] <= 1.0
    assert "unicam" not in expl["per_model"]["teacher"] and "unicam" in expl["per_model"]["kd"]
    label = expl["per_model"]["kd"]["grad_cam"]["label_sanity"]  # kd vs the same CNN trained on permuted labels
    assert label["verdict"] in ("PASS", "FAIL") and -1.0 <= label["rank_correlation"] <= 1.0
    assert "label_sanity" not in expl["per_model"]["teacher"]["grad_cam"]  # another architecture
    assert (tmp_path / "runs/les/checkpoints/random_labels/last.pt").is_file()
    agree = expl["agreement"]["kd"]["kernel_shap"]
    assert set(agree) >= {"map_pearson", "rank_correlation", "top_k_agreement", "superpixel_mse"}
    assert -1.0 <= agree["rank_correlation"] <= 1.0 and agree["superpixel_mse"] >= 0.0
    assert 0.0 <= expl["transfer"]["kd"]["fss"] <= 1.0 + 1e-9
    models = read_json(tmp_path / "runs/les/records/models.json")["models"]
    assert set(models["kd"]["met"]) == {"grad_cam", "kernel_shap", "grad_cam+superpixel", "unicam"}
    html = (tmp_path / "runs/les/report.html").read_text()
    for heading in (
        "Localisation per K",
        "KernelSHAP",
        "Grad-CAM (superpixels)",
        "UniCAM",
        "Feature transfer",
        "labels randomised",
    ):
        assert heading in html, heading


def test_sweep_is_a_command_with_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--trials", "--storage", "--study", "--timeout", "--resume", "--set", "--no-progress"):
        assert flag in out, flag


def test_sweep_without_searched_settings_is_one_clear_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"name: nothing\noutput_dir: {tmp_path / 'runs'}\n")
    assert cli("sweep", "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert "sweep.params: nothing to search" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_library_warning_is_a_log_line_without_a_source_path(caplog, capsys):
    # UniCAM's one-class batch warning came out as "…/scoring.py:60: UserWarning: …"
    assert cli("list") == 0
    with caplog.at_level("WARNING", logger="xkd"):
        warnings.warn("all images of a batch have the same class", UserWarning, stacklevel=1)
    assert [r.getMessage() for r in caplog.records] == ["all images of a batch have the same class"]
    assert "test_cli.py" not in capsys.readouterr().err


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, make_tiny_args):
    """`timeout`, `kill` or a scheduler's SIGTERM ended the process mid-write, leaving an MLflow run
    RUNNING; now it unwinds as an interrupt: the last checkpoint is kept, and the exit code is 143."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    args = make_tiny_args(tmp_path, "teacher.train.epochs=200")
    cli = Path(sys.executable).parent / "xkd"
    cmd = [str(cli), "run", "--no-progress", *(a for o in args for a in ("--set", o))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        for line in proc.stderr:  # epoch 1 is checkpointed once epoch 2 has printed its line
            if "teacher epoch 2/200" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert "xkd: interrupted; rerun with --resume to continue from the last checkpoint" in rest
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "teacher" / "last.pt").is_file()
