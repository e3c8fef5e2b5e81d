"""FHIR R4: orders in (``POST /fhir/ServiceRequest``), results out (``GET /fhir/DiagnosticReport``,
``GET /fhir/Observation``), behind the API's authentication (clinical roles).

Orders take the same path as HL7 v2 (`ris.orders.apply_order`, one transaction):

==========================  ==================================================================
ServiceRequest              order
==========================  ==================================================================
identifier (type PLAC)      placer order number (system = namespace); required
identifier (type FILL)      filler order number
identifier (type ACSN)      Accession Number
subject.identifier          Patient ID (value) and issuer (system, ``urn:oid:`` stripped)
status                      active -> new or change; revoked / entered-in-error -> cancel
priority                    stat -> urgent; asap, urgent -> soon; routine -> routine
authoredOn                  request date (the waiting-list clock)
reasonCode code             2WW, USC or SCP: suspected-cancer pathway
note.text                   clinical details
contained Observation       LOINC 2857-1, valueQuantity in ng/mL: PSA
==========================  ==================================================================

Results are mapped as HL7's "DICOM SR to FHIR Resource Mapping" guide maps a TID 1500
Measurement Report: one DiagnosticReport per triage SR (identifier = the SR's SOP Instance UID
as ``urn:oid:``, code = DCM 126000 Imaging Measurement Report, status ``preliminary``: an
unverified AI result; ``result`` = the measurement group Observation), one Observation per
measurement group (DCM 125007, ``hasMember`` its measurements) and one per measurement or
qualitative evaluation (code = the SR concept name, valueQuantity with UCUM units or
valueCodeableConcept, ``derivedFrom`` the imaging study by Study Instance UID, ``device`` the
algorithm name and version, ``method`` DCM 123110 Artificial Intelligence, ``bodySite`` SCT
41216001 Prostate). Searches are paginated (``_count`` up to 500, ``_offset``; Bundle ``next``
link) and filter by ``identifier`` (Accession Number or SR SOP Instance UID) and
``subject:identifier`` (Patient ID).

With ``[hl7] fhir_base_url`` set, every decision of the waiting list is also pushed to a FHIR
server by PUT: `enqueue_fhir_result` queues its resources in the one outbox (channel ``fhir``;
a newer decision withdraws the older pending push) and `FhirSender` is the channel's
transport.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from core import codes
from core.domain import Priority, ReferralUrgency, TriageResult
from core.periodic import Periodic
from ris.orders import (
    SUSPECTED_CANCER_CODES,
    Order,
    OrderControl,
    OrderError,
    OrderUpdate,
    apply_order,
)
from store import outbox
from store.index import Index, Patient, Study
from store.outbox import Channel, Kind, RetryPolicy
from store.results import Decision, WaitingListEntry

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
PRIVATE = "urn:radtriage:codes"  # 99RADTRIAGE (docs/conformance.md)
MAX_COUNT = 500

# Route parameters (module level: FastAPI resolves the annotations here).
Count = Annotated[int, Query(alias="_count", ge=1, le=MAX_COUNT)]
Offset = Annotated[int, Query(alias="_offset", ge=0)]
Identifier = Annotated[str | None, Query(max_length=200)]
Subject = Annotated[str | None, Query(alias="subject:identifier", max_length=200)]
IndexOf = Callable[[Request], Index]


def _index_of_app(request: Request) -> Index:
    return request.app.state.ctx.index  # type: ignore[no-any-return]


def _coding(code: codes.Code) -> dict[str, str]:
    system = {"DCM": DCM, "SCT": SCT, "LN": LOINC, "UCUM": UCUM}.get(code.scheme, PRIVATE)
    return {"system": system, "code": code.value, "display": code.meaning}


def _concept(code: codes.Code) -> dict[str, Any]:
    return {"coding": [_coding(code)], "text": code.meaning}


def _uid(uid: str) -> dict[str, str]:
    return {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}


def outcome(status: int, diagnostics: str, code: str = "invalid") -> JSONResponse:
    """An OperationOutcome error answer."""
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


# --- orders in -----------------------------------------------------------------------------


def _identifier(resource: dict[str, Any], type_code: str) -> tuple[str, str]:
    for ident in resource.get("identifier") or []:
        for coding in (ident.get("type") or {}).get("coding") or []:
            if coding.get("system") == V2_0203 and coding.get("code") == type_code:
                return str(ident.get("value") or ""), str(ident.get("system") or "")
    return "", ""


def _psa(resource: dict[str, Any]) -> float | None:
    for contained in resource.get("contained") or []:
        if contained.get("resourceType") != "Observation":
            continue
        loinc = [
            c
            for c in (contained.get("code") or {}).get("coding") or []
            if c.get("system") == LOINC and c.get("code") == "2857-1"
        ]
        if not loinc:
            continue
        quantity = contained.get("valueQuantity") or {}
        unit = str(quantity.get("code") or quantity.get("unit") or "").lower()
        if unit not in {"ng/ml", "ug/l"}:
            raise ValueError(f"PSA unit {unit!r} not accepted (ng/mL)")
        return float(quantity["value"])
    return None


def order_update(resource: dict[str, Any], exists: Callable[[str, str], bool]) -> OrderUpdate:
    """A validated R4 ServiceRequest as an order event; raise ValueError saying what is wrong."""
    from fhir.resources.R4B.servicerequest import ServiceRequest

    if resource.get("resourceType") != "ServiceRequest":
        raise ValueError("resourceType must be ServiceRequest")
    try:
        request = ServiceRequest.model_validate(resource)
    except ValidationError as exc:
        raise ValueError(f"not a valid FHIR ServiceRequest: {exc.errors()[0]['msg']}") from exc
    placer, namespace = _identifier(resource, "PLAC")
    if not placer:
        raise ValueError("an identifier of type PLAC (placer order number) is required")
    accession, _ = _identifier(resource, "ACSN")
    filler, _ = _identifier(resource, "FILL")
    subject = (resource.get("subject") or {}).get("identifier") or {}
    issuer = str(subject.get("system") or "").removeprefix("urn:oid:")
    if request.status in ("revoked", "entered-in-error"):
        control = OrderControl.CANCEL
    elif request.status == "active":
        control = OrderControl.CHANGE if exists(namespace, placer) else OrderControl.NEW
    else:
        raise ValueError(f"status {request.status!r} not accepted (active, revoked)")
    reasons = {
        str(c.code).upper()
        for rc in request.reasonCode or []
        for c in rc.coding or []
        if c.code is not None
    }
    notes = " ".join(str(n.text) for n in request.note or [] if n.text)
    authored = request.authoredOn
    request_date = None
    if authored is not None:
        request_date = authored.date() if isinstance(authored, datetime) else authored
    return OrderUpdate(
        control=control,
        placer_order_number=placer,
        placer_namespace=namespace,
        filler_order_number=filler,
        accession_number=accession,
        patient_id=str(subject.get("value") or ""),
        issuer_of_patient_id=issuer,
        referral_urgency=ReferralUrgency.from_fhir(request.priority) if request.priority else None,
        request_date=request_date,
        suspected_cancer_pathway=bool(reasons & SUSPECTED_CANCER_CODES) if reasons else None,
        clinical_details=notes or None,
        psa_ng_ml=_psa(resource),
        source="fhir",
    )


# --- results out ---------------------------------------------------------------------------


def _quantity(value: float, unit: codes.Code | str) -> dict[str, Any]:
    code = unit if isinstance(unit, str) else unit.value
    return {"value": value, "unit": code, "system": UCUM, "code": code}


def result_resources(
    result: TriageResult,
    *,
    sr_sop_instance_uid: str,
    patient_id: str,
    issuer: str,
    accession: str,
    issued: datetime,
    decisions: int = 1,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The DiagnosticReport and its Observations for one triage result (TID 1500 mapping).

    One DiagnosticReport per study (its id derives from the Study Instance UID), updated in
    place: ``preliminary`` for the first decision, ``amended`` once the flag was decided again
    (clock, order), ``corrected`` when a radiologist's override set it. The flag's Observation
    carries the drivers and the AI's own opinion as components; the conclusion states the flag
    naming its driver."""
    report_id = "rt-" + hashlib.sha256(result.study_instance_uid.encode()).hexdigest()[:40]
    drivers = [d for d in result.priority_drivers if d in codes.DRIVER_CODES]
    status = "preliminary"
    if drivers[:1] == ["human_override"]:
        status = "corrected"
    elif decisions > 1:
        status = "amended"
    subject: dict[str, Any] = {"identifier": {"value": patient_id}, "type": "Patient"}
    if issuer:
        subject["identifier"]["system"] = f"urn:oid:{issuer}" if issuer[0].isdigit() else issuer
    derived = [{"type": "ImagingStudy", "identifier": _uid(result.study_instance_uid)}]
    device = (
        {"display": f"{result.model.name} {result.model.version}"}
        if result.model
        else {"display": "radtriage"}
    )
    common = {
        "status": status,
        "subject": subject,
        "derivedFrom": derived,
        "device": device,
        "method": _concept(codes.Code("123110", "DCM", "Artificial Intelligence")),
        "bodySite": _concept(codes.Code("41216001", "SCT", "Prostate")),
        "issued": issued.isoformat(),
    }
    members: list[dict[str, Any]] = []

    def add(code: codes.Code, **value: Any) -> None:
        n = len(members) + 1
        members.append(
            {
                "resourceType": "Observation",
                "id": f"{report_id}-{n}"[:64],
                "code": _concept(code),
                **common,
                **value,
            }
        )

    priority = Priority(result.priority)
    components = [
        {"code": _concept(codes.PRIORITY_DRIVER), "valueCodeableConcept": _concept(code)}
        for code in (codes.DRIVER_CODES[d] for d in drivers)
    ]
    if result.ai_priority is not None:
        ai = codes.PRIORITY_CODES[Priority(result.ai_priority)]
        components.append(
            {"code": _concept(codes.AI_PRIORITY), "valueCodeableConcept": _concept(ai)}
        )
    flag: dict[str, Any] = {"valueCodeableConcept": _concept(codes.PRIORITY_CODES[priority])}
    if components:
        flag["component"] = components
    if result.priority_headline:
        flag["note"] = [{"text": result.priority_headline}]
    add(codes.WAITING_LIST_PRIORITY, **flag)
    if result.referral_urgency is not None:
        urgency = codes.REFERRAL_CODES[result.referral_urgency]
        add(codes.REFERRAL_URGENCY, valueCodeableConcept=_concept(urgency))
    if result.days_waited is not None:
        add(codes.DAYS_SINCE_REQUEST, valueQuantity=_quantity(result.days_waited, "d"))
    if result.case_likelihood is not None:
        add(codes.CASE_LIKELIHOOD, valueQuantity=_quantity(result.case_likelihood, "1"))
    if result.domain_gate is not None:
        gate = codes.DOMAIN_GATE_CODES[result.domain_gate]
        add(codes.DOMAIN_GATE, valueCodeableConcept=_concept(gate))
    if result.gland_volume_ml is not None:
        add(
            codes.Code("118565006", "SCT", "Volume"),
            valueQuantity=_quantity(result.gland_volume_ml, "mL"),
        )
    if result.psa_density is not None:
        add(codes.PSA_DENSITY, valueQuantity=_quantity(result.psa_density, "ng/mL/mL"))
    for lesion in result.lesions:
        add(
            codes.LESION_LIKELIHOOD,
            valueQuantity=_quantity(lesion.likelihood, "1"),
            component=[
                {
                    "code": _concept(codes.Code("118565006", "SCT", "Volume")),
                    "valueQuantity": _quantity(lesion.volume_ml, "mL"),
                }
            ],
        )
    if result.reason:
        reason = codes.not_analysed_reason(result.reason.get("code", ""))
        add(codes.NOT_ANALYSED_REASON, valueCodeableConcept=_concept(reason))
    group = {
        "resourceType": "Observation",
        "id": f"{report_id}-0"[:64],
        "code": _concept(codes.Code("125007", "DCM", "Measurement Group")),
        **common,
        "hasMember": [{"reference": f"Observation/{m['id']}"} for m in members],
    }
    conclusion = result.priority_headline or f"Waiting-list priority: {priority.value}"
    if result.disclaimer:
        conclusion += f". {result.disclaimer}"
    identifiers: list[dict[str, Any]] = [_uid(result.study_instance_uid), _uid(sr_sop_instance_uid)]
    if accession:
        identifiers.append(
            {
                "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                "value": accession,
            }
        )
    report = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "identifier": identifiers,
        "status": status,
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": _concept(codes.Code("126000", "DCM", "Imaging Measurement Report")),
        "subject": subject,
        "issued": issued.isoformat(),
        "effectiveDateTime": issued.isoformat(),
        "result": [{"reference": f"Observation/{group['id']}"}],
        "conclusion": conclusion,
        "conclusionCode": [
            _concept(codes.PRIORITY_CODES[priority]),
            *(_concept(codes.DRIVER_CODES[d]) for d in drivers),
        ],
    }
    return report, [group, *members]


