"""Adding a metric is one decorated function: the scoring loop, the config's default list, the
report's columns and ``xkd compare``'s tables all follow from its declaration."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from xkd.comparison import quality_columns
from xkd.config import EvaluationConfig
from xkd.metrics.base import INPUTS, default_metrics, metric, metric_info
from xkd.plan import load_config
from xkd.registry import METRICS
from xkd.report.sections import metric_columns
from xkd.scoring import Scorer, run_inputs, score_maps


@pytest.fixture
def peak_share():
    """A metric declared the way a contributor adds one (removed from the registry afterwards)."""

    @metric(
        "peak_share",
        scope="model",
        inputs=("maps", "masks"),
        higher_is_better=True,
        category="localisation",
        label="Peak share",
        description="share of images whose map maximum lies inside the mask",
        default=True,
    )
    def peak_share(maps: Tensor, masks: Tensor) -> float:
        flat = maps.flatten(1).argmax(1)
        return float(masks.flatten(1).gather(1, flat[:, None]).float().mean())

    yield peak_share
    del METRICS._entries["peak_share"]


def test_a_declared_metric_is_scored_shown_compared_and_on_by_default(peak_share, tmp_path):
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0  # inside image 0's mask
    maps[1, 3, 3] = 1.0  # outside image 1's mask
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True
    sc = Scorer(EvaluationConfig(metrics=["peak_share"]))
    values = run_inputs(sc, torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), masks, ["a"])
    entry = score_maps(sc, {**values, "model": torch.nn.Identity(), "maps": maps})
    assert entry["peak_share"] == pytest.approx(0.5)
    # without masks its input is missing: skipped, not scored 0
    no_masks = run_inputs(sc, torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), None, ["a"])
    assert "peak_share" not in score_maps(sc, {**no_masks, "model": torch.nn.Identity(), "maps": maps})

    assert "peak_share" in default_metrics()
    cfg = load_config(None, [f"output_dir={tmp_path}", "evaluation.metrics=[peak_share, rank_correlation]"])
    assert cfg.evaluation.metrics == ["peak_share", "rank_correlation"]
    cols = metric_columns({"metrics": ["peak_share"], "metric_info": metric_info(["peak_share"])})
    assert [(c.head, c.better, c.agreement) for c in cols] == [("Peak share ↑", "high", False)]
    assert {"key": "peak_share", "label": "Peak share"}.items() <= next(
        c for c in quality_columns() if c["key"] == "peak_share"
    ).items()


def test_a_declaration_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="unknown input.*'teacher_logits'.*the vocabulary"):
        metric("bad", scope="model", inputs=("teacher_logits",), higher_is_better=True, category="x")
    with pytest.raises(ValueError, match="unknown scope 'run'"):
        metric("bad", scope="run", higher_is_better=True, category="x")  # type: ignore[arg-type]
    assert "teacher_logits" not in INPUTS and "bad" not in METRICS


def test_every_registered_metric_declares_inputs_from_the_vocabulary_and_columns_with_a_label():
    import xkd.metrics  # noqa: F401

    for info in METRICS.entries():
        assert set(info.needs) <= set(INPUTS), info.name
        assert all(c.label for c in info.columns), info.name
        if (
            info.scope in ("model", "agreement")
            and info.higher_is_better is not None
            and info.name
            not in (
                "randomisation_sanity",
                "data_randomisation_sanity",
            )
        ):
            assert info.columns, f"{info.name} would be missing from the report"
