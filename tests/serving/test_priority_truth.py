"""One priority truth (issue 22): the scenario matrix.

Each row starts from a phantom study the real pipeline analyses (the fixture models, the node's
analysis step with its index, so RIS orders count), lets days pass, orders change or a
radiologist override, runs the waiting list's tick and the HL7 sender to a real MLLP RIS on
loopback, and then reads every output back: the current SR (pydicom, `read_triage_sr`), the
last ORU^R01 (hl7apy), the FHIR DiagnosticReport and Observations (fhir.resources), the worklist
API and the study API. All five must state the same flag and the same deciding driver, and the
RIS's statement must be the SR's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from sqlalchemy import select

from cli.composition import build_analyser, build_engine
from cli.demo.ris import RecordingRis
from core import codes
from core.domain import Priority, ReferralUrgency
from core.engine import InferenceOutput
from core.priority import Thresholds
from core.settings import Hl7Destination, Hl7Settings, Settings, TriageSettings
from dicom_node.sr_reader import read_triage_sr
from imaging.study_reader import scan_study
from models.ood_gate import DomainCheck
from models.postprocessing import CalibratedPrediction
from ris.hl7_results import Hl7Sender
from ris.orders import OrderControl, OrderUpdate, apply_order
from store.index import Index, Study
from store.results import update_result_columns
from store.spool import Spool
from tests.dicom_node.peers import index_series
from tests.serving.workspace_helpers import add_users, client
from triage.waiting_list import WaitingList

pytestmark = pytest.mark.integration

ANALYSED_ON = date(2026, 11, 24)


@dataclasses.dataclass
class Outputs:
    """What each way out says about the study, read back from the wire formats."""

    sr: tuple[str, str, str]  # (flag, deciding driver, statement)
    oru: tuple[str, str, str]
    fhir: tuple[str, str, str]
    worklist: tuple[str, str, str]
    study: tuple[str, str, str]
    sr_verifier: str | None
    fhir_status: str
    fhir_reports: int
    oru_referral: str | None
    ai_priority: str | None


class Scenario:
    """One study on its own index, analysed by the real pipeline, then driven by events."""

    def __init__(
        self,
        tmp: Path,
        files: list[Path],
        model_repository: Path,
        ris: RecordingRis,
        *,
        image_priority: str = "",
        low_confidence: bool = False,
    ) -> None:
        self.tmp = tmp
        self.index = Index(f"sqlite:///{tmp}/index.db")
        received = datetime(2026, 11, 24, 8, tzinfo=UTC).timestamp()
        self.uid = index_series(self.index, files, received, priority=image_priority)
        self.patient_id = str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientID)
        self.files = files
        self.settings = Settings.model_validate(
            {
                "storage": {"root": str(tmp)},
                "models": {"repository": str(model_repository)},
                "triage": {"today": ANALYSED_ON.isoformat()},
            }
        )
        self.model_repository = model_repository
        self.low_confidence = low_confidence
        self.ris = ris
        self.tokens = add_users(self.index)
        self.thresholds: Callable[[Any], Thresholds | None] = lambda model: None
        self.waiting = WaitingList(
            self.index,
            Spool(tmp / "var"),
            TriageSettings(today=ANALYSED_ON),
            Hl7Settings(
                destinations=[Hl7Destination(name="ris", host="127.0.0.1", port=ris.port)],
                ack_timeout_s=5.0,
            ),
            thresholds=lambda model: self.thresholds(model),
            dicom_destinations=["pacs"],
        )
        self.client: TestClient = client(
            self.index, redecide=self.waiting.redecide, today=lambda: self.today
        )
        self.today = ANALYSED_ON

    def order(self, control: OrderControl = OrderControl.NEW, **fields: Any) -> None:
        with self.index.write() as s:
            apply_order(
                s,
                OrderUpdate(
                    control,
                    "PLC1",
                    study_instance_uid=self.uid,
                    patient_id=self.patient_id,
                    **fields,
                ),
                now=time.time(),
            )

    def analyse(self, engine: Any) -> None:
        """The node's analysis step, as `serve` runs it, and what the job state machine stores."""
        if self.low_confidence:
            engine = _LowConfidence(engine)
        analyser = build_analyser(self.settings, engine, self.tmp / "results")
        analyser.index = self.index
        analysis = analyser.analyse(
            scan_study(self.files), self.tmp / "results" / self.uid, None, self.uid
        )
        now = datetime(2026, 11, 24, 9, tzinfo=UTC).timestamp()
        with self.index.write() as s:
            study = s.scalars(select(Study).where(Study.study_instance_uid == self.uid)).one()
            study.status = "reported"
            study.reported_at = now
            study.result_json = json.dumps(analysis.result.to_json_dict())
            study.documents_json = json.dumps([str(d.path) for d in analysis.documents])
            study.previous_sr_path = next(
                str(d.path) for d in analysis.documents if d.modality == "SR"
            )
            update_result_columns(s, study.id, analysis.result, now)

    def tick(self, today: date) -> None:
        self.today = today
        self.waiting.triage = TriageSettings(today=today)
        self.waiting.tick(today)
        Hl7Sender(self.index, self.waiting.hl7).run_once()

    def override(self, priority: str, reason: str) -> None:
        r = self.client.post(
            f"/api/studies/{self.uid}/override",
            json={"priority": priority, "reason": reason},
            headers=self._auth(),
        )
        assert r.status_code == 200, r.text
        Hl7Sender(self.index, self.waiting.hl7).run_once()

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens['radiologist']}"}

    def outputs(self) -> Outputs:
        with self.index.read() as s:
            study = s.scalars(select(Study).where(Study.study_instance_uid == self.uid)).one()
            sr_path = Path(study.previous_sr_path)
        sr = read_triage_sr(pydicom.dcmread(sr_path))
        mine = [m for m in self.ris.messages if self.uid in m]
        assert mine, "the RIS received no result for this study"
        oru = _oru(mine[-1])
        h = self._auth()
        reports = self.client.get(
            "/fhir/DiagnosticReport", params={"identifier": self.uid}, headers=h
        ).json()
        found = [e["resource"] for e in reports.get("entry", [])]
        report = DiagnosticReport.parse_obj(found[0])
        observations = self.client.get(
            "/fhir/Observation", params={"identifier": self.uid}, headers=h
        ).json()
        flag_obs = next(
            Observation.parse_obj(e["resource"])
            for e in observations["entry"]
            if e["resource"]["code"]["coding"][0]["code"] == codes.WAITING_LIST_PRIORITY.value
        )
        drivers = [
            c.valueCodeableConcept.coding[0].code
            for c in flag_obs.component or []
            if c.code.coding[0].code == codes.PRIORITY_DRIVER.value
        ]
        row = next(
            r
            for r in self.client.get("/api/worklist", headers=h).json()["rows"]
            if r["study_instance_uid"] == self.uid
        )
        doc = self.client.get(f"/api/studies/{self.uid}", headers=h).json()
        statement = flag_obs.note[0].text if flag_obs.note else ""
        assert (report.conclusion or "").startswith(statement)  # then the disclaimer, if any
        return Outputs(
            sr=(sr.priority.value, (sr.drivers or ("",))[0], sr.headline),
            oru=oru["state"],
            fhir=(
                _flag_of(report.conclusionCode[0].coding[0].code),
                _driver_of(drivers[0]) if drivers else "",
                flag_obs.note[0].text if flag_obs.note else "",
            ),
            worklist=(
                row["priority"],
                (row["priority_drivers"] or [""])[0],
                row["priority_headline"] or "",
            ),
            study=(
                doc["priority"],
                (doc["result"]["priority_drivers"] or [""])[0],
                doc["result"]["priority_headline"] or "",
            ),
            sr_verifier=sr.verifying_observer,
            fhir_status=report.status,
            fhir_reports=len(found),
            oru_referral=oru["referral"],
            ai_priority=doc["result"].get("ai_priority"),
        )


