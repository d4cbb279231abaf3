from __future__ import annotations

import pytest


@pytest.fixture
def study_args(tmp_path, make_tiny_args):
    """``study_args(study, name, *overrides)``: the CLI arguments of ``xkd study STUDY`` on the tiny
    config named ``name`` over 2 seeds, every override passed with ``--set``."""

    def args(study: str, name: str, *overrides: str) -> list[str]:
        config = tmp_path / "c.yaml"
        config.write_text(f"name: {name}\n")
        out = ["study", study, "--config", str(config), "--seeds", "2", "--no-progress"]
        for o in make_tiny_args(tmp_path, *overrides, f"name={name}"):
            out += ["--set", o]
        return out

    return args
