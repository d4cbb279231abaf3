"""The study charts' helpers whose output can be checked without looking at a picture."""

from __future__ import annotations

from xkd.report import study_figures


def test_a_series_keeps_its_style_in_every_panel_even_when_one_leaves_it_out():
    acc = {"scratch": ([0.7], [0.0]), "kd": ([0.8], [0.0]), "e2kd": ([0.8], [0.0])}
    closer = {"kd": ([0.6], [0.0]), "e2kd": ([0.9], [0.0])}  # no independent student here
    styles = study_figures.series_styles([acc, closer])
    assert list(styles) == ["scratch", "kd", "e2kd"]
    assert len({s[0] for s in styles.values()}) == 3  # three colours
    assert len({s[1:] for s in styles.values()}) == 3  # and three line/marker pairs
    assert study_figures.series_styles([closer, acc])["kd"] != styles["kd"]  # order of first appearance


def test_size_ticks_are_compact():
    assert [study_figures._compact(v) for v in (300, 6000, 272474, 1_200_000, 0.5)] == [
        "300",
        "6k",
        "272k",
        "1.2M",
        "0.5",
    ]


def test_lines_vs_size_writes_a_png(tmp_path):
    panels = {"accuracy": {"a": ([0.5, 0.6], [0.01, 0.02])}, "share": {"b": ([0.7, 0.8], [float("nan"), 0.1])}}
    out = study_figures.save_lines_vs_size(tmp_path / "f.png", [300, 6000], panels, xlabel="training images")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
