"""Results out to the RIS: ORU^R01 (HL7 v2.5.1) per study and destination, from a durable outbox.

One ORU^R01 per (study, decision) and ``[[hl7.destinations]]`` entry: PID (Patient ID + issuer),
ORC/OBR (placer and filler order numbers, Accession Number in OBR-18, result status OBR-25: P
for the first result, C for a correction that supersedes it), then one OBX per value:

====  ====  ======================================  ==========================================
OBX   type  OBX-3                                   OBX-5 (OBX-6 unit, UCUM)
====  ====  ======================================  ==========================================
1     CWE   RT001 Waiting-list priority             RT101..RT104 (urgent, soon, routine, not);
                                                    an NTE after it states the flag and driver
2     ST    RT012 Priority statement                "Urgent: waited 26 of 28 days (FDS)"
3     CWE   RT010 Priority driver, one each         RT601..RT606 (OBX-4 sub-ID 1, 2, ...)
4     CWE   RT011 AI priority opinion               RT101..RT103, the AI's own flag
5     CWE   RT008 Referral urgency                  RT401..RT403
6     NM    RT009 Days since imaging request        days (d)
7     NM    RT002 AI csPCa case likelihood          0..1 (1)
8     NM    RT510 Prostate gland volume (AI)        mL (mL)
9     NM    RT006 PSA density                       ng/mL/mL
10    NM    RT511 AI lesion candidates              count ({#})
11    ST    RT512 AI model                          name and version
12    ST    RT513 Not for clinical use              the disclaimer of demonstration models
13    CWE   RT005 Reason not analysed               RT301..RT399 (when not analysed)
14    ST    110180 Study Instance UID (DCM)         the triage SR's study
15    ST    RT514 Triage SR SOP Instance UID        the SR that carries the same result
====  ====  ======================================  ==========================================

Values absent from the result are left out, never sent empty. Every value written is escaped;
the built message is parsed back and validated against the ORU^R01 structure by ``hl7apy``
before it is queued.

Messages are queued in the one outbox (`store.outbox`, channel ``hl7``, kind ``oru``): a
newer result for the same study and destination withdraws the older pending one, and a study's
messages go out in the order they were queued, so after an outage the RIS's last message is the
current flag. The sender (`Hl7Sender.run_once`, one round) is the channel's transport: it sends
each due item over MLLP (``python-hl7`` asyncio streams) and reads the ACK: ``AA``/``CA`` ->
``sent``; ``AE``/``CE``, no ACK in ``[hl7] ack_timeout_s``, or a network error -> another
attempt after the outbox's backoff (``[hl7]`` ``initial_backoff_s`` doubling up to
``max_backoff_s``); ``AR``/``CR`` (the RIS will never take it) or ``max_attempts`` reached ->
``dead`` with the reason (a dead letter).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from hl7.mllp import open_hl7_connection
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from sqlalchemy.orm import Session

from core import codes
from core.domain import Priority, TriageResult
from core.settings import Hl7Destination, Hl7Settings
from ris.hl7 import escape, field_component, read_header
from store import outbox
from store.index import UNOWNED, Index
from store.outbox import Channel, DeliveryRound, Kind, RetryPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultReport:
    """What one ORU^R01 says about a study."""

    result: TriageResult
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""  # DICOM PN: family^given^middle^prefix^suffix, as XPN
    accession_number: str = ""
    placer_order_number: str = ""
    filler_order_number: str = ""
    sr_sop_instance_uid: str = ""
    correction: bool = False  # supersedes an earlier result (OBR-25 C)


def _cwe(code: codes.Code) -> str:
    return f"{escape(code.value)}^{escape(code.meaning)}^{escape(code.scheme)}"


def _xpn(pn: str) -> str:
    """A DICOM PN (alphabetic group) as HL7 XPN; the HL7 null "" when there is none."""
    parts = [escape(p) for p in pn.split("=", 1)[0].split("^")[:5]]
    return "^".join(parts) if any(parts) else '""'


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def _observations(report: ResultReport) -> list[tuple[str, codes.Code, str, str]]:
    """(value type, OBX-3, OBX-5 (escaped), OBX-6) of each value present."""
    r = report.result
    priority = Priority(r.priority)
    obs: list[tuple[str, codes.Code, str, str]] = [
        ("CWE", codes.WAITING_LIST_PRIORITY, _cwe(codes.PRIORITY_CODES[priority.value]), "")
    ]
    if r.priority_headline:
        obs.append(("ST", codes.PRIORITY_STATEMENT, escape(r.priority_headline), ""))
    obs.extend(
        ("CWE", codes.PRIORITY_DRIVER, _cwe(codes.DRIVER_CODES[driver]), "")
        for driver in r.priority_drivers
        if driver in codes.DRIVER_CODES
    )
    if r.ai_priority is not None:
        ai = codes.PRIORITY_CODES[Priority(r.ai_priority).value]
        obs.append(("CWE", codes.AI_PRIORITY, _cwe(ai), ""))
    if r.referral_urgency is not None:
        obs.append(
            ("CWE", codes.REFERRAL_URGENCY, _cwe(codes.REFERRAL_CODES[r.referral_urgency]), "")
        )
    if r.days_waited is not None:
        obs.append(("NM", codes.DAYS_SINCE_REQUEST, str(int(r.days_waited)), "d^day^UCUM"))
    if r.case_likelihood is not None:
        obs.append(("NM", codes.CASE_LIKELIHOOD, _fmt(r.case_likelihood, 3), "1^no units^UCUM"))
    if r.gland_volume_ml is not None:
        obs.append(("NM", codes.GLAND_VOLUME, _fmt(r.gland_volume_ml, 1), "mL^milliliter^UCUM"))
    if r.psa_density is not None:
        unit = "ng/mL/mL^nanogram per milliliter per milliliter^UCUM"
        obs.append(("NM", codes.PSA_DENSITY, _fmt(r.psa_density, 3), unit))
    if priority is not Priority.NOT_ANALYSED:
        obs.append(("NM", codes.LESION_COUNT, str(len(r.lesions)), "{#}^count^UCUM"))
    if r.domain_gate is not None:
        obs.append(("CWE", codes.DOMAIN_GATE, _cwe(codes.DOMAIN_GATE_CODES[r.domain_gate]), ""))
    if r.model is not None:
        obs.append(("ST", codes.AI_MODEL, escape(f"{r.model.name} {r.model.version}"), ""))
    if r.disclaimer:
        obs.append(("ST", codes.NOT_CLINICAL, escape(r.disclaimer), ""))
    if r.reason:
        reason = codes.not_analysed_reason(r.reason.get("code", ""))
        obs.append(("CWE", codes.NOT_ANALYSED_REASON, _cwe(reason), ""))
    obs.append(("ST", codes.STUDY_UID, escape(r.study_instance_uid), ""))
    if report.sr_sop_instance_uid:
        obs.append(("ST", codes.SR_INSTANCE, escape(report.sr_sop_instance_uid), ""))
    return obs


def build_oru(
    report: ResultReport,
    destination: Hl7Destination,
    settings: Hl7Settings,
    control_id: str,
    now: datetime | None = None,
) -> str:
    """The ORU^R01 (ER7, segments separated by CR), validated against the v2.5.1 structure."""
    ts = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    status = "C" if report.correction else "P"
    pid3 = escape(report.patient_id) or '""'
    if report.issuer_of_patient_id:
        pid3 += f"^^^{escape(report.issuer_of_patient_id)}"
    placer = escape(report.placer_order_number)
    filler = escape(report.filler_order_number)
    segments = [
        "|".join(
            [
                "MSH",
                "^~\\&",
                escape(settings.sending_application),
                escape(settings.sending_facility),
                escape(destination.receiving_application),
                escape(destination.receiving_facility),
                ts,
                "",
                "ORU^R01^ORU_R01",
                escape(control_id),
                "P",
                "2.5.1",
            ]
        ),
        f"PID|1||{pid3}||{_xpn(report.patient_name)}",
        f"ORC|RE|{placer}|{filler}||CM",
        "|".join(
            ["OBR", "1", placer, filler, _cwe(codes.SERVICE), "", "", ts]
            + [""] * 10
            + [escape(report.accession_number)]
            + [""] * 3
            + [ts, "", "", status]
        ),
    ]
    sub_ids: dict[str, int] = {}
    for i, (kind, code, value, unit) in enumerate(_observations(report), start=1):
        sub_ids[code.value] = sub_ids.get(code.value, 0) + 1
        sub = str(sub_ids[code.value])
        segments.append(f"OBX|{i}|{kind}|{_cwe(code)}|{sub}|{value}|{unit}|||||{status}|||{ts}")
        if i == 1 and report.result.priority_headline:  # the flag's note: what set it
            segments.append(f"NTE|1|L|{escape(report.result.priority_headline)}")
    text = "\r".join(segments) + "\r"
    msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    msg.validate()
    return text


def new_control_id() -> str:
    return "RT" + uuid.uuid4().hex[:18]


def enqueue_result(
    s: Session,
    report: ResultReport,
    settings: Hl7Settings,
    now: float,
    node_id: str = UNOWNED,
) -> list[str]:
    """Queue the report's ORU^R01 for every destination in the caller's transaction (withdrawing
    the study's older pending ORUs to that destination); returns the message control IDs.

    Result status (OBR-25) per destination from what it may already hold, not from
    `report.correction`: C once a result of the study was delivered or tried there, else P (a
    first result withdrawn before it left was never seen by the RIS)."""
    ids = []
    uid = report.result.study_instance_uid
    for destination in settings.destinations:
        control_id = new_control_id()
        heard = outbox.may_have_reached(s, uid, Channel.HL7, destination.name, Kind.ORU)
        message = build_oru(
            replace(report, correction=heard),
            destination,
            settings,
            control_id,
            datetime.fromtimestamp(now, UTC),
        )
        outbox.enqueue(
            s,
            outbox.Message(
                channel=Channel.HL7,
                kind=Kind.ORU,
                study_instance_uid=uid,
                destination=destination.name,
                item_uid=control_id,
                node_id=node_id,
                payload=message,
            ),
            now,
        )
        ids.append(control_id)
    return ids


def parse_ack(text: str) -> tuple[str, str]:
    """(MSA-1 code, error text) of an ACK; ("", why) when it is not one."""
    control, version, kind, _, _ = read_header(text)
    if not kind.startswith("ACK"):
        return "", f"not an ACK ({kind or 'no MSH'})"
    try:
        msg = parse_message(text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.TOLERANT)
    except Exception as exc:  # the RIS's ACK does not parse: count it as no answer
        return "", f"unreadable ACK: {exc}"
    msa = next((c for c in msg.children if c.name == "MSA"), None)
    err = next((c for c in msg.children if c.name == "ERR"), None)
    code = field_component(msa, 1).upper()
    detail = field_component(msa, 3) or field_component(err, 8) or field_component(err, 3, 2)
    del control, version
    return code, detail


async def _exchange(host: str, port: int, message: str, timeout: float) -> str:
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port), timeout)
    try:
        writer.writeblock(message.encode("utf-8"))
        await writer.drain()
        block = await asyncio.wait_for(reader.readblock(), timeout)
        return bytes(block).decode("utf-8", errors="replace")
    finally:
        writer.close()


def send_message(host: str, port: int, message: str, timeout: float) -> str:
    """Send one message over MLLP and return the peer's answer (raises on no answer)."""
    return asyncio.run(_exchange(host, port, message, timeout))


class Hl7Sender:
    """The HL7 channel of this node's outbox; `run_once` does one round."""

    def __init__(
        self,
        index: Index,
        settings: Hl7Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.settings = settings
        self.policy = RetryPolicy.of(settings)
        self.destinations = {d.name: d for d in settings.destinations}
        self.clock = clock

    def run_once(self) -> int:
        """Send every due message, in order per study and destination; returns how many the RIS
        accepted."""
        round_ = DeliveryRound()
        sent = 0
        for item in outbox.due(self.index, Channel.HL7, self.clock()):
            if not round_.may_send(item) or not outbox.still_pending(self.index, item.id):
                continue  # an older message of the study failed (keep the order), or withdrawn
            name = item.destination
            destination = self.destinations.get(name)
            if destination is None:
                round_.failed(item)
                self._failed(item, f"destination {name!r} not configured", permanent=True)
                continue
            try:
                answer = send_message(
                    destination.host,
                    destination.port,
                    item.payload or "",
                    self.settings.ack_timeout_s,
                )
                code, detail = parse_ack(answer)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                code, detail = "", f"no ACK from {name}: {type(exc).__name__}: {exc}"
            if code in ("AA", "CA"):
                with self.index.write() as s:
                    outbox.record_sent(s, item.id, self.clock())
                sent += 1
                continue
            round_.failed(item)
            if code in ("AR", "CR"):
                self._failed(item, f"{code} from {name}: {detail}", permanent=True)
            else:
                self._failed(item, f"{code} from {name}: {detail}" if code else detail)
        return sent

    def _failed(self, item: outbox.DueItem, why: str, permanent: bool = False) -> None:
        with self.index.write() as s:
            outbox.record_failure(s, item.id, why, self.clock(), self.policy, permanent=permanent)
