"""The sender against DCMTK storescp: delivery, negotiation, retries with backoff, dead letter."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from core.domain import StudyStatus
from core.settings import Destination, SenderSettings
from dicom_node.index import Index
from dicom_node.jobs import JobWorker, transition
from dicom_node.sender import Sender, backoff_s
from dicom_node.spool import Spool
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
    assert [backoff_s(n, s) for n in range(1, 6)] == [2, 4, 8, 10, 10]


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
