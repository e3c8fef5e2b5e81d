"""DICOM audit messages (PS3.15 A.5) for the audit trail's events: the ATNA record of who did
what to which patient's data, for a hospital's audit repository.

`audit_message` maps one `workspace.audit.AuditTrail` event to the A.5 XML of its kind:

| our actions | A.5.3 message (EventID, DCM) | EventActionCode / EventTypeCode |
|---|---|---|
| login, login_failed, login_refused, logout | User Authentication (110114) | E / Login, Logout |
| view_study, view_study_page, images, sr, seg, ... | Patient Record (110110) | R |
| acknowledge, reported, override, finding, pirads, biopsy | Patient Record (110110) | U |
| qido, query, search, worklist, fhir_search | Query (110112) | E |
| wado, wado_retrieve (instances sent out) | DICOM Instances Transferred (110104) | R |
| stow, stow_rs (instances received) | DICOM Instances Transferred (110104) | C |
| order, order_created, order_updated, hl7_order, fhir_order | Order Record (110109) | C / U |
| application_start, application_stop | Application Activity (110100) | E / Start, Stop |
| user_added, user_disabled, token_issued; others | Security Alert (110113) | E / 110137, 110132 |

An action not in the table is a Patient Record read when it names a study, otherwise a Security
Alert (Use of Restricted Function): nothing is dropped for want of a mapping.
"""

from __future__ import annotations

import base64
import ipaddress
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Code:
    """A coded value (csd-code, codeSystemName, originalText)."""

    value: str
    meaning: str
    scheme: str = "DCM"

    def element(self, parent: ET.Element, tag: str) -> ET.Element:
        return ET.SubElement(
            parent,
            tag,
            {"csd-code": self.value, "codeSystemName": self.scheme, "originalText": self.meaning},
        )


# EventID (CID 400)
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
ORDER_RECORD = Code("110109", "Order Record")
PATIENT_RECORD = Code("110110", "Patient Record")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
# EventTypeCode (CID 401)
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
LOGIN = Code("110122", "Login")
LOGOUT = Code("110123", "Logout")
RESTRICTED_FUNCTION = Code("110132", "Use of Restricted Function")
USER_SECURITY_CHANGED = Code("110137", "User Security Attributes Changed")
# RoleIDCode (CID 402) and ParticipantObjectIDTypeCode (CID 404, RFC 3881)
APPLICATION = Code("110150", "Application")
DESTINATION = Code("110152", "Destination Role ID")
SOURCE = Code("110153", "Source Role ID")
STUDY_UID = Code("110180", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "SOP Class UID")
PATIENT_NUMBER = Code("2", "Patient Number", "RFC-3881")
USER_IDENTIFIER = Code("11", "User Identifier", "RFC-3881")
APPLICATION_SERVER = Code("4", "Application Server Process Tier in a multi-tier system")
#: the SOP Class a QIDO-RS study search stands for (Study Root Query/Retrieve - FIND)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"


@dataclass(frozen=True)
class EventKind:
    event_id: Code
    action_code: str  # C R U D E
    type_code: Code | None = None
    outcome: str = SUCCESS


_AUTH = {
    "login": EventKind(USER_AUTHENTICATION, "E", LOGIN),
    "login_failed": EventKind(USER_AUTHENTICATION, "E", LOGIN, MINOR_FAILURE),
    "login_refused": EventKind(USER_AUTHENTICATION, "E", LOGIN, MINOR_FAILURE),
    "logout": EventKind(USER_AUTHENTICATION, "E", LOGOUT),
}
_READS = ("view_study", "view_study_page", "images", "image", "sr", "seg", "assessment")
_CHANGES = ("acknowledge", "reported", "override", "finding", "pirads", "biopsy")
_QUERIES = ("qido", "query", "search", "worklist", "fhir_search")
_ORDERS = {"order": "C", "order_created": "C", "hl7_order": "C", "fhir_order": "C"}
KINDS: dict[str, EventKind] = {
    **_AUTH,
    **{a: EventKind(PATIENT_RECORD, "R") for a in _READS},
    **{a: EventKind(PATIENT_RECORD, "U") for a in _CHANGES},
    **{a: EventKind(QUERY, "E") for a in _QUERIES},
    "wado": EventKind(INSTANCES_TRANSFERRED, "R"),
    "wado_retrieve": EventKind(INSTANCES_TRANSFERRED, "R"),
    "stow": EventKind(INSTANCES_TRANSFERRED, "C"),
    "stow_rs": EventKind(INSTANCES_TRANSFERRED, "C"),
    **{a: EventKind(ORDER_RECORD, c) for a, c in _ORDERS.items()},
    "order_updated": EventKind(ORDER_RECORD, "U"),
    "application_start": EventKind(APPLICATION_ACTIVITY, "E", APPLICATION_START),
    "application_stop": EventKind(APPLICATION_ACTIVITY, "E", APPLICATION_STOP),
    **{
        a: EventKind(SECURITY_ALERT, "E", USER_SECURITY_CHANGED)
        for a in ("user_added", "user_disabled", "token_issued", "token_revoked", "role_changed")
    },
}


