"""A model without a fitted domain gate says so in every result (result.json, SR, ORU), instead
of being reported in domain by assumption; the gate's state never changes the priority."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import pydicom
import pytest
from fhir.resources.R4B.observation import Observation

from core import codes
from core.domain import DOMAIN_GATES, ModelInfo, Prediction, Priority, StudyStatus, TriageResult
from core.priority import WaitingPolicy
from core.settings import Hl7Destination, Hl7Settings
from dicom_node import dicom_codes
from dicom_node.sr import build_triage_sr
from dicom_node.sr_reader import read_triage_sr
from imaging.study_reader import scan_study
from models.engine import LocalEngine
from models.metadata import read_metadata
from models.ood_gate import DomainCheck, unchecked
from models.postprocessing import CalibratedPrediction, check_domain
from ris.fhir import result_resources
from ris.hl7_results import ResultReport, build_oru
from training.phantoms import synthesize_case, write_study
from triage.analysis import analyse_study


def _obx(message: str) -> dict[str, list[str]]:
    rows = [line.split("|") for line in message.split("\r") if line.startswith("OBX|")]
    return {r[3].split("^")[0]: r for r in rows}


def test_no_gate_is_not_fitted_never_in_domain() -> None:
    assert check_domain(None, {"x": 1.0}).verdict == "not_fitted"
    assert unchecked({}).verdict == "not_fitted"
    assert Prediction(case_likelihood=0.5).domain_gate == "not_fitted"
    assert CalibratedPrediction(case_likelihood=0.5).domain_gate == "not_fitted"
    for verdict in ("in_domain", "low_confidence", "not_fitted"):
        p = CalibratedPrediction(case_likelihood=0.5, domain=DomainCheck(verdict, None, {}))
        assert p.domain_gate == verdict
        assert p.low_confidence is (verdict == "low_confidence")


def test_every_gate_state_has_a_code_that_reads_back() -> None:
    assert set(codes.DOMAIN_GATE_CODES) == set(DOMAIN_GATES)
    assert len({c.value for c in codes.DOMAIN_GATE_CODES.values()}) == len(DOMAIN_GATES)
    for state, code in codes.DOMAIN_GATE_CODES.items():
        assert dicom_codes.domain_gate_for(code.value, code.scheme) == state
        assert dicom_codes.domain_gate_concept(state).value == code.value


def test_a_result_written_before_the_gate_state_still_loads() -> None:
    old = {"study_instance_uid": "1.2.3", "status": "reported", "priority": "routine"}
    assert TriageResult.model_validate(old).domain_gate is None


def test_model_without_gate_says_not_fitted_in_result_sr_and_oru(
    tiny_repo: Path, tmp_path: Path
) -> None:
    md = read_metadata(tiny_repo / "cspca_detector" / "1.0.0" / "metadata.json")
    assert md.ood_gate is None  # the tiny detector has no fitted gate
    engine = LocalEngine.load(
        tiny_repo, "cspca_detector:1.0.0", "prostate_gland:1.0.0", device="cpu", threads=1
    )
    study = write_study(synthesize_case(7), tmp_path / "study", distractors=False)
    out = analyse_study(
        scan_study(study), tmp_path / "out", engine, WaitingPolicy(), today=date(2026, 12, 1)
    )
    assert out.result.priority is not Priority.NOT_ANALYSED
    # result.json
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written["domain_gate"] == "not_fitted"
    assert (written["model"]["name"], written["gland_model"]["name"]) == (
        "cspca_detector",
        "prostate_gland",
    )
    assert written["low_confidence"] is False
    # information, not a flag: it drives nothing
    assert "low_confidence" not in written["priority_drivers"]
    # the SR, read back
    sr = read_triage_sr(pydicom.dcmread(tmp_path / "out" / "sr.dcm"))
    assert sr.domain_gate == "not_fitted"
    # the ORU
    message = build_oru(
        ResultReport(out.result, patient_id="P1"),
        destination=_destination(),
        settings=_hl7_settings(),
        control_id="1",
    )
    obx = _obx(message)
    assert codes.DOMAIN_GATE.value in obx
    row = obx[codes.DOMAIN_GATE.value]
    assert row[2] == "CWE"
    assert row[5].split("^")[0] == codes.DOMAIN_GATE_CODES["not_fitted"].value


@pytest.mark.parametrize("state", ["in_domain", "low_confidence"])
def test_a_fitted_gate_state_reads_back_from_the_sr_and_oru(state: str, tmp_path: Path) -> None:
    result = TriageResult(
        study_instance_uid="1.2.826.0.1.3680043.8.498.7",
        status=StudyStatus.REPORTED,
        priority=Priority.ROUTINE,
        case_likelihood=0.1,
        model=ModelInfo(name="cspca_detector", version="9.9.9", sha256="0" * 64),
        domain_gate=state,  # type: ignore[arg-type]
    )
    study = write_study(synthesize_case(3), tmp_path / "study", distractors=False)
    header = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True)
    header.StudyInstanceUID = result.study_instance_uid
    sr = build_triage_sr(result, evidence={"t2w": [header]}, model=None)
    assert read_triage_sr(sr).domain_gate == state
    obx = _obx(build_oru(ResultReport(result), _destination(), _hl7_settings(), "2"))
    assert obx[codes.DOMAIN_GATE.value][5].split("^")[0] == codes.DOMAIN_GATE_CODES[state].value
    _, observations = result_resources(
        result,
        sr_sop_instance_uid="1.2.3",
        patient_id="P1",
        issuer="HOSP",
        accession="A1",
        issued=datetime(2026, 12, 1, tzinfo=UTC),
    )
    for observation in observations:
        Observation.model_validate(observation)  # valid FHIR R4B
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    gate = by_code[codes.DOMAIN_GATE.value]["valueCodeableConcept"]["coding"][0]["code"]
    assert gate == codes.DOMAIN_GATE_CODES[state].value


def _destination() -> Hl7Destination:
    return Hl7Destination(name="ris", host="127.0.0.1", port=2575, receiving_facility="HOSP")


def _hl7_settings() -> Hl7Settings:
    return Hl7Settings(destinations=[_destination()], ack_timeout_s=2.0)