def _rows(
    index: Index, identifier: str | None, subject: str | None, offset: int, count: int
) -> tuple[int, list[tuple[Study, Patient, str | None, int]]]:
    with index.read() as s:
        decisions = (
            select(func.count(Decision.id))
            .where(Decision.study_instance_uid == Study.study_instance_uid)
            .scalar_subquery()
        )
        q = (
            select(Study, Patient, WaitingListEntry.sr_sop_instance_uid, decisions)
            .join(Patient, Study.patient_fk == Patient.id)
            .outerjoin(
                WaitingListEntry,
                WaitingListEntry.study_instance_uid == Study.study_instance_uid,
            )
            .where(
                Study.result_json.is_not(None),
                index.mine(Study.node_id),
                index.in_site(Study.site_id),
            )
        )
        if identifier:
            value = identifier.rpartition("|")[2].removeprefix("urn:oid:")
            q = q.where(
                or_(
                    Study.accession_number == value,
                    WaitingListEntry.sr_sop_instance_uid == value,
                    Study.study_instance_uid == value,
                )
            )
        if subject:
            q = q.where(Patient.patient_id == subject.rpartition("|")[2])
        total = int(s.scalar(select(func.count()).select_from(q.subquery())) or 0)
        rows = s.execute(q.order_by(Study.id).offset(offset).limit(count)).all()
        return total, [(r[0], r[1], r[2], int(r[3] or 0)) for r in rows]


