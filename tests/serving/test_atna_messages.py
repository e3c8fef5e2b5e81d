"""DICOM audit messages (PS3.15 A.5) built from audit events: every action we record maps to a
message of the right kind whose structure the standard's rules accept (`atna_checks`), hostile
fields stay text, and the syslog framing is RFC 5424 with octet counting."""

from __future__ import annotations

import base64
import re

import pytest

from tests.serving.atna_checks import check_audit_message
from workspace.atna import KINDS, AuditSource, audit_message
from workspace.syslog_sender import SyslogTarget, octet_counted, syslog_message

SOURCE = AuditSource("RADTRIAGE", "triage01.example.org", "Example Hospital")


def _event(action: str, **kw: object) -> dict:
    return {
        "id": 7,
        "at": 1765000000.25,
        "user": "rita",
        "role": "radiologist",
        "action": action,
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "address": "10.0.0.7",
        "detail": {},
        "hash": "a" * 64,
        "mac": "b" * 64,
        **kw,
    }


@pytest.mark.parametrize("action", [*sorted(KINDS), "something_new", "wado_frames"])
def test_every_action_gives_a_valid_message(action: str) -> None:
    detail = {"query": "PatientID=P1&limit=10"} if action in ("qido", "query") else {}
    check_audit_message(audit_message(_event(action, detail=detail), SOURCE, "P1"))


@pytest.mark.parametrize(
    ("action", "event_id", "action_code", "type_code", "outcome"),
    [
        ("login", "110114", "E", "110122", "0"),
        ("login_failed", "110114", "E", "110122", "4"),
        ("logout", "110114", "E", "110123", "0"),
        ("view_study", "110110", "R", None, "0"),
        ("override", "110110", "U", None, "0"),
        ("qido", "110112", "E", None, "0"),
        ("wado", "110104", "R", None, "0"),
        ("stow", "110104", "C", None, "0"),
        ("order_created", "110109", "C", None, "0"),
        ("application_start", "110100", "E", "110120", "0"),
        ("application_stop", "110100", "E", "110121", "0"),
        ("user_added", "110113", "E", "110137", "0"),
    ],
)
def test_actions_map_to_their_a53_message(action, event_id, action_code, type_code, outcome):
    root = check_audit_message(audit_message(_event(action), SOURCE, "P1"))
    ident = root.find("EventIdentification")
    assert ident.find("EventID").get("csd-code") == event_id
    assert ident.get("EventActionCode") == action_code
    assert ident.get("EventOutcomeIndicator") == outcome
    found = ident.find("EventTypeCode")
    assert (found.get("csd-code") if found is not None else None) == type_code


def test_patient_record_names_the_study_and_patient() -> None:
    root = check_audit_message(audit_message(_event("view_study"), SOURCE, "P-123"))
    objects = {
        o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")
        for o in root.findall("ParticipantObjectIdentification")
    }
    assert objects == {"110180": "1.2.826.0.1.3680043.8.498.1", "2": "P-123"}
    user = root.find("ActiveParticipant")
    assert user.get("UserID") == "rita" and user.get("UserIsRequestor") == "true"
    assert user.get("NetworkAccessPointID") == "10.0.0.7"
    assert user.get("NetworkAccessPointTypeCode") == "2"
    source = root.find("AuditSourceIdentification")
    assert source.get("AuditSourceID") == "RADTRIAGE"
    assert source.get("AuditEnterpriseSiteID") == "Example Hospital"


def test_query_carries_the_query_base64() -> None:
    event = _event("qido", study_instance_uid=None, detail={"query": "PatientID=P1"})
    root = check_audit_message(audit_message(event, SOURCE))
    query = root.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert base64.b64decode(query.text) == b"PatientID=P1"


def test_instances_transferred_lists_sop_classes() -> None:
    detail = {"sop_classes": {"1.2.840.10008.5.1.4.1.1.88.34": 1, "1.2.840.10008.5.1.4.1.1.4": 3}}
    root = check_audit_message(audit_message(_event("wado", detail=detail), SOURCE))
    sops = root.findall("ParticipantObjectIdentification/SOPClass")
    assert {s.get("UID"): s.get("NumberOfInstances") for s in sops} == {
        "1.2.840.10008.5.1.4.1.1.88.34": "1",
        "1.2.840.10008.5.1.4.1.1.4": "3",
    }
    roles = [p.find("RoleIDCode").get("csd-code") for p in root.findall("ActiveParticipant")]
    assert roles == ["110152", "110153"]  # the user receives, we send


def test_hostile_fields_stay_text() -> None:
    event = _event(
        "login_failed",
        user='"><script>x</script>\x00\x1b',
        address="<evil>",
        study_instance_uid=None,
    )
    xml = audit_message(event, SOURCE)
    root = check_audit_message(xml)
    assert b"<script>" not in xml and b"\x00" not in xml and b"\x1b" not in xml
    assert root.find("ActiveParticipant").get("UserID") == '"><script>x</script>'
    assert root.find("ActiveParticipant").get("NetworkAccessPointTypeCode") == "1"


def test_rfc5424_frame() -> None:
    event = _event("login_failed")
    xml = audit_message(event, SOURCE)
    message = syslog_message(event, xml, "triage01", "radtriage")
    head, _, body = message.partition(b"\xef\xbb\xbf")
    assert body == xml
    pattern = (
        rb"<84>1 2025-12-06T05:46:40\.250000Z triage01 radtriage - IHE\+RFC-3881 "
        rb'\[radtriage@32473 event="7" hash="a{64}" mac="b{64}"\] $'
    )
    assert re.fullmatch(pattern, head), head
    assert octet_counted(b"abc") == b"3 abc"


@pytest.mark.parametrize("url", ["tcp://h:514", "tls://10.0.0.1:6514", "udp://log.example:514"])
def test_targets(url: str) -> None:
    assert SyslogTarget.parse(url).url == url


@pytest.mark.parametrize("url", ["http://h:1", "tcp://h", "tcp://:514", "h:514"])
def test_bad_targets(url: str) -> None:
    with pytest.raises(ValueError):
        SyslogTarget.parse(url)
