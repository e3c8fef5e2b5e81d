"""A checker for DICOM audit messages: the structure of PS3.15 A.5.1 (element order, required
attributes, value sets) and the per-message requirements of A.5.3, written from the standard
(not from `workspace.atna`), so that the tests compare our output with the standard's rules."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from datetime import datetime

# PS3.16 CID 400 (Audit Event ID) and CID 401 (Audit Event Type Code), DCM code -> meaning
CID_400 = {
    "110100": "Application Activity",
    "110101": "Audit Log Used",
    "110102": "Begin Transferring DICOM Instances",
    "110103": "DICOM Instances Accessed",
    "110104": "DICOM Instances Transferred",
    "110105": "DICOM Study Deleted",
    "110106": "Export",
    "110107": "Import",
    "110108": "Network Entry",
    "110109": "Order Record",
    "110110": "Patient Record",
    "110111": "Procedure Record",
    "110112": "Query",
    "110113": "Security Alert",
    "110114": "User Authentication",
}
CID_401 = {
    "110120": "Application Start",
    "110121": "Application Stop",
    "110122": "Login",
    "110123": "Logout",
    "110124": "Attach",
    "110125": "Detach",
    "110126": "Node Authentication",
    "110127": "Emergency Override Started",
    "110128": "Network Configuration",
    "110129": "Security Configuration",
    "110130": "Hardware Configuration",
    "110131": "Software Configuration",
    "110132": "Use of Restricted Function",
    "110133": "Audit Recording Stopped",
    "110134": "Audit Recording Started",
    "110135": "Object Security Attributes Changed",
    "110136": "Security Roles Changed",
    "110137": "User Security Attributes Changed",
}
CID_402_ROLES = {"110150", "110151", "110152", "110153", "110154", "110155"}
OBJECT_CHILD_ORDER = [
    "ParticipantObjectIDTypeCode",
    "ParticipantObjectName|ParticipantObjectQuery",
    "ParticipantObjectDetail",
    "ParticipantObjectDescription",
    "SOPClass",
    "Accession",
    "MPPS",
    "ParticipantObjectContainsStudy",
    "Encrypted",
    "Anonymized",
]


def _coded(element: ET.Element, where: str) -> tuple[str, str, str]:
    code = element.get("csd-code")
    scheme = element.get("codeSystemName") or element.get("codeSystem")
    meaning = element.get("originalText")
    assert code and scheme and meaning, f"{where}: csd-code, codeSystemName, originalText"
    return code, scheme, meaning


def _boolean(value: str | None, where: str) -> bool:
    assert value in ("true", "false", "1", "0"), f"{where}: xsd:boolean, got {value!r}"
    return value in ("true", "1")


def check_audit_message(xml: bytes) -> ET.Element:
    """Assert `xml` is a DICOM AuditMessage (A.5.1 and A.5.3); returns its root."""
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification" and tags.count("EventIdentification") == 1
    n_participants = 0
    while tags[1 + n_participants] == "ActiveParticipant":
        n_participants += 1
    assert n_participants >= 1, "at least one ActiveParticipant"
    assert tags[1 + n_participants] == "AuditSourceIdentification"
    assert tags.count("AuditSourceIdentification") == 1
    assert all(t == "ParticipantObjectIdentification" for t in tags[2 + n_participants :])

    event = root[0]
    assert event.get("EventActionCode") in (None, "C", "R", "U", "D", "E")
    when = event.get("EventDateTime") or ""
    datetime.fromisoformat(when.replace("Z", "+00:00"))  # xsd:dateTime
    assert "T" in when and (when.endswith("Z") or "+" in when[10:] or "-" in when[10:])
    assert event.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
    children = [c.tag for c in event]
    assert children[0] == "EventID" and children.count("EventID") == 1
    code, scheme, meaning = _coded(event[0], "EventID")
    assert scheme == "DCM" and CID_400.get(code) == meaning, f"EventID {code} {meaning}"
    types = [_coded(c, "EventTypeCode") for c in event if c.tag == "EventTypeCode"]
    for t_code, t_scheme, t_meaning in types:
        assert t_scheme == "DCM" and CID_401.get(t_code) == t_meaning
    assert set(children) <= {"EventID", "EventTypeCode", "EventOutcomeDescription", "PurposeOfUse"}

    requestors = 0
    for participant in root.findall("ActiveParticipant"):
        assert participant.get("UserID"), "ActiveParticipant UserID"
        requestors += _boolean(participant.get("UserIsRequestor"), "UserIsRequestor")
        point, point_type = (
            participant.get("NetworkAccessPointID"),
            participant.get("NetworkAccessPointTypeCode"),
        )
        assert (point is None) == (point_type is None), "access point ID and type together"
        assert point_type in (None, "1", "2", "3", "4", "5")
        for role in participant.findall("RoleIDCode"):
            _coded(role, "RoleIDCode")
        assert {c.tag for c in participant} <= {"RoleIDCode", "MediaIdentifier"}
    assert requestors <= 1 or code == "110100", "one requestor"

    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID")
    for type_code in source.findall("AuditSourceTypeCode"):
        _coded(type_code, "AuditSourceTypeCode")

    objects = root.findall("ParticipantObjectIdentification")
    for obj in objects:
        assert obj.get("ParticipantObjectID"), "ParticipantObjectID"
        assert obj.get("ParticipantObjectTypeCode") in (None, "1", "2", "3", "4")
        role = obj.get("ParticipantObjectTypeCodeRole")
        assert role is None or 1 <= int(role) <= 24
        order = [
            next(i for i, names in enumerate(OBJECT_CHILD_ORDER) if c.tag in names.split("|"))
            for c in obj
        ]
        assert order == sorted(order) and order[:1] == [0], f"child order of {obj.attrib}"
        _coded(obj[0], "ParticipantObjectIDTypeCode")
        query = obj.find("ParticipantObjectQuery")
        if query is not None:
            base64.b64decode(query.text or "", validate=True)
        for sop in obj.findall("SOPClass"):
            assert sop.get("UID") and int(sop.get("NumberOfInstances", "0")) >= 0

    _check_message_kind(root, code, [t[0] for t in types], objects)
    return root


def _id_type(obj: ET.Element) -> str:
    return obj[0].get("csd-code", "")


def _check_message_kind(
    root: ET.Element, event_id: str, types: list[str], objects: list[ET.Element]
) -> None:
    """The A.5.3 rules of the messages radtriage sends."""
    action = root[0].get("EventActionCode")
    roles = [r.get("csd-code") for p in root.findall("ActiveParticipant") for r in p]
    if event_id == "110114":  # A.5.3.15 User Authentication
        assert action == "E" and len(types) == 1 and types[0] in ("110122", "110123")
    elif event_id == "110100":  # A.5.3.1 Application Activity
        assert action == "E" and types and types[0] in ("110120", "110121")
        assert "110150" in roles, "the application participant (110150)"
    elif event_id == "110112":  # A.5.3.12 Query
        assert action == "E"
        assert "110153" in roles and "110152" in roles
        sop = [o for o in objects if _id_type(o) == "110181"]
        assert len(sop) == 1 and sop[0].find("ParticipantObjectQuery") is not None
    elif event_id == "110104":  # A.5.3.10 Instances Transferred
        assert action in ("C", "R", "U")
        assert "110153" in roles and "110152" in roles
        assert any(_id_type(o) == "110180" for o in objects), "the study"
    elif event_id == "110110":  # A.5.3.9 Patient Record
        assert action in ("C", "R", "U", "D")
    elif event_id == "110113":  # A.5.3.11 Security Alert
        assert types, "Security Alert has an EventTypeCode"
    for obj in objects:
        if _id_type(obj) == "110180":
            assert obj.get("ParticipantObjectTypeCode") == "2"
            assert obj.get("ParticipantObjectTypeCodeRole") == "3"
        if _id_type(obj) == "2":  # Patient Number
            assert obj.get("ParticipantObjectTypeCode") == "1"
            assert obj.get("ParticipantObjectTypeCodeRole") == "1"