def _sr_uid(study: Study, entry_uid: str | None) -> str:
    if entry_uid:
        return entry_uid
    if study.previous_sr_path:
        try:
            import pydicom

            return str(
                pydicom.dcmread(study.previous_sr_path, stop_before_pixels=True).SOPInstanceUID
            )
        except Exception:  # an unreadable SR file: the study UID stands in
            pass
    return study.study_instance_uid


def _bundle(
    request: Request,
    total: int,
    offset: int,
    count: int,
    resources: list[dict[str, Any]],
    public_url: str | None = None,
) -> JSONResponse:
    """A searchset Bundle. Links are built from `public_url` (``[http] public_url``) and the
    request's path and parsed query, never from its Host header; relative without it."""
    root = (public_url or "").rstrip("/")
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "_offset"]
    base = root + request.url.path

    def url(extra: list[tuple[str, str]]) -> str:
        query = urlencode(params + extra)
        return f"{base}?{query}" if query else base

    link = [{"relation": "self", "url": url([("_offset", str(offset))] if offset else [])}]
    if offset + count < total:
        link.append({"relation": "next", "url": url([("_offset", str(offset + count))])})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": link,
        "entry": [
            {
                "fullUrl": f"{root}/fhir/{r['resourceType']}/{r['id']}"
                if root
                else f"{r['resourceType']}/{r['id']}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in resources
        ],
    }
    return JSONResponse(bundle, media_type=FHIR_JSON)


