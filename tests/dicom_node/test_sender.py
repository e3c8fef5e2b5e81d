"""The sender against DCMTK storescp: delivery, negotiation, retries with backoff, dead letter."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from core.domain import StudyStatus
from core.settings import Destination, SenderSettings
from dicom_node.jobs import JobWorker, transition
from dicom_node.sender import Sender
from store.index import Index
from store.outbox import RetryPolicy
from store.spool import Spool
from tests.conftest import free_port, require_tool

from .peers import RecordingAnalyser, index_series, make_mr_series, storescp

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = time.time() + 1  # after the worker queued the documents

    def __call__(self) -> float:
        return self.now


def _reported_study(tmp_path: Path, index: Index, destinations: list[str]) -> str:
    uid = index_series(index, make_mr_series(tmp_path / "src", 2), 1.0)
    transition(index, uid, StudyStatus.COMPLETE)
    worker = JobWorker(
        index, Spool(tmp_path / "var"), RecordingAnalyser(tmp_path / "sr"), destinations
    )
    assert worker.run_once() == uid
    return uid


def test_backoff_doubles_up_to_the_limit() -> None:
    s = SenderSettings(max_attempts=5, initial_backoff_s=2, max_backoff_s=10)
    policy = RetryPolicy.of(s)  # the [sender] keys are the DICOM channel's retry policy
    assert [policy.backoff_s(n) for n in range(1, 6)] == [2, 4, 8, 10, 10]


def test_sends_sr_to_storescp(tmp_path: Path) -> None:
    require_tool("storescp")
    index = Index(f"sqlite:///{tmp_path}/index.db")
    uid = _reported_study(tmp_path, index, ["pacs"])
    port = free_port()
    dest = Destination(name="pacs", ae_title="STORESCP", host="127.0.0.1", port=port)
    sender = Sender(index, [dest], SenderSettings(), "RADTRIAGE")
    with storescp(tmp_path / "received", port):
        assert sender.run_once() == 1
        assert sender.run_once() == 0  # nothing left
    received = list((tmp_path / "received").iterdir())
    [doc] = index.get_study(uid)["documents"]  # type: ignore[index]
    assert len(received) == 1
    assert pydicom.dcmread(received[0]).SOPInstanceUID == pydicom.dcmread(doc).SOPInstanceUID
    study = index.get_study(uid)
    assert study is not None and study["status"] == "sent" and study["sent_at"]
    assert study["outbox"][0]["state"] == "sent"


def test_down_destination_retries_then_dead_letter(tmp_path: Path) -> None:
    require_tool("storescp")
    index = Index(f"sqlite:///{tmp_path}/index.db")
    uid = _reported_study(tmp_path, index, ["pacs"])
    port = free_port()  # nobody listens here
    dest = Destination(name="pacs", ae_title="STORESCP", host="127.0.0.1", port=port)
    settings = SenderSettings(max_attempts=3, initial_backoff_s=5, max_backoff_s=60)
    clock = Clock()
    sender = Sender(index, [dest], settings, "RADTRIAGE", clock=clock)
    assert sender.run_once() == 0
    [item] = index.outbox()
    assert item["state"] == "pending" and item["attempts"] == 1
    assert item["next_attempt_at"] == pytest.approx(clock.now + 5)
    assert "cannot connect" in item["last_error"] or "refused" in item["last_error"]
    sender.run_once()  # not due yet: no attempt
    assert index.outbox()[0]["attempts"] == 1
    clock.now += 5
    sender.run_once()
    assert index.outbox()[0]["next_attempt_at"] == pytest.approx(clock.now + 10)
    clock.now += 10
    sender.run_once()
    [dead] = index.dead_letters()
    assert dead["attempts"] == 3
    study = index.get_study(uid)
    assert study is not None and study["status"] == "failed"
    assert study["error"]["code"] == "destination_unreachable"
    assert index.counts()["outbox"] == {"pending": 0, "sent": 0, "dead": 1, "withdrawn": 0}


def test_destination_coming_back_gets_the_same_document(tmp_path: Path) -> None:
    require_tool("storescp")
    index = Index(f"sqlite:///{tmp_path}/index.db")
    uid = _reported_study(tmp_path, index, ["pacs"])
    port = free_port()
    dest = Destination(name="pacs", ae_title="STORESCP", host="127.0.0.1", port=port)
    clock = Clock()
    sender = Sender(index, [dest], SenderSettings(initial_backoff_s=1), "RADTRIAGE", clock=clock)
    sender.run_once()  # down
    clock.now += 1
    with storescp(tmp_path / "received", port):
        assert sender.run_once() == 1
    assert index.get_study(uid)["status"] == "sent"  # type: ignore[index]
    assert index.outbox()[0]["attempts"] == 2


def _seg_of(series: list[Path], out: Path) -> Path:
    """A highdicom Segmentation of the series (a small gland mask on every slice)."""
    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in series]
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), dtype=bool)
    mask[:, 2:6, 2:6] = True
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="gland",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Prostate,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=902,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
        manufacturer="radtriage-tests",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(out)
    return out


def test_pacs_outage_ends_with_the_superseding_sr_and_the_seg(tmp_path: Path) -> None:
    """PACS is down while the analysis's SR and SEG and then a superseding SR are queued; when
    it is back it receives the SEG and the newer SR, in queue order, never the withdrawn SR."""
    from sqlalchemy import select

    from dicom_node.jobs import enqueue_document
    from store.index import Study
    from store.outbox import PENDING, SENT, WITHDRAWN

    require_tool("storescp")
    index = Index(f"sqlite:///{tmp_path}/index.db")
    uid = _reported_study(tmp_path, index, ["pacs"])  # the analysis's SR is queued
    paths = index.instance_paths(uid)
    seg = _seg_of(paths, tmp_path / "seg.dcm")
    analyser = RecordingAnalyser(tmp_path / "sr2")
    newer = analyser(uid, [*paths, paths[0]], None).documents[0]  # another SOP Instance UID
    port = free_port()
    dest = Destination(name="pacs", ae_title="STORESCP", host="127.0.0.1", port=port)
    clock = Clock()
    sender = Sender(index, [dest], SenderSettings(initial_backoff_s=5), "RADTRIAGE", clock=clock)
    seg_ds = pydicom.dcmread(seg, stop_before_pixels=True)
    with index.write() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        enqueue_document(
            s, study, seg, seg_ds.SOPInstanceUID, seg_ds.SOPClassUID, ["pacs"], clock.now
        )
    assert sender.run_once() == 0  # down: the SR failed, the SEG behind it was not tried
    assert [(o["kind"], o["attempts"]) for o in index.outbox()] == [("triage_sr", 1), ("seg", 0)]
    with index.write() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        enqueue_document(
            s, study, newer.path, newer.sop_instance_uid, newer.sop_class_uid, ["pacs"], clock.now
        )
    assert [o["state"] for o in index.outbox()] == [WITHDRAWN, PENDING, PENDING]
    clock.now += 5
    with storescp(tmp_path / "received", port):
        assert sender.run_once() == 2
        assert sender.run_once() == 0
    received = sorted((tmp_path / "received").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received]
    assert uids == [str(seg_ds.SOPInstanceUID), newer.sop_instance_uid]
    assert [o["state"] for o in index.outbox()] == [WITHDRAWN, SENT, SENT]
    assert index.get_study(uid)["status"] == "sent"  # type: ignore[index]
