"""UniCAM's distilled and residual maps of each student are shown side by side in one section."""

from __future__ import annotations

import torch

from xkd.report.sections import explainer_sections


def test_distilled_and_residual_maps_get_one_side_by_side_section(tmp_path):
    (tmp_path / "figures").mkdir()
    samples = {
        "labels": [0, 1],
        "indices": [5, 9],
        "predictions": {"teacher": [0, 1], "kd": [0, 0]},
        "explainers": ["unicam_distilled", "unicam_residual"],
        "has_masks": False,
        "config": {
            "explainers": [
                {"name": "unicam", "params": {"kind": "distilled"}, "label": "unicam_distilled"},
                {"name": "unicam", "params": {"kind": "residual"}, "label": "unicam_residual"},
            ]
        },
    }
    tensors = {
        "images": torch.rand(2, 1, 8, 8),
        "maps/kd/unicam_distilled": torch.rand(2, 8, 8),
        "maps/kd/unicam_residual": torch.rand(2, 8, 8),
    }
    out = explainer_sections(tmp_path, ["teacher", "kd"], {}, {}, samples, tensors, ["a", "b"])
    pair = [s for s in out if s["key"] == "unicam_pair"]
    assert len(pair) == 1 and pair[0]["title"] == "UniCAM: distilled vs residual"
    assert [c["name"] for c in pair[0]["cards"]] == ["a", "b"]
    assert pair[0]["cards"][1]["wrong"] == 1  # kd's wrong prediction of image 9 counted once, not per row
    assert all((tmp_path / c["src"]).is_file() for c in pair[0]["cards"])
    # one kind only: no pair section
    samples["config"]["explainers"] = samples["config"]["explainers"][:1]
    out = explainer_sections(tmp_path, ["teacher", "kd"], {}, {}, samples, tensors, ["a", "b"])
    assert not [s for s in out if s["key"] == "unicam_pair"]