class _LowConfidence:
    """The engine port with the domain gate's answer set to low confidence (a seam we own)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def predict(self, request: Any) -> InferenceOutput:
        out = self.engine.predict(request)
        p = out.prediction
        gated = CalibratedPrediction(
            case_likelihood=min(p.case_likelihood, 0.01),  # the AI alone would say routine
            lesions=(),
            gland_volume_ml=p.gland_volume_ml,
            gland_mask=p.gland_mask,
            domain=DomainCheck("low_confidence", 9.0, {}),
        )
        return dataclasses.replace(out, prediction=gated)


_FLAGS = {c.value: k for k, c in codes.PRIORITY_CODES.items()}
_DRIVERS = {c.value: k for k, c in codes.DRIVER_CODES.items()}


def _flag_of(code: str) -> str:
    return _FLAGS[code]


def _driver_of(code: str) -> str:
    return _DRIVERS[code]


def _oru(text: str) -> dict[str, Any]:
    """Flag, first driver, statement and referral of an ORU^R01, parsed and validated."""
    msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    msg.validate()
    values: dict[str, list[str]] = {}
    for line in text.split("\r"):
        fields = line.split("|")
        if fields[0] == "OBX":
            values.setdefault(fields[3].split("^")[0], []).append(fields[5])
    flag = _flag_of(values[codes.WAITING_LIST_PRIORITY.value][0].split("^")[0])
    drivers = [_driver_of(v.split("^")[0]) for v in values.get(codes.PRIORITY_DRIVER.value, [])]
    statement = values.get(codes.PRIORITY_STATEMENT.value, [""])[0]
    referral = values.get(codes.REFERRAL_URGENCY.value, [None])[0]
    return {
        "state": (flag, drivers[0] if drivers else "", statement),
        "referral": referral.split("^")[0] if referral else None,
    }


@pytest.fixture(scope="module")
def engine(model_repository: Path) -> Any:
    settings = Settings.model_validate({"models": {"repository": str(model_repository)}})
    return build_engine(settings.models, "cpu")


@pytest.fixture(scope="module")
def ris() -> Iterator[RecordingRis]:
    with RecordingRis() as peer:
        yield peer


@pytest.fixture
def make(
    tmp_path: Path, phantoms: dict[str, Path], model_repository: Path, ris: RecordingRis
) -> Callable[..., Scenario]:
    def _make(kind: str, **kw: Any) -> Scenario:
        files = sorted(phantoms[kind].rglob("*.dcm"))
        return Scenario(tmp_path, files, model_repository, ris, **kw)

    return _make


def _agree(out: Outputs, flag: str, driver: str, statement: str | None = None) -> None:
    """Every output states `flag` with `driver` deciding, and the same statement."""
    states = {
        "sr": out.sr,
        "oru": out.oru,
        "fhir": out.fhir,
        "worklist": out.worklist,
        "study": out.study,
    }
    for name, (f, d, _) in states.items():
        assert (f, d) == (flag, driver), f"{name} says {f} by {d}, expected {flag} by {driver}"
    statements = {s for _, _, s in states.values()}
    assert len(statements) == 1, f"the outputs word it differently: {states}"
    if statement is not None:
        assert statements == {statement}, states
    assert out.fhir_reports == 1  # one DiagnosticReport per study, updated in place


def test_demo_wait_clock_negative_is_urgent_by_the_clock_not_the_ai(
    make: Callable[..., Scenario], engine: Any
) -> None:
    """The demo's 910006 (finding 2): a negative requested 26 days ago."""
    sc = make("negative")
    sc.order(request_date=ANALYSED_ON - timedelta(days=26))
    sc.analyse(engine)
    sc.tick(ANALYSED_ON)
    out = sc.outputs()
    _agree(out, "urgent", "wait_clock", "Urgent: waited 26 of 28 days (FDS)")
    assert out.ai_priority == "routine"  # the AI's opinion, apart from the flag


