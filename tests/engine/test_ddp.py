"""The same trainer under torchrun: 2 CPU processes (gloo) end with identical weights and only
rank 0 writes the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_two_cpu_ranks_train_identical_weights_and_only_rank0_writes(tmp_path, tiny_args, torchrun_two_cpu_ranks):
    script = Path(__file__).with_name("ddp_script.py")
    overrides = [*tiny_args, "students=[{name: kd, distiller: hinton_kd}]", "evaluation.num_images=8"]
    torchrun_two_cpu_ranks(script, str(tmp_path), *overrides)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(r0) == {"teacher", "kd"} == set(r1)
    for role in r0:
        assert r0[role].keys() == r1[role].keys()
        for k in r0[role]:
            assert torch.equal(r0[role][k], r1[role][k]), (role, k)
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "report.html").is_file() and (run_dir / "checkpoints" / "kd" / "best.pt").is_file()
    run = json.loads((run_dir / "records" / "run.json").read_text())
    assert run["world_size"] == 2
