"""Metrics against picai_eval's own known answers and on synthetic maps with known properties."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from core.domain import Lesion, Prediction, Volume
from core.priority import Thresholds
from evaluation.bootstrap import bootstrap_ci, clopper_pearson, paired_bootstrap
from evaluation.metrics import (
    CaseRecord,
    calibration,
    detection_map_from_likelihood,
    detection_map_from_prediction,
    dice,
    evaluate_records,
    picai_eval_module,
)

SUBJECTS = [f"case-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def picai_fixtures(shared_data: Path) -> Path:
    path = shared_data / "reference" / "picai_eval_fixtures" / "tests"
    if not path.is_dir():
        pytest.skip(f"picai_eval fixtures not found under {shared_data}")
    return path


def _fixture_records(path: Path) -> list[CaseRecord]:
    image_utils = pytest.importorskip("picai_eval.image_utils")
    records = []
    for s in SUBJECTS:
        det = image_utils.read_prediction(str(path / "test-maps" / f"{s}_detection_map.nii.gz"))
        lab = image_utils.read_label(str(path / "test-maps" / f"{s}_label.nii.gz"))
        # case score as picai_eval's default (max of the detection map), scaled into [0, 1]
        records.append(
            CaseRecord(
                s, bool(lab.any()), float(det.max()) / 2.0, detection_map=det / 2.0, lesion_mask=lab
            )
        )
    return records


def test_picai_fixtures_match_expected_answers(picai_fixtures: Path) -> None:
    expected = json.loads(
        (picai_fixtures / "output-expected" / "metrics-full-expected.json").read_text()
    )
    ev = evaluate_records(_fixture_records(picai_fixtures), n_bootstrap=50, seed=1)
    s = ev.summary
    assert s["auroc"] == pytest.approx(expected["auroc"])
    assert s["ap"] == pytest.approx(expected["AP"])
    assert s["ap_level"] == "lesion"
    assert s["picai_score"] == pytest.approx((expected["auroc"] + expected["AP"]) / 2)
    assert s["froc"]["num_lesions"] == expected["num_lesions"]
    # lesion hits/misses exactly as picai_eval's reference (confidences were halved)
    for case, results in expected["lesion_results"].items():
        ours = ev.metrics.lesion_results[case]
        assert [t for t, *_ in ours] == [t for t, *_ in results]
        np.testing.assert_allclose(
            np.array([(c, o) for _, c, o in ours]).reshape(-1, 2),
            np.array([(c / 2, o) for _, c, o in results]).reshape(-1, 2),
            atol=1e-6,
        )
    finite = [v for v in expected["lesion_FPR"] if math.isfinite(v)]
    assert s["froc"]["fp_per_case"] == pytest.approx(finite)
    assert s["froc"]["sensitivity"] == pytest.approx(expected["lesion_TPR"][: len(finite)])


def test_picai_fixture_lesion_counts_via_picai_eval(picai_fixtures: Path) -> None:
    """5 TP, 4 FP, 5 FN: the counts picai_eval's own tests state for these ten cases."""
    ev = evaluate_records(_fixture_records(picai_fixtures), n_bootstrap=10)
    assert ev.metrics.lesion_TP[-2] == 5
    assert ev.metrics.lesion_FP[-2] == 4
    assert ev.metrics.num_lesions == 10


def _blob_case(rng: np.random.Generator, i: int, positive: bool, hit: bool, conf: float):
    lab = np.zeros((8, 16, 16), np.uint8)
    det = np.zeros((8, 16, 16), np.float32)
    if positive:
        lab[3:6, 4:8, 4:8] = 1
    if hit:
        det[3:6, 4:8, 4:8] = conf
    else:
        det[1:3, 10:14, 10:14] = conf
    return CaseRecord(
        f"c{i}",
        positive,
        conf,
        detection_map=det,
        lesion_mask=lab,
        vendor="siemens" if i % 2 else "ge",
    )


def test_perfect_detector_scores_one() -> None:
    rng = np.random.default_rng(0)
    records = [_blob_case(rng, i, i < 10, i < 10, 0.9 if i < 10 else 0.2) for i in range(20)]
    s = evaluate_records(records, Thresholds(urgent=0.8, soon=0.5), n_bootstrap=100).summary
    assert s["auroc"] == 1.0 and s["ap"] == 1.0 and s["picai_score"] == 1.0
    assert s["froc"]["sensitivity_at"]["1"] == 1.0
    assert s["thresholds"]["soon"]["sensitivity"] == 1.0
    assert s["thresholds"]["soon"]["specificity"] == 1.0
    assert s["thresholds"]["soon"]["sensitivity_ci"][1] == 1.0
    assert s["subgroups"]["vendor"]["ge"]["n_cases"] == 10


