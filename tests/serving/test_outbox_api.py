"""`GET /api/outbox`: the one outbox's items of every channel, by state, with file names only."""

from __future__ import annotations

from pathlib import Path

from store import outbox
from store.index import Index
from store.outbox import Channel, Kind, Message, RetryPolicy
from tests.serving.workspace_helpers import add_users, client

STUDY = "1.2.826.0.1.3680043.8.498.1"


def test_outbox_lists_every_channel_without_paths_or_payloads(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/i.db")
    secret_folder = str(tmp_path / "var" / "outbox" / STUDY)
    items = [
        Message(
            Channel.DICOM,
            Kind.TRIAGE_SR,
            STUDY,
            "pacs",
            "1.2.3.4",
            "",
            path=f"{secret_folder}/1.2.3.4.dcm",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
        ),
        Message(Channel.HL7, Kind.ORU, STUDY, "ris", "RT1", "", payload="MSH|PID|Doe^John"),
        Message(Channel.FHIR, Kind.FHIR_REPORT, STUDY, "fhir", "fhir-1", "", payload="[]"),
    ]
    with index.write() as s:
        ids = [outbox.enqueue(s, m, now=0.0) for m in items]
        for item_id in ids:
            outbox.record_failure(s, item_id, "refused", 1.0, RetryPolicy(), permanent=True)
        outbox.enqueue(s, Message(Channel.HL7, Kind.ORU, STUDY, "ris", "RT2", "", payload="x"), 2)
    tokens = add_users(index)
    c = client(index, outbox=lambda state: outbox.listing(index, state))
    c.headers["Authorization"] = f"Bearer {tokens['admin']}"
    dead = c.get("/api/outbox").json()  # the dead letters by default
    assert [(r["channel"], r["kind"], r["file"]) for r in dead] == [
        ("dicom", "triage_sr", "1.2.3.4.dcm"),
        ("hl7", "oru", None),
        ("fhir", "fhir_report", None),
    ]
    assert secret_folder not in str(dead) and "Doe^John" not in str(dead)
    assert [r["item_uid"] for r in c.get("/api/outbox?state=pending").json()] == ["RT2"]
    assert c.get("/api/outbox?state=nonsense").status_code == 422