def test_demo_order_priority_raises_to_soon_by_the_referral(
    make: Callable[..., Scenario], engine: Any
) -> None:
    """The demo's "soon by its order" (finding 2): never "AI intermediate suspicion"."""
    sc = make("negative")
    sc.order(referral_urgency=ReferralUrgency.SOON, request_date=ANALYSED_ON)
    sc.analyse(engine)
    sc.tick(ANALYSED_ON)
    _agree(sc.outputs(), "soon", "referral_floor", "Soon: expedited referral")


def test_ai_suspicion_drives_a_positive(make: Callable[..., Scenario], engine: Any) -> None:
    sc = make("positive")
    sc.analyse(engine)
    sc.tick(ANALYSED_ON)
    out = sc.outputs()
    _agree(out, "urgent", "ai_suspicion")
    assert out.sr[2].startswith("Urgent: AI suspects csPCa (")


def test_low_confidence_floor_survives_the_tick(make: Callable[..., Scenario], engine: Any) -> None:
    """Finding 1: the gate's soon is not lost on the first tick (no superseding SR)."""
    sc = make("negative", low_confidence=True)
    sc.analyse(engine)
    with sc.index.read() as s:
        first_sr = s.scalars(select(Study.previous_sr_path)).one()
    sc.tick(ANALYSED_ON)
    sc.tick(ANALYSED_ON + timedelta(days=1))
    out = sc.outputs()
    _agree(out, "soon", "low_confidence", "Soon: AI result of low confidence")
    with sc.index.read() as s:
        assert s.scalars(select(Study.previous_sr_path)).one() == first_sr


