"""The benchmark scripts of ``make bench`` import against today's package (they run outside the
test suite: a renamed function must fail here, not at the next `make bench`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*_bench.py")))
def test_bench_script_imports(script):
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the imports, not main()
    assert callable(module.main)


def test_the_train_bench_counts_operators_that_launch_kernels_not_views():
    spec = importlib.util.spec_from_file_location("bench_train_bench", BENCH / "train_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x, w = torch.ones(4), torch.eye(4)
    assert bench.operators(lambda: (x.view(2, 2) + 1).sum()) == 2  # add and sum; the view launches nothing
    assert bench.operators(lambda: torch.nn.functional.linear(x, w)) == 1  # the ops inside linear count once
    assert bench.operators(lambda: x.double()) == 1  # a conversion copies
    assert bench.operators(lambda: x.float()) == 0  # already float32: no copy
    assert bench.operators(lambda: w.t().reshape(16)) == 1  # a reshape that must copy
    # a composite operator counts as the kernels it launches: kl_div is a sub, an exp, a mul and a sum
    log_p = torch.zeros(2, 3)
    assert bench.operators(lambda: torch.nn.functional.kl_div(log_p, log_p, reduction="sum", log_target=True)) == 4
    y = torch.ones(2, 3, requires_grad=True)
    assert bench.operators(lambda: (y * 2).sum().backward()) == 4  # the backward's kernels count too
