"""The study folder: new, resumed or overwritten, and never another command's folder or a user's files."""

from __future__ import annotations

import pytest

from xkd.errors import RunExistsError
from xkd.rundir import RunDir
from xkd.studies.common import prepare_study_dir


@pytest.mark.parametrize(
    "entries, match",
    [
        (["file.txt"], r"is not empty and is not an xkd capacity-gap study \(it has no config.yaml"),
        (["fractions/"], r"holds an xkd study, not a capacity-gap study.*\(`xkd study --resume` continues"),
        (["seeds/", "config.yaml"], r"holds an xkd comparison, not a capacity-gap study.*\(`xkd compare --resume`"),
        # a finished kd-vs-ls study has a study record: capacity-gap --resume trained into it and replaced it
        (
            {"seeds/": None, "config.yaml": "name: x\n", "records/study.json": '{"study": "kd-vs-ls"}'},
            r"holds an xkd kd-vs-ls study, not a capacity-gap study.*\(`xkd study kd-vs-ls --resume` continues",
        ),
    ],
    ids=["files", "other_study", "comparison", "kd_vs_ls_study"],
)
@pytest.mark.parametrize("flag", ["resume", "overwrite"])
def test_a_folder_that_is_not_this_study_is_refused(tmp_path, make_folder, entries, match, flag):
    # --resume wrote the study into a folder of other files (only --overwrite refused it)
    study = RunDir(tmp_path / "gap")
    study.path.mkdir()
    make_folder(study.path, entries, "hi\n")
    before = sorted(study.path.rglob("*"))
    with pytest.raises(RunExistsError, match=rf"^--{flag}: {study.path} {match}.*"):
        prepare_study_dir(
            study, resume=flag == "resume", overwrite=flag == "overwrite", kind="capacity-gap", marker="teachers"
        )
    assert sorted(study.path.rglob("*")) == before


def test_resume_with_nothing_to_resume_starts_the_study_and_says_so(tmp_path, caplog):
    study = RunDir(tmp_path / "gap")
    with caplog.at_level("INFO", logger="xkd"):
        prepare_study_dir(study, resume=True, overwrite=False, kind="capacity-gap", marker="teachers")
    assert f"--resume: nothing to resume in {study.path} (no capacity-gap study there yet)" in caplog.text
    # the marker is made first: a study stopped before its first comparison is resumed as one
    assert study.kind() == "study" and (study.path / "teachers").is_dir()
    prepare_study_dir(study, resume=True, overwrite=False, kind="capacity-gap", marker="teachers")
    with pytest.raises(RunExistsError, match="already exists; pass --resume"):
        prepare_study_dir(study, resume=False, overwrite=False, kind="capacity-gap", marker="teachers")
