"""``xkd compare``: statistics and ranking by hand, then two seeds of the tiny run end to end."""

from __future__ import annotations

import importlib
import math

import pytest
import yaml

from xkd.cli import main
from xkd.comparison import _ranks, agreement_test_stats, agreement_value, rank, stat
from xkd.config import ConfigError
from xkd.engine.trainer import Trainer
from xkd.errors import RunExistsError
from xkd.files import read_json
from xkd.plan import load_config, validate_for_compare
from xkd.rundir import RunDir

C = importlib.import_module("xkd.comparison")

STUDENTS = "students=[{name: scratch, distiller: scratch}, {name: kd, distiller: hinton_kd}, {name: at, distiller: at}]"


def test_stat_is_the_mean_and_sample_std_of_the_finite_values():
    s = stat([0.5, 0.7, None, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["n"] == 3
    assert s["std"] == pytest.approx(math.sqrt(((0.2**2) * 2) / 2))  # n - 1 in the denominator: 0.2
    assert s["values"] == [0.5, 0.7, None, 0.9]
    one = stat([0.3])
    assert one["mean"] == 0.3 and one["std"] is None
    assert stat([None, float("nan")])["mean"] is None


def test_a_cell_from_fewer_seeds_says_so_and_headers_show_the_direction():
    # superpixel MSE with no image alike in one seed showed that seed's value as the 2-seed mean
    from xkd.report.compare import StatCol, _seconds_stat, stat_table

    table = stat_table(
        "c",
        [{"text": "kd"}],
        [
            StatCol("MSE", [stat([0.1589, None])], better="low"),
            StatCol("Acc.", [stat([0.5, 0.7])], better="high"),
            StatCol("Train time", [stat([2.0, 4.0])], _seconds_stat),
        ],
    )
    assert [h["text"] for h in table["head"]] == ["Method", "MSE ↓", "Acc. ↑", "Train time"]
    mse, acc, seconds = table["rows"][0][1:]
    assert (mse["text"], mse["sub"]) == ("0.1589", "1 of 2 seeds")
    assert (acc["text"], acc["sub"]) == ("0.6000 ± 0.1414", None)
    assert seconds["text"] == "3.0 s ± 1.4 s"  # was the mean alone


def test_ranks_share_ties_and_follow_the_direction():
    assert _ranks({"a": 0.9, "b": 0.8, "c": 0.9, "d": None}, higher=True) == {"a": 1.5, "b": 3.0, "c": 1.5, "d": None}
    assert _ranks({"a": 0.1, "b": 0.3}, higher=False) == {"a": 1.0, "b": 2.0}
    methods = {
        "x": {"accuracy": {"mean": 0.9}, "agree": {"mean": 0.1}},
        "y": {"accuracy": {"mean": 0.8}, "agree": {"mean": 0.5}},
        "z": {"accuracy": {"mean": 0.7}, "agree": {"mean": 0.4}},
    }
    r = rank(methods, [("accuracy", True), ("agree", True)])
    assert r["mean_rank"] == {"x": 2.0, "y": 1.5, "z": 2.5}
    assert r["order"] == ["y", "x", "z"]


def test_closer_to_teacher_is_aggregated_by_its_share_with_every_seeds_test():
    def seed(share, p, closer, n=20):
        e = {"share": share, "images": n, "closer": closer, "ties": 0, "farther": n - closer, "undefined": 0,
             "p_value": p, "distance": "cosine", "independent": "scratch"}  # fmt: skip
        return {"grad_cam": {"closer_to_teacher": e, "rank_correlation": 0.4}}

    agr = [seed(0.7, 0.115, 14), seed(0.8, 0.012, 16), {}]  # the third seed has no record
    assert agreement_value(agr[0], "grad_cam", "closer_to_teacher") == 0.7  # its first declared column
    assert agreement_value(agr[0], "grad_cam", "rank_correlation") == 0.4
    t = agreement_test_stats(agr, "grad_cam", "closer_to_teacher")
    assert t["share"]["mean"] == pytest.approx(0.75) and t["share"]["std"] == pytest.approx(math.sqrt(0.005))
    assert t["share"]["values"] == [0.7, 0.8, None]
    assert t["p_value"] == [0.115, 0.012, None] and t["closer"] == [14, 16, None] and t["images"] == [20, 20, None]
    assert t["independent"] == "scratch" and t["distance"] == "cosine"


def test_headline_metric_must_be_computed(tmp_path):
    cfg = load_config(None, ["evaluation.metrics=[fidelity]"])
    with pytest.raises(ConfigError, match="compare.agreement_metric 'rank_correlation' is not computed"):
        validate_for_compare(cfg)
    with pytest.raises(ConfigError, match="compare.seeds must be >= 1"):
        load_config(None, ["compare.seeds=0"])
    with pytest.raises(ConfigError, match="not among evaluation.explainers"):
        load_config(None, ["compare.agreement_explainer=lime"])


class _Started(Exception):
    """Raised by a stubbed seed run: the comparison got past its folder checks to its first seed."""


def _no_seed_runs(*a, **k):
    raise _Started


@pytest.mark.parametrize(
    "files, match",
    [
        (["file.txt"], r"is not empty and is not an xkd comparison \(it has no config.yaml.*remove the folder"),
        (
            ["config.yaml", "checkpoints/"],
            r"holds an xkd run, not a comparison.*remove the folder \(`xkd run --resume`",
        ),
        (["teachers/"], r"holds an xkd study, not a comparison.*remove the folder \(`xkd study --resume`"),
    ],
    ids=["files", "run", "study"],
)
def test_resume_of_a_folder_that_is_not_a_comparison_is_refused(
    tmp_path, make_tiny_args, make_folder, monkeypatch, files, match
):
    monkeypatch.setattr(C, "run", lambda *a, **k: pytest.fail("a seed ran"))
    cfg = load_config(None, make_tiny_args(tmp_path, STUDENTS))
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    make_folder(folder, files)
    before = sorted(folder.rglob("*"))
    with pytest.raises(RunExistsError, match=rf"^--resume: {folder} {match}"):
        C.compare(cfg, 2, resume=True, progress=False)
    assert sorted(folder.rglob("*")) == before


def test_resume_with_nothing_to_resume_starts_a_comparison_and_says_so(tmp_path, make_tiny_args, monkeypatch, caplog):
    monkeypatch.setattr(C, "run", _no_seed_runs)
    cfg = load_config(None, make_tiny_args(tmp_path, STUDENTS))
    with caplog.at_level("INFO", logger="xkd"), pytest.raises(_Started):
        C.compare(cfg, 2, resume=True, progress=False)
    out = RunDir(tmp_path / "runs" / "tiny")
    assert f"--resume: nothing to resume in {out.path} (no comparison there yet); starting a new one" in caplog.text
    # seeds/ is made first: a comparison stopped before its first seed is still one (it was refused as "something
    # other than an xkd comparison")
    assert out.kind() == "comparison" and out.config.is_file()
    with pytest.raises(_Started):
        C.compare(cfg, 2, resume=True, progress=False)


@pytest.fixture
def two_seeds(tmp_path, make_tiny_args, finished_run, monkeypatch):
    """A finished 2-seed comparison of the tiny config (seed runs faked); returns its overrides and a log of
    the seed runs compare() asks for, as (seed, resume, overwrite)."""
    monkeypatch.setenv("COLUMNS", "400")  # one console line per message
    calls = []

    def fake_run(c, resume=False, overwrite=False, progress=True):
        calls.append((c.seed, resume, overwrite))
        return finished_run(RunDir.of(c).path, c).path  # a finished seed, as the comparison sees one

    monkeypatch.setattr(C, "run", fake_run)
    monkeypatch.setattr(C, "aggregate", lambda cfg, runs: {"runs": {str(r.seed): r.reused for r in runs}})
    monkeypatch.setattr(C, "render_compare_report", lambda path: path / "report.html")
    args = make_tiny_args(tmp_path, STUDENTS, "compare.agreement_metric=rank_correlation")
    C.compare(load_config(None, args), 2, progress=True)
    assert calls == [(0, False, False), (1, False, False)]
    calls.clear()
    return args, calls, tmp_path / "runs" / "tiny"


def test_more_seeds_keep_the_finished_ones_as_they_are(two_seeds, capsys):
    # --seeds 3 --resume evaluated seeds 0 and 1 again: compare.seeds (2 -> 3) is in each seed's config.yaml
    args, calls, out = two_seeds
    capsys.readouterr()
    C.compare(load_config(None, [*args, "compare.agreement_metric=map_pearson"]), 3, resume=True, progress=True)
    assert calls == [(2, True, False)]  # only the new seed runs
    assert read_json(out / "records/compare.json")["runs"] == {"0": True, "1": True, "2": False}
    err = capsys.readouterr().err
    for s in (0, 1):
        assert f"seed {s}: finished run found in {out / 'seeds' / f'seed_{s}'}, reused" in err
    assert "evaluated again" not in err and "run again" not in err


def test_a_seed_evaluated_or_run_again_names_the_settings_that_changed(two_seeds, capsys):
    args, calls, out = two_seeds
    capsys.readouterr()
    C.compare(load_config(None, [*args, "evaluation.num_images=12"]), 2, resume=True, progress=True)
    assert calls == [(0, True, False), (1, True, False)]  # resumed with their models, evaluated again
    err = capsys.readouterr().err
    assert (
        "seed 0: evaluation.num_images: 24 -> 12 changed; its trained models are kept and it is evaluated again" in err
    )
    calls.clear()
    alpha = "students.1.params={alpha: 0.2}"
    C.compare(load_config(None, [*args, "evaluation.num_images=12", alpha]), 1, resume=True, progress=True)
    assert calls == [(0, False, True)]  # trained again from scratch
    err = capsys.readouterr().err
    assert f"seed 0: the models' settings changed since {out / 'seeds/seed_0'} was written (students" in err
    assert "{'alpha': 0.2}); it is run again" in err


def test_no_progress_bars_keeps_the_comparisons_lines(two_seeds, capsys):
    # --no-progress hid every line, the seeds reused and the report's path too; it means no bars
    args, calls, out = two_seeds
    capsys.readouterr()
    C.compare(load_config(None, args), 2, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "xkd compare 'tiny': seed 1 (2 of 2)" in err and "seed 1: finished run found" in err
    assert f"comparison report: {out / 'report.html'}" in err


def compare_args(tmp_path, make_tiny_args, *extra: str) -> list[str]:
    config = tmp_path / "c.yaml"
    config.write_text("name: tiny\n")
    args = ["compare", "--config", str(config), "--seeds", "2", "--no-progress"]
    for o in make_tiny_args(tmp_path, "evaluation.explainers=[{name: grad_cam}]", STUDENTS, *extra):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def compared(tmp_path_factory, make_tiny_args):
    tmp = tmp_path_factory.mktemp("compare")
    assert main(compare_args(tmp, make_tiny_args)) == 0
    return tmp


@pytest.mark.slow
def test_every_aggregate_is_traceable_to_a_seed_run(compared):
    out = compared / "runs" / "tiny"
    cmp = read_json(out / "records/compare.json")
    assert cmp["kind"] == "compare" and cmp["seeds"] == [0, 1]
    assert cmp["roles"] == ["teacher", "scratch", "kd", "at"] and cmp["headline"]["explainer"] == "grad_cam"
    for i, s in enumerate(cmp["seeds"]):
        run_dir = out / cmp["runs"][str(s)]["dir"]
        models = read_json(run_dir / "records/models.json")["models"]
        expl = read_json(run_dir / "records/explanations.json")
        agreement = expl["agreement"]
        for role in cmp["roles"]:
            m = cmp["methods"][role]
            assert m["accuracy"]["values"][i] == pytest.approx(models[role]["test"]["accuracy"])
            fidelity = expl["per_model"][role]["grad_cam"]["fidelity"]["mean"]
            assert m["explanation_quality"]["grad_cam"]["fidelity"]["values"][i] == pytest.approx(fidelity)
            if role != "teacher":
                assert m["last_accuracy"]["values"][i] == pytest.approx(models[role]["test_last"]["accuracy"])
                assert m["posthoc_accuracy"]["values"][i] == pytest.approx(models[role]["posthoc"]["accuracy"])
                expected = agreement[role]["grad_cam"]["rank_correlation"]
                assert m["headline_agreement"]["values"][i] == pytest.approx(expected)
    total = sum(
        read_json(out / cmp["runs"][str(s)]["dir"] / "records/run.json")["timing"]["total_seconds"]
        for s in cmp["seeds"]
    )
    assert cmp["seed_run_seconds"] == pytest.approx(total)
    kd = cmp["methods"]["kd"]["headline_agreement"]
    assert kd["mean"] == pytest.approx(sum(kd["values"]) / 2)
    assert sorted(cmp["ranking"]["order"]) == ["at", "kd", "scratch"]
    html = (out / "report.html").read_text()
    for text in ("Accuracy vs agreement", "Ranking", "Acc. (last)", "Best epoch", "seeds/seed_1/report.html"):
        assert text in html
    for role in cmp["roles"]:
        epochs = [
            read_json(out / cmp["runs"][str(s)]["dir"] / "records/models.json")["models"][role]["train"]["best_epoch"]
            for s in cmp["seeds"]
        ]
        assert cmp["methods"][role]["best_epoch"]["values"] == epochs
    # seed 1 loads seed 0's teacher: it reports the time that teacher took to train, not 0 s
    teacher = cmp["methods"]["teacher"]
    assert teacher["loaded"] == [False, True]
    t0, t1 = teacher["train_seconds"]["values"]
    assert t0 > 0 and t1 == pytest.approx(t0) and teacher["train_seconds"]["mean"] == pytest.approx(t0)
    assert "loaded from a checkpoint by seed 1" in html
    for i, s in enumerate(cmp["seeds"]):  # a student's time = epoch loop + distiller setup
        train = read_json(out / cmp["runs"][str(s)]["dir"] / "records/models.json")["models"]["at"]["train"]
        assert train["seconds"] == pytest.approx(train["loop_seconds"] + train["setup_seconds"])
        assert cmp["methods"]["at"]["train_seconds"]["values"][i] == pytest.approx(train["seconds"])
    assert (out / "figures/accuracy_vs_agreement.png").stat().st_size > 0


@pytest.mark.slow
def test_closer_to_teacher_per_seed_mean_std_and_sentence(compared):
    out = compared / "runs" / "tiny"
    cmp = read_json(out / "records/compare.json")
    assert "closer_to_teacher" in cmp["agreement_tests"]  # on by default: the students include scratch
    assert "agreement_tests" not in cmp["methods"]["scratch"]  # the independent student itself
    for role in ("kd", "at"):
        t = cmp["methods"][role]["agreement_tests"]["grad_cam"]["closer_to_teacher"]
        for i, s in enumerate(cmp["seeds"]):
            r = read_json(out / cmp["runs"][str(s)]["dir"] / "records/explanations.json")["agreement"][role]
            r = r["grad_cam"]["closer_to_teacher"]
            assert t["share"]["values"][i] == pytest.approx(r["share"]) and t["p_value"][i] == pytest.approx(
                r["p_value"]
            )
            assert (t["closer"][i], t["ties"][i], t["images"][i]) == (r["closer"], r["ties"], r["images"])
        assert t["share"]["mean"] == pytest.approx(sum(t["share"]["values"]) / 2)
        agreement = cmp["methods"][role]["explanation_agreement"]["grad_cam"]["closer_to_teacher"]
        assert agreement["values"] == t["share"]["values"]
    html = (out / "report.html").read_text()
    assert '<a href="#tests">Closer to teacher</a>' in html
    t = cmp["methods"]["kd"]["agreement_tests"]["grad_cam"]["closer_to_teacher"]
    mean, std = t["share"]["mean"] * 100, t["share"]["std"] * 100
    lo, hi = min(t["images"]), max(t["images"])  # all-zero Grad-CAMs of the tiny models are left out
    assert (
        "<strong>kd</strong>: over 2 seeds, the teacher&#39;s Grad-CAM is closer to this student&#39;s than to an "
        f"independent student&#39;s (scratch) on {mean:.1f}% ± {std:.1f}% of {lo if lo == hi else f'{lo}–{hi}'} "
        "images (p per seed: " in html
    )


@pytest.mark.slow
def test_later_seeds_distil_from_the_first_seeds_teacher(compared):
    seeds = compared / "runs" / "tiny" / "seeds"
    second = yaml.safe_load((seeds / "seed_1/config.yaml").read_text())
    assert second["seed"] == 1 and second["teacher"]["checkpoint"].endswith("seed_0/checkpoints/teacher/best.pt")
    a = read_json(seeds / "seed_0/records/models.json")["models"]["teacher"]["test"]
    b = read_json(seeds / "seed_1/records/models.json")["models"]["teacher"]["test"]
    assert a == b


@pytest.mark.slow
def test_resume_reuses_finished_seeds_and_report_rerenders(compared, make_tiny_args, capsys):
    out = compared / "runs" / "tiny"
    assert main(compare_args(compared, make_tiny_args)) == 2
    assert "--resume" in capsys.readouterr().err
    before = read_json(out / "records/compare.json")
    assert main([*compare_args(compared, make_tiny_args), "--resume"]) == 0
    after = read_json(out / "records/compare.json")
    assert all(info["reused"] for info in after["runs"].values())
    assert after["methods"] == before["methods"]
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert "xkd comparison" in (out / "report.html").read_text()


@pytest.mark.slow
def test_resume_reruns_only_seeds_whose_config_changed(tmp_path, make_tiny_args, monkeypatch):
    assert main(compare_args(tmp_path, make_tiny_args)) == 0
    out = tmp_path / "runs" / "tiny"
    changed = compare_args(tmp_path, make_tiny_args, "students.1.params={alpha: 0.2, temperature: 3.0}")
    assert main([*changed, "--resume"]) == 0
    cmp = read_json(out / "records/compare.json")
    assert not any(info["reused"] for info in cmp["runs"].values())
    assert cmp["methods"]["kd"]["distiller_params"] == {"alpha": 0.2, "temperature": 3.0, "standardize": False}
    assert main([*changed, "--resume"]) == 0
    assert all(info["reused"] for info in read_json(out / "records/compare.json")["runs"].values())
    # only an evaluation setting changed: the seeds are evaluated again with their trained models (they
    # used to be trained again from scratch)
    best = sorted((out / "seeds").glob("seed_*/checkpoints/*/best.pt"))
    stamps = [p.read_bytes() for p in best]
    monkeypatch.setattr(Trainer, "_train_epoch", lambda *a, **k: pytest.fail("a model trained again"))
    assert main([*changed, "--set", "evaluation.num_images=12", "--resume"]) == 0
    assert [p.read_bytes() for p in best] == stamps  # the same weights (the teacher's is copied again)
    cmp = read_json(out / "records/compare.json")
    assert not any(info["reused"] for info in cmp["runs"].values())  # evaluated again, not reused as they were
    seed = read_json(out / "seeds/seed_0/records/explanations.json")
    assert seed["num_images"] == 12