def _resources_for(
    study: Study, patient: Patient, entry_uid: str | None, decisions: int = 1
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    result = TriageResult.model_validate(json.loads(study.result_json or "{}"))
    return result_resources(
        result,
        sr_sop_instance_uid=_sr_uid(study, entry_uid),
        patient_id=patient.patient_id,
        issuer=getattr(patient, "issuer_of_patient_id", "") or "",
        accession=study.accession_number,
        issued=datetime.fromtimestamp(study.reported_at or 0.0, UTC),
        decisions=decisions,
    )


#: The outbox destination of the FHIR channel (one server: ``[hl7] fhir_base_url``).
FHIR_DESTINATION = "fhir"

#: HTTP answers that will not change on a retry (the server refuses the resource itself).
_PERMANENT = frozenset({400, 401, 403, 404, 405, 409, 410, 412, 413, 415, 422})


def enqueue_fhir_result(
    s: Session,
    result: TriageResult,
    *,
    sr_sop_instance_uid: str,
    patient_id: str,
    issuer: str,
    accession: str,
    now: float,
    node_id: str,
) -> int:
    """Queue the FHIR resources of one decision (its Observations, then its DiagnosticReport)
    in the caller's transaction; the study's older pending push is withdrawn (latest wins)."""
    decisions = s.scalar(
        select(func.count(Decision.id)).where(
            Decision.study_instance_uid == result.study_instance_uid
        )
    )
    report, observations = result_resources(
        result,
        sr_sop_instance_uid=sr_sop_instance_uid,
        patient_id=patient_id,
        issuer=issuer,
        accession=accession,
        issued=datetime.fromtimestamp(now, UTC),
        decisions=int(decisions or 1),
    )
    return outbox.enqueue(
        s,
        outbox.Message(
            channel=Channel.FHIR,
            kind=Kind.FHIR_REPORT,
            study_instance_uid=result.study_instance_uid,
            destination=FHIR_DESTINATION,
            item_uid="fhir-" + uuid.uuid4().hex,
            node_id=node_id,
            payload=json.dumps([*observations, report]),
        ),
        now,
    )


class FhirSender:
    """The FHIR channel of this node's outbox (``[hl7] fhir_base_url``): each due item's
    resources by ``PUT [base]/[type]/[id]`` in order (update as create: ids derive from the
    study, so each decision replaces the last). A network error or a 5xx/408/429 answer is
    retried with the outbox's backoff (``[hl7]`` retry keys); any other 4xx makes a dead
    letter.
    `run_once` does one round; `start`/`stop` run it every `interval_s` in a thread."""

    def __init__(
        self,
        index: Index,
        base_url: str,
        *,
        policy: RetryPolicy | None = None,
        timeout_s: float = 10.0,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"fhir_base_url must be an http(s) URL, got {base_url!r}")
        self.index = index
        self.base_url = base_url.rstrip("/")
        self.policy = policy or RetryPolicy()
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.clock = clock
        self._rounds = Periodic(self.run_once, interval_s, "radtriage-fhir-push")

    def _put(self, resource: dict[str, Any]) -> None:
        from urllib.parse import quote

        url = f"{self.base_url}/{resource['resourceType']}/{quote(resource['id'], safe='')}"
        request = urllib.request.Request(
            url,
            data=json.dumps(resource).encode("utf-8"),
            method="PUT",
            headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            if not 200 <= response.status < 300:
                raise OSError(f"{url}: HTTP {response.status}")

    def run_once(self) -> int:
        """Push every due item of this node, in order per study; returns how many were pushed."""
        round_ = outbox.DeliveryRound()
        pushed = 0
        for item in outbox.due(self.index, Channel.FHIR, self.clock()):
            if not round_.may_send(item) or not outbox.still_pending(self.index, item.id):
                continue  # an older push of the study failed (keep the order), or withdrawn
            permanent = False
            try:
                for resource in json.loads(item.payload or "[]"):
                    self._put(resource)
            except urllib.error.HTTPError as exc:
                error = f"FHIR server answered HTTP {exc.code}"
                permanent = exc.code in _PERMANENT
            except (OSError, urllib.error.URLError) as exc:
                error = f"FHIR push failed: {type(exc).__name__}: {exc}"
            else:
                with self.index.write() as s:
                    outbox.record_sent(s, item.id, self.clock())
                pushed += 1
                continue
            round_.failed(item)
            with self.index.write() as s:
                outbox.record_failure(
                    s, item.id, error, self.clock(), self.policy, permanent=permanent
                )
        return pushed

    def start(self) -> None:
        self._rounds.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._rounds.stop(timeout)


def _caller(request: Request) -> dict[str, str]:
    """Who an audit event is of: the signed-in principal and their address."""
    who = getattr(request.state, "principal", None)
    return {
        "user": getattr(who, "name", ""),
        "role": getattr(who, "role", ""),
        "address": request.client.host if request.client else "",
    }


def create_fhir_router(
    index_of: IndexOf = _index_of_app,
    *,
    dependencies: Sequence[Any] = (),
    public_url: str | None = None,
) -> APIRouter:
    """The /fhir routes; `index_of` finds the index for a request (the app's ApiContext).
    Authentication comes from the composition root as route `dependencies`; bundle links are
    built from `public_url` (``[http] public_url``), never from the Host header."""
    router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=list(dependencies))

    @router.post("/ServiceRequest", status_code=201, response_model=None)
    def service_request(request: Request, body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
        index = index_of(request)

        def exists(namespace: str, placer: str) -> bool:
            with index.read() as s:
                return (
                    s.scalar(
                        select(Order.id).where(
                            Order.site_id == index.site,
                            Order.placer_namespace == namespace,
                            Order.placer_order_number == placer,
                        )
                    )
                    is not None
                )

        try:
            # the order is of this route's site: it matches only this site's studies
            update_ = dataclasses.replace(order_update(body, exists), site_id=index.site)
            applied: dict[str, Any] = {}

            def change(s: Session) -> None:
                order = apply_order(s, update_, time.time())
                applied.update(state=order.state, matched=order.study_instance_uid)

            trail = getattr(request.app.state, "audit", None)
            if trail is None:
                with index.write() as s:
                    change(s)
            else:  # the order and its audit event commit together
                trail.append(
                    "fhir_order",
                    **_caller(request),
                    detail={
                        "placer_namespace": update_.placer_namespace,
                        "placer_order_number": update_.placer_order_number,
                    },
                    change=change,
                )
            state, matched = applied["state"], applied["matched"]
        except OrderError as exc:
            return outcome(404, str(exc), code="not-found")
        except ValueError as exc:  # our own messages (`order_update`, `OrderUpdate`)
            return outcome(400, str(exc))
        except (TypeError, KeyError, AttributeError):  # a body of unexpected shape: no internals
            return outcome(400, "not a valid FHIR ServiceRequest")
        echo = {**body, "id": f"{update_.placer_namespace}-{update_.placer_order_number}"[:64]}
        echo.setdefault("meta", {})["tag"] = [
            {"system": PRIVATE, "code": state},
            {"system": PRIVATE, "code": "matched" if matched else "waiting-for-images"},
        ]
        return JSONResponse(echo, status_code=201, media_type=FHIR_JSON)

    def _search(
        request: Request,
        identifier: str | None,
        subject: str | None,
        offset: int,
        count: int,
        observations: bool,
    ) -> JSONResponse:
        total, rows = _rows(index_of(request), identifier, subject, offset, count)
        trail = getattr(request.app.state, "audit", None)
        if trail is not None:
            trail.append("fhir_search", **_caller(request), detail={"query": request.url.query})
        resources: list[dict[str, Any]] = []
        for study, patient, entry_uid, decisions in rows:
            report, members = _resources_for(study, patient, entry_uid, decisions)
            resources.extend(members if observations else [report])
        return _bundle(request, total, offset, count, resources, public_url)

    @router.get("/DiagnosticReport", response_model=None)
    def diagnostic_reports(
        request: Request,
        identifier: Identifier = None,
        subject: Subject = None,
        count: Count = 50,
        offset: Offset = 0,
    ) -> JSONResponse:
        return _search(request, identifier, subject, offset, count, observations=False)

    @router.get("/Observation", response_model=None)
    def observations(
        request: Request,
        identifier: Identifier = None,
        subject: Subject = None,
        count: Count = 50,
        offset: Offset = 0,
    ) -> JSONResponse:
        """Observations of the studies on this page (``_count`` counts studies)."""
        return _search(request, identifier, subject, offset, count, observations=True)

    return router
