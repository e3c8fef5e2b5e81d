"""End to end with Orthanc as the PACS: Orthanc forwards a study to the node, the node
analyses it and sends the SR back; Orthanc holds it under the same StudyInstanceUID."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pydicom
import pytest

from core.settings import (
    Destination,
    DicomSettings,
    SenderSettings,
    Settings,
    StorageSettings,
)
from dicom_node.node import DicomNode
from tests.conftest import free_port, require_tool

from .peers import Orthanc, RecordingAnalyser, make_mr_series

pytestmark = pytest.mark.integration


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_orthanc_forwards_study_and_gets_sr_back(tmp_path: Path) -> None:
    require_tool("Orthanc")
    node_port, dicom_port, http_port = free_port(), free_port(), free_port()
    settings = Settings(
        dicom=DicomSettings(
            port=node_port,
            stable_age_s=1.5,
            low_water_mark_mb=0,
            allowed_calling_aets=["ORTHANC"],
            destinations=[
                Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=dicom_port)
            ],
        ),
        storage=StorageSettings(
            root=tmp_path / "var", database_url=f"sqlite:///{tmp_path}/var/index.db"
        ),
        sender=SenderSettings(initial_backoff_s=0.5, max_backoff_s=2),
    )
    analyser = RecordingAnalyser(tmp_path / "sr")
    files = make_mr_series(tmp_path / "src", 12, requested_procedure_priority="HIGH")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    orthanc = Orthanc(
        tmp_path / "orthanc",
        dicom_port,
        http_port,
        modalities={"radtriage": ("RADTRIAGE", "127.0.0.1", node_port)},
    )
    with orthanc, DicomNode(settings, analyser, poll_interval_s=0.1) as node:
        client = httpx.Client(base_url=orthanc.url, timeout=60)
        for f in files:
            client.post("/instances", content=f.read_bytes()).raise_for_status()
        [orthanc_study] = client.get("/studies").json()
        client.post(
            "/modalities/radtriage/store", json={"Resources": [orthanc_study], "Synchronous": True}
        ).raise_for_status()
        assert node.get_study(study_uid)["instances"] == 12  # type: ignore[index]
        _wait(lambda: node.get_study(study_uid)["status"] == "sent", 60, "the SR to be sent")
        study = node.get_study(study_uid)
        assert study is not None and study["referral_urgency"] == "urgent"
        assert analyser.calls == [(study_uid, 12, None)]
        found = client.post(
            "/tools/find",
            json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}},
        ).json()
        assert len(found) == 1
        series = client.get(f"/series/{found[0]}").json()
        assert series["ParentStudy"] == orthanc_study
        [sr_id] = series["Instances"]
        tags = client.get(f"/instances/{sr_id}/simplified-tags").json()
        [doc] = study["documents"]
        assert tags["SOPInstanceUID"] == pydicom.dcmread(doc).SOPInstanceUID
        assert tags["StudyInstanceUID"] == study_uid
        [listed] = node.list_studies()
        assert listed["status"] == "sent" and listed["priority"] == "routine"
        counts = node.counts()
        assert counts["ingest"]["stored"] == 12 and counts["studies"]["sent"] == 1
        assert counts["outbox"] == {"pending": 0, "sent": 1, "dead": 0, "withdrawn": 0}
        assert node.dead_letters() == []
        timings = study["timings_ms"]
        assert all(timings[k] is not None for k in ("wait_complete", "analysis", "send"))