def test_orphaned_model_and_changed_thresholds_keep_ticking(
    make: Callable[..., Scenario], engine: Any
) -> None:
    """Findings 4 and 5: a study whose model left the repository (or whose thresholds were
    rewritten) keeps the AI opinion it was scored with and still escalates by the clock."""
    sc = make("negative")
    sc.order(request_date=ANALYSED_ON - timedelta(days=2))
    sc.analyse(engine)
    sc.thresholds = lambda model: Thresholds(urgent=0.0, soon=0.0)  # rewritten: all urgent
    sc.tick(ANALYSED_ON)
    assert sc.outputs().sr[:2] == ("routine", "ai_suspicion")  # scored as it was
    sc.thresholds = lambda model: None  # the version left the repository
    sc.tick(ANALYSED_ON + timedelta(days=24))
    _agree(sc.outputs(), "urgent", "wait_clock", "Urgent: waited 26 of 28 days (FDS)")


def test_stat_study_the_ai_could_not_analyse_keeps_its_referral(
    make: Callable[..., Scenario], engine: Any
) -> None:
    """Finding 6: a STAT study without T2W goes to the RIS as not analysed with a STAT
    referral and ranks with the urgent ones, never as "Routine referral"."""
    sc = make("no_t2w", image_priority="STAT")
    sc.analyse(engine)
    sc.tick(ANALYSED_ON)
    out = sc.outputs()
    _agree(out, "not_analysed", "not_analysed")
    assert out.sr[2].startswith("Not analysed: ")
    assert out.oru_referral == codes.REFERRAL_CODES["urgent"].value
    row = sc.client.get("/api/worklist", headers=sc._auth()).json()["rows"][0]
    assert row["priority_rank"] == Priority.URGENT.rank


def test_a_later_routine_order_never_lowers_what_the_images_asked(
    make: Callable[..., Scenario], engine: Any
) -> None:
    """Finding 7: images STAT, then a routine order: still urgent by the referral."""
    sc = make("negative", image_priority="STAT")
    sc.analyse(engine)
    sc.tick(ANALYSED_ON)
    sc.order(referral_urgency=ReferralUrgency.ROUTINE, request_date=ANALYSED_ON)
    sc.tick(ANALYSED_ON)
    _agree(sc.outputs(), "urgent", "referral_floor", "Urgent: STAT referral")