def test_right_case_score_wrong_place_is_a_lesion_miss() -> None:
    """Case-level ranking perfect, but every detection misses the lesion: AUROC 1, AP 0."""
    rng = np.random.default_rng(0)
    records = [_blob_case(rng, i, i < 10, False, 0.9 if i < 10 else 0.2) for i in range(20)]
    s = evaluate_records(records, n_bootstrap=50).summary
    assert s["auroc"] == 1.0
    assert s["ap"] == pytest.approx(0.0)
    assert s["case_ap"] == 1.0
    assert s["froc"]["sensitivity_at"]["3"] == 0.0


@pytest.mark.slow  # seconds of phantoms/training: `make test`, not test-fast
def test_random_scores_give_chance_auroc_with_ci_covering_half() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(400) < 0.3
    records = [CaseRecord(f"c{i}", bool(t), float(rng.random())) for i, t in enumerate(y)]
    s = evaluate_records(records, n_bootstrap=200, seed=5).summary
    assert s["ap_level"] == "case"
    assert s["auroc_ci"][0] < 0.5 < s["auroc_ci"][1]
    assert s["froc"] is None
    again = evaluate_records(records, n_bootstrap=200, seed=5).summary
    assert again["auroc_ci"] == s["auroc_ci"]  # seeded


def test_calibration_of_calibrated_and_overconfident_scores() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert calibration(y, p)["ece"] < 0.02
    over = np.where(p > 0.5, 1.0, 0.0)
    assert calibration(y, over)["ece"] > 0.2


def test_detection_maps_and_dice() -> None:
    lik = np.zeros((4, 10, 10), np.float32)
    lik[1:3, 1:4, 1:4] = np.linspace(0.2, 0.8, 18).reshape(2, 3, 3)
    lik[1:3, 7:9, 7:9] = 0.05  # below min_likelihood: not a candidate
    det = detection_map_from_likelihood(lik)
    np.testing.assert_allclose(np.unique(det), [0.0, 0.8], atol=1e-6)
    labels = np.zeros_like(lik, dtype=np.uint8)
    labels[1:3, 1:4, 1:4] = 2
    vol = Volume(labels, (1, 1, 1), (0, 0, 0))
    pred = Prediction(
        0.7,
        lesions=(Lesion(0.7, 1.0, (0, 0, 0), label=2),),
        lesion_labels=vol,
        likelihood_map=vol.with_array(lik),
    )
    assert detection_map_from_prediction(pred).max() == pytest.approx(0.7)
    assert dice(labels > 0, labels > 0) == 1.0
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    assert dice(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])) == pytest.approx(2 / 3)


def test_gland_dice_summary() -> None:
    g = np.zeros((4, 8, 8), np.uint8)
    g[1:3, 2:6, 2:6] = 1
    records = [CaseRecord(f"c{i}", i % 2 == 0, 0.5, gland_pred=g, gland_true=g) for i in range(6)]
    s = evaluate_records(records, n_bootstrap=20).summary
    assert s["dice"]["gland_mean"] == 1.0 and s["dice"]["n"] == 6


def test_bootstrap_helpers() -> None:
    x = np.arange(100, dtype=float)
    i = bootstrap_ci(100, lambda idx: float(x[idx].mean()), n_bootstrap=300, seed=0)
    assert i.low < 49.5 < i.high
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187, abs=1e-3) and hi == pytest.approx(0.813, abs=1e-3)
    same = paired_bootstrap(
        100, lambda idx: float(x[idx].mean()), lambda idx: float(x[idx].mean()) + 5, n_bootstrap=100
    )
    assert same.difference.value == 5 and same.difference.low == 5 and same.p_value == 0.0


def test_picai_import_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    picai_eval_module()
    assert capsys.readouterr().out == ""


def test_fast_ap_equals_picai_eval_ap() -> None:
    """The bootstrap's AP is picai_eval's AP (random lesion results, ties and zero scores)."""
    from evaluation.metrics import picai_ap

    metrics_cls = picai_eval_module().Metrics
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        results = {
            str(i): [
                (int(rng.random() < 0.4), float(rng.choice([0.0, rng.random(), 0.5])), 0.0)
                for _ in range(int(rng.integers(0, 4)))
            ]
            for i in range(int(rng.integers(2, 30)))
        }
        m = metrics_cls(lesion_results=results)
        flat = m.lesion_results_flat
        y = np.array([t for t, _, _ in flat], float)
        if not y.any():
            continue
        s = np.array([c for _, c, _ in flat], float)
        assert picai_ap(y, s) == pytest.approx(m.AP, abs=1e-12)
        checked += 1
    assert checked > 30
