"""Out-of-distribution gate: features, conformal thresholds, refusal through the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError, OutsideValidatedDomainError
from evaluation.phantom_shift import oblique
from evaluation.runner import phantom_cases
from models.metadata import read_metadata, write_metadata
from models.ood_gate import FEATURES, fit_ood_gate, obliquity_deg
from models.pipeline import TriagePipeline
from models.postprocessing import LOW_CONFIDENCE_FLOOR, check_domain


def _features(rng: np.random.Generator, n: int, shift: float = 0.0) -> list[dict[str, float]]:
    return [
        {f: float(v) for f, v in zip(FEATURES, rng.normal(shift, 1.0, len(FEATURES)), strict=True)}
        for _ in range(n)
    ]


def test_conformal_low_confidence_rate_holds_on_new_in_distribution_cases() -> None:
    rng = np.random.default_rng(0)
    gate = fit_ood_gate(_features(rng, 200), _features(rng, 200), alpha=0.05, source="test")
    verdicts = [gate.check(f).verdict for f in _features(rng, 1000)]
    flagged = np.mean([v != "in_domain" for v in verdicts])
    assert flagged <= 0.05 + 0.03  # alpha plus sampling slack (1000 cases)
    assert gate.outside_distance == pytest.approx(2.0 * gate.low_confidence_distance)
    shifted = [gate.check(f).verdict for f in _features(rng, 100, shift=3.0)]
    assert np.mean([v == "outside" for v in shifted]) > 0.9


def test_a_constant_feature_still_has_a_tolerance() -> None:
    rng = np.random.default_rng(1)
    fit, thr = _features(rng, 40), _features(rng, 40)
    for f in fit + thr:
        f["obliquity_deg"] = 0.0
    gate = fit_ood_gate(fit, thr, source="test")
    probe = dict(thr[0])
    assert gate.check({**probe, "obliquity_deg": 0.5}).verdict != "outside"
    far = gate.check({**probe, "obliquity_deg": 60.0})
    assert far.verdict == "outside" and far.furthest[0][0] == "obliquity_deg"


def test_outside_is_an_input_error_with_its_reason_code() -> None:
    rng = np.random.default_rng(2)
    gate = fit_ood_gate(_features(rng, 30), _features(rng, 30), source="test")
    with pytest.raises(OutsideValidatedDomainError) as err:
        check_domain(gate, _features(rng, 1, shift=10.0)[0])
    assert isinstance(err.value, InputError)
    assert err.value.to_dict()["code"] == "outside_validated_domain"
    assert "furthest" in err.value.message
    assert check_domain(None, _features(rng, 1, shift=10.0)[0]).verdict == "not_fitted"
    assert LOW_CONFIDENCE_FLOOR.value == "soon"


def test_obliquity_of_a_rotated_exam() -> None:
    case = next(phantom_cases(1, 100_000))
    before = obliquity_deg(case.t2w.direction)
    assert before < 12.0
    assert obliquity_deg(oblique(case).t2w.direction) > before + 10.0


@pytest.mark.slow  # seconds of training/evaluation: `make test`, not test-fast
def test_pipeline_gate_refuses_a_shifted_study(tiny_repo: Path) -> None:
    def pipeline() -> TriagePipeline:
        return TriagePipeline.from_repository(
            tiny_repo, detector="cspca_detector:1.0.0", gland="prostate_gland:1.0.0", device="cpu"
        )

    cases = list(phantom_cases(10, 100_000))
    pipe = pipeline()
    features = [pipe.predict(c.t2w, c.adc, c.hbv).domain.features for c in cases]  # type: ignore[attr-defined]
    assert set(features[0]) == set(FEATURES)
    gate = fit_ood_gate(features[:5], features[5:], alpha=0.2, source="test")
    path = tiny_repo / "cspca_detector" / "1.0.0" / "metadata.json"
    write_metadata(path, read_metadata(path).model_copy(update={"ood_gate": gate}))
    gated = pipeline()
    seen = gated.predict(cases[5].t2w, cases[5].adc, cases[5].hbv)
    assert seen.domain.verdict in ("in_domain", "low_confidence")  # type: ignore[attr-defined]
    far = oblique(cases[0], degrees=60.0)
    with pytest.raises(OutsideValidatedDomainError):
        gated.predict(far.t2w, far.adc, far.hbv)


def test_analysis_reports_not_analysed_outside_validated_domain(tiny_repo: Path, tmp_path) -> None:
    """The node's analysis step turns the gate's refusal into a coded `not_analysed` result."""
    from datetime import date

    from core.domain import Priority
    from core.priority import WaitingPolicy
    from imaging.study_reader import scan_study
    from models.engine import LocalEngine
    from training.phantoms import synthesize_case, write_study
    from triage.analysis import analyse_study

    rng = np.random.default_rng(4)
    gate = fit_ood_gate(_features(rng, 20), _features(rng, 20), source="test")
    far = tuple(v + 1000.0 for v in gate.location)  # nothing real is near this validation set
    path = tiny_repo / "cspca_detector" / "1.0.0" / "metadata.json"
    md = read_metadata(path)
    write_metadata(
        path, md.model_copy(update={"ood_gate": gate.model_copy(update={"location": far})})
    )
    engine = LocalEngine.load(
        tiny_repo, "cspca_detector:1.0.0", "prostate_gland:1.0.0", device="cpu", threads=1
    )
    study = write_study(synthesize_case(7), tmp_path / "study", distractors=False)
    out = analyse_study(
        scan_study(study), tmp_path / "out", engine, WaitingPolicy(), today=date(2026, 12, 1)
    )
    assert out.result.priority is Priority.NOT_ANALYSED
    assert out.result.reason is not None
    assert out.result.reason["code"] == "outside_validated_domain"
    assert (tmp_path / "out" / "sr.dcm").exists()