def event_kind(event: dict[str, Any]) -> EventKind:
    """The A.5.3 message an audit event becomes (see the module's table)."""
    kind = KINDS.get(event["action"])
    if kind is not None:
        outcome = str((event.get("detail") or {}).get("outcome", kind.outcome))
        if outcome in (SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, "12") and outcome != kind.outcome:
            return EventKind(kind.event_id, kind.action_code, kind.type_code, outcome)
        return kind
    if event.get("study_instance_uid"):
        return EventKind(PATIENT_RECORD, "R")
    return EventKind(SECURITY_ALERT, "E", RESTRICTED_FUNCTION)


@dataclass(frozen=True)
class AuditSource:
    """Who reports: AuditSourceID (our node), the site, and this host's name or address."""

    source_id: str
    host: str
    enterprise_site_id: str = ""
    application: str = "radtriage"


def _access_point(address: str) -> tuple[str, str]:
    """NetworkAccessPointID and its type code: 2 for an IP address, 1 for a machine name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return address, "1"
    return address, "2"


def _token(value: Any, limit: int = 256) -> str:
    """Attribute text: printable, bounded (fields come from requests and are hostile)."""
    text = "".join(ch for ch in str(value) if ch.isprintable())
    return text[:limit]


def _participant(
    root: ET.Element,
    user_id: str,
    *,
    requestor: bool,
    address: str = "",
    user_name: str = "",
    role: Code | None = None,
) -> None:
    attrs = {"UserID": _token(user_id or "unknown"), "UserIsRequestor": str(requestor).lower()}
    if user_name:
        attrs["UserName"] = _token(user_name)
    if address:
        point, point_type = _access_point(_token(address, 64))
        attrs["NetworkAccessPointID"] = point
        attrs["NetworkAccessPointTypeCode"] = point_type
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    if role is not None:
        role.element(element, "RoleIDCode")


def _object(
    root: ET.Element, object_id: str, id_type: Code, type_code: str, type_role: str
) -> ET.Element:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": _token(object_id or "unknown"),
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": type_role,
        },
    )
    id_type.element(element, "ParticipantObjectIDTypeCode")
    return element


def event_time(epoch: float) -> str:
    """xsd:dateTime in UTC with milliseconds."""
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def audit_message(
    event: dict[str, Any], source: AuditSource, patient_id: str | None = None
) -> bytes:
    """The A.5 ``AuditMessage`` of one audit event, UTF-8 XML."""
    kind = event_kind(event)
    detail = event.get("detail") or {}
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": kind.action_code,
            "EventDateTime": event_time(float(event["at"])),
            "EventOutcomeIndicator": kind.outcome,
        },
    )
    kind.event_id.element(ident, "EventID")
    if kind.type_code is not None:
        kind.type_code.element(ident, "EventTypeCode")
    if kind.outcome != SUCCESS:
        ET.SubElement(ident, "EventOutcomeDescription").text = _token(event["action"], 64)

    user, address = event.get("user") or "", event.get("address") or ""
    app_id = source.application
    if kind.event_id == APPLICATION_ACTIVITY:
        _participant(root, app_id, requestor=False, address=source.host, role=APPLICATION)
        if user:
            _participant(root, user, requestor=True, address=address)
    elif kind.event_id in (QUERY, INSTANCES_TRANSFERRED):
        # a query goes from the requester (source) to us; WADO (R) sends instances from us
        # (source) to the requester; STOW (C) from the requester to us
        we_send = kind.event_id == INSTANCES_TRANSFERRED and kind.action_code == "R"
        user_role, app_role = (DESTINATION, SOURCE) if we_send else (SOURCE, DESTINATION)
        _participant(root, user, requestor=True, address=address, user_name=user, role=user_role)
        _participant(root, app_id, requestor=False, address=source.host, role=app_role)
    else:
        requestor = bool(user)
        if user:
            _participant(root, user, requestor=True, address=address, user_name=user)
        _participant(root, app_id, requestor=not requestor, address=source.host)

    audit_source = ET.SubElement(
        root,
        "AuditSourceIdentification",
        {"AuditSourceID": _token(source.source_id or app_id, 64)}
        | (
            {"AuditEnterpriseSiteID": _token(source.enterprise_site_id, 64)}
            if source.enterprise_site_id
            else {}
        ),
    )
    APPLICATION_SERVER.element(audit_source, "AuditSourceTypeCode")

    study = event.get("study_instance_uid")
    if kind.event_id == QUERY:
        query = ET.SubElement(root, "ParticipantObjectIdentification")
        query.attrib.update(
            {
                "ParticipantObjectID": _token(detail.get("sop_class_uid") or STUDY_ROOT_FIND, 64),
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            }
        )
        SOP_CLASS_UID.element(query, "ParticipantObjectIDTypeCode")
        text = _token(detail.get("query", ""), 4096)
        ET.SubElement(query, "ParticipantObjectQuery").text = base64.b64encode(
            text.encode()
        ).decode("ascii")
    if study:
        obj = _object(root, study, STUDY_UID, "2", "3")
        classes = detail.get("sop_classes")
        if isinstance(classes, dict):
            for uid, count in list(classes.items())[:32]:
                ET.SubElement(
                    obj, "SOPClass", {"UID": _token(uid, 64), "NumberOfInstances": str(int(count))}
                )
    if patient_id:
        _object(root, patient_id, PATIENT_NUMBER, "1", "1")
    if kind.event_id == SECURITY_ALERT and detail.get("name"):
        _object(root, str(detail["name"]), USER_IDENTIFIER, "1", "11")
    # one line: syslog receivers escape line breaks inside a message
    return XML_DECLARATION + ET.tostring(root, encoding="unicode").encode("utf-8")
