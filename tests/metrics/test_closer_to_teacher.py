"""closer_to_teacher (Ojha et al., NeurIPS 2023, §4.1): synthetic maps whose answer is known, the tie
rule, the binomial test against scipy, the rank option, the device path, and one tiny run end to end."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest, rankdata, spearmanr

from xkd.files import read_json
from xkd.metrics.closer import closer_counts, closer_to_teacher, similarity
from xkd.metrics.ranking import average_ranks
from xkd.registry import METRICS


def rand_maps(seed: int, n: int = 200, size: int = 8) -> torch.Tensor:
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed))


def test_a_student_whose_maps_are_the_teachers_plus_noise_is_closer_on_nearly_every_image(device):
    teacher = rand_maps(0).to(device)
    distilled = teacher + 0.05 * (rand_maps(1).to(device) - 0.5)  # the teacher's maps, slightly perturbed
    independent = rand_maps(2).to(device)  # unrelated maps
    r = closer_to_teacher(teacher, distilled, independent, independent="scratch")
    assert r["images"] == 200 and r["undefined"] == 0 and r["ties"] == 0
    assert r["closer"] + r["farther"] == 200 and r["share"] > 0.97
    assert r["p_value"] == pytest.approx(binomtest(r["closer"], 200, 0.5).pvalue) and r["p_value"] < 1e-40
    assert (r["distance"], r["independent"]) == ("cosine", "scratch")
    swapped = closer_to_teacher(teacher, independent, distilled)  # the unrelated maps as the distilled student
    assert swapped["share"] < 0.03 and (swapped["closer"], swapped["farther"]) == (r["farther"], r["closer"])
    assert swapped["p_value"] == pytest.approx(r["p_value"])  # two-sided: symmetric


def test_identical_students_tie_on_every_image_and_score_exactly_chance(device):
    teacher, student = rand_maps(0).to(device), rand_maps(1).to(device)
    r = closer_to_teacher(teacher, student, student.clone())
    assert (r["ties"], r["closer"], r["farther"], r["images"]) == (200, 0, 0, 200)
    assert r["share"] == 0.5 and r["p_value"] == 1.0  # ties count half; no untied image, no evidence


def test_counts_share_and_p_value_by_hand_with_ties_and_undefined_images():
    teacher, other = rand_maps(0, n=11), rand_maps(1, n=11)
    student, independent = other.clone(), other.clone()
    student[:7], independent[7:9] = teacher[:7], teacher[7:9]  # 7 closer, 2 farther, images 9-10 tied
    teacher[10] = 0.0  # an all-zero map: no cosine similarity, left out
    r = closer_to_teacher(teacher, student, independent)
    assert (r["closer"], r["ties"], r["farther"], r["undefined"], r["images"]) == (7, 1, 2, 1, 10)
    assert r["share"] == pytest.approx((7 + 0.5) / 10)
    assert r["p_value"] == pytest.approx(binomtest(7, 9, 0.5, alternative="two-sided").pvalue)  # 0.1797
    assert r["p_value"] == pytest.approx(0.1796875)
    none = closer_to_teacher(torch.zeros(3, 4, 4), rand_maps(0, n=3, size=4), rand_maps(1, n=3, size=4))
    assert none["images"] == 0 and none["share"] is None and none["p_value"] is None


@pytest.mark.parametrize("distance", ["cosine", "rank"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_map_with_inf_or_nan_is_undefined_never_dropped(distance, bad):
    teacher, other = rand_maps(0, n=5), rand_maps(1, n=5)
    student, independent = teacher.clone(), other.clone()  # 5 closer
    student[1, 0, 0], independent[3, 2, 2] = bad, bad
    counts = closer_counts(teacher, student, independent, distance).tolist()
    if distance == "rank" and bad == float("inf"):  # inf still has a rank: the maps are orderable
        assert counts == [5, 0, 0, 0]
    else:  # every image counted once: images 1 and 3 undefined
        assert counts == [3, 0, 0, 2]


def test_the_rank_option_ignores_scale_where_the_cosine_does_not(device):
    teacher = rand_maps(0).to(device) + 0.1
    monotone = teacher**3  # the same pixel order: Spearman 1, cosine about 0.92
    jittered = teacher + 0.02 * (rand_maps(3).to(device) - 0.5)  # cosine about 0.9999, but the order changes
    assert closer_to_teacher(teacher, monotone, jittered)["share"] == 0.0
    assert closer_to_teacher(teacher, monotone, jittered, distance="rank")["share"] == 1.0
    with pytest.raises(ValueError, match="distance must be 'cosine' or 'rank'"):
        closer_to_teacher(teacher, monotone, jittered, distance="euclidean")


def test_ranks_and_rank_correlation_match_scipy_with_ties(device):
    x = torch.randint(0, 5, (6, 40), generator=torch.Generator().manual_seed(0)).double()
    got = average_ranks(x.to(device)).cpu()
    assert torch.equal(got, torch.from_numpy(rankdata(x.numpy(), method="average", axis=1)))
    y = torch.randint(0, 7, (6, 40), generator=torch.Generator().manual_seed(1)).double()
    rho, defined = similarity(x.view(6, 5, 8).to(device), y.view(6, 5, 8).to(device), "rank")
    want = [spearmanr(a, b).statistic for a, b in zip(x.numpy(), y.numpy())]
    assert defined.all() and rho.cpu().tolist() == pytest.approx(want, abs=1e-12)
    constant = similarity(torch.ones(1, 2, 2).to(device), torch.rand(1, 2, 2).to(device), "rank")[1]
    assert not bool(constant.any())  # a constant map has no rank correlation


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_counting_on_the_gpu_never_waits_for_the_host():
    teacher, student, independent = (rand_maps(s).cuda() for s in range(3))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        cos = closer_counts(teacher, student, independent, "cosine")
        rank = closer_counts(teacher, student, independent, "rank")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert cos.device.type == rank.device.type == "cuda"
    cpu = closer_counts(teacher.cpu(), student.cpu(), independent.cpu(), "cosine")
    assert cos.cpu().tolist() == cpu.tolist()


def test_declared_as_an_agreement_metric_needing_the_independent_students_maps():
    info = METRICS.get("closer_to_teacher")
    assert info.scope == "agreement" and info.default and info.higher_is_better
    assert info.needs == ("teacher_maps", "student_maps", "independent_maps", "independent_role")
    entry = info.to_record({"share": 0.7, "p_value": 0.01})
    assert entry == {"closer_to_teacher": {"share": 0.7, "p_value": 0.01}}
    assert info.columns[0].value(entry) == 0.7
    assert "{explainer}" in info.sentence and info.info()["sentence"] == info.sentence


@pytest.mark.slow
def test_a_tiny_run_records_and_reports_it_for_every_explainer(tmp_path, make_tiny_args):
    from xkd.plan import load_config
    from xkd.runner import run

    explainers = "evaluation.explainers=[{name: grad_cam}, {name: integrated_gradients, params: {n_steps: 4}}]"
    metrics = "evaluation.metrics=[closer_to_teacher, rank_correlation]"
    run_dir = run(load_config(None, make_tiny_args(tmp_path, explainers, metrics)), progress=False)
    expl = read_json(run_dir / "records" / "explanations.json")
    assert expl["metric_info"]["closer_to_teacher"]["sentence"]
    agreement = expl["agreement"]
    for role in ("kd", "ls"):  # the default students: scratch (the independent one), kd, ls
        for ex in ("grad_cam", "integrated_gradients"):
            r = agreement[role][ex]["closer_to_teacher"]
            assert r["independent"] == "scratch" and r["distance"] == "cosine"
            assert r["images"] + r["undefined"] == 24 and r["closer"] + r["ties"] + r["farther"] == r["images"]
            assert r["share"] == pytest.approx((r["closer"] + r["ties"] / 2) / r["images"])
            untied = r["closer"] + r["farther"]
            want = binomtest(r["closer"], untied, 0.5).pvalue if untied else 1.0
            assert r["p_value"] == pytest.approx(want)
    for ex in ("grad_cam", "integrated_gradients"):
        assert "closer_to_teacher" not in agreement["scratch"][ex]  # not against itself
        assert "rank_correlation" in agreement["scratch"][ex]
    assert "closer_to_teacher" not in agreement.get("teacher", {})
    html = (run_dir / "report.html").read_text()
    assert 'href="#tests">Closer to teacher</a>' in html
    share = agreement["kd"]["grad_cam"]["closer_to_teacher"]["share"]
    assert "the teacher&#39;s Grad-CAM is closer to this student&#39;s than to an independent student&#39;s " in html
    assert f"(scratch) on {share * 100:.0f}% of" in html
    assert "the teacher&#39;s Integrated Gradients is closer" in html