def test_order_change_keeps_the_clock_and_a_repeated_new_keeps_the_urgency(
    make: Callable[..., Scenario], engine: Any
) -> None:
    """Finding 8: an XO does not restart the 28-day clock (its ORC-15 is the change's date); a
    NW sent again without a priority does not reset urgency to routine."""
    sc = make("negative")
    sc.order(referral_urgency=ReferralUrgency.SOON, request_date=ANALYSED_ON - timedelta(days=3))
    sc.analyse(engine)
    sc.order(OrderControl.CHANGE, request_date=ANALYSED_ON, clinical_details="PSA repeated")
    sc.order(OrderControl.NEW)  # the RIS resends the order, without a priority
    sc.tick(ANALYSED_ON + timedelta(days=23))  # 26 days after the original request
    _agree(sc.outputs(), "urgent", "wait_clock", "Urgent: waited 26 of 28 days (FDS)")
    with sc.index.read() as s:
        result = json.loads(s.scalars(select(Study.result_json)).one())
    assert result["referral_urgency"] == "soon" and result["request_date_source"] == "order"


def test_override_is_a_verified_decision_and_a_breach_still_escalates(
    make: Callable[..., Scenario], engine: Any
) -> None:
    """Finding 9: an override reaches PACS (a verified SR naming the radiologist), the RIS and
    FHIR (corrected); 26 days on, the wait clock escalates it and says so everywhere."""
    sc = make("positive")
    sc.order(request_date=ANALYSED_ON)
    sc.analyse(engine)
    sc.tick(ANALYSED_ON)
    sc.override("routine", "benign on second read; MDT agreed")
    out = sc.outputs()
    _agree(out, "routine", "human_override", "Routine: set by rita")
    assert out.sr_verifier == "rita" and out.fhir_status == "corrected"
    assert out.ai_priority == "urgent"
    sc.tick(ANALYSED_ON + timedelta(days=26))
    out = sc.outputs()
    _agree(out, "urgent", "wait_clock", "Urgent: waited 26 of 28 days (FDS)")
    assert out.sr_verifier is None and out.fhir_status == "amended"
    decisions = sc.client.get(f"/api/studies/{sc.uid}/decisions", headers=sc._auth()).json()
    assert [d["cause"] for d in decisions] == ["analysis", "override", "clock"]
    assert decisions[1]["actor"] == "rita" and decisions[1]["drivers"] == ["human_override"]


def test_future_request_date_is_clamped_and_named(
    make: Callable[..., Scenario], engine: Any
) -> None:
    """Finding 6: a request date after today starts the clock today, with a note."""
    sc = make("negative")
    sc.order(request_date=ANALYSED_ON + timedelta(days=5))
    sc.analyse(engine)
    sc.tick(ANALYSED_ON)
    doc = sc.client.get(f"/api/studies/{sc.uid}", headers=sc._auth()).json()["result"]
    assert doc["days_waited"] == 0 and doc["request_date"] == ANALYSED_ON.strftime("%Y%m%d")
    assert "clamped" in doc["request_date_note"]
    sc.tick(ANALYSED_ON + timedelta(days=26))
    _agree(sc.outputs(), "urgent", "wait_clock", "Urgent: waited 26 of 28 days (FDS)")


def test_a_failed_sr_write_is_decided_again_as_not_analysed() -> None:
    """Finding 11: no AI reasons or rank survive in the fallback."""
    from core.domain import StudyStatus, TriageResult
    from triage.analysis import redecide_not_analysed

    ai = TriageResult(
        study_instance_uid="1.2.3",
        status=StudyStatus.REPORTED,
        priority=Priority.URGENT,
        case_likelihood=0.9,
        ai_priority=Priority.URGENT,
        priority_rank=0,
        priority_drivers=("ai_suspicion",),
        priority_headline="Urgent: AI suspects csPCa (0.90)",
        priority_reasons=("AI csPCa likelihood 0.90 -> urgent",),
        referral_urgency=ReferralUrgency.ROUTINE,
    )
    got = redecide_not_analysed(ai, {"code": "internal_error", "message": "disk full"})
    assert got.priority is Priority.NOT_ANALYSED and got.ai_priority is None
    assert got.priority_rank == Priority.NOT_ANALYSED.rank
    assert got.priority_drivers == ("not_analysed",)
    assert got.priority_headline == "Not analysed: Internal error"
    assert not any("AI csPCa" in r for r in got.priority_reasons)
