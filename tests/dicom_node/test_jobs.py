"""The persistent job state machine and the analysis worker."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from core.domain import StudyStatus
from dicom_node.jobs import JobWorker, claim_next, recover, transition
from dicom_node.sr_reader import read_triage_sr
from store.index import Index
from store.spool import Spool

from .peers import RecordingAnalyser, index_series, make_mr_series

S = StudyStatus


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path}/index.db")


def test_transitions_are_compare_and_set(index: Index, tmp_path: Path) -> None:
    uid = index_series(index, make_mr_series(tmp_path / "a", 2), 1.0)
    assert not transition(index, uid, S.ANALYSING)  # received -> analysing is not allowed
    assert not transition(index, uid, S.SENT)
    assert transition(index, uid, S.COMPLETE)
    assert not transition(index, uid, S.COMPLETE)  # complete -> complete is not listed
    assert index.get_study(uid)["status"] == "complete"  # type: ignore[index]


def test_queue_orders_by_referral_urgency_then_age(index: Index, tmp_path: Path) -> None:
    old_routine = index_series(index, make_mr_series(tmp_path / "a", 1, seed=1), 1.0)
    new_stat = index_series(index, make_mr_series(tmp_path / "b", 1, seed=2), 5.0, "STAT")
    older_routine = index_series(index, make_mr_series(tmp_path / "c", 1, seed=3), 0.5)
    for uid in (old_routine, new_stat, older_routine):
        transition(index, uid, S.COMPLETE)
    order = [claim_next(index, 10.0) for _ in range(4)]
    assert [c.study_instance_uid if c else None for c in order] == [
        new_stat,
        older_routine,
        old_routine,
        None,
    ]


def test_restart_resumes_studies_left_analysing(index: Index, tmp_path: Path) -> None:
    uid = index_series(index, make_mr_series(tmp_path / "a", 1), 1.0)
    transition(index, uid, S.COMPLETE)
    assert claim_next(index, 2.0) is not None
    assert recover(index, 3.0) == [uid]
    assert index.get_study(uid)["status"] == "complete"  # type: ignore[index]


def test_worker_reports_queues_documents_and_reruns_late_studies(
    index: Index, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "var")
    analyser = RecordingAnalyser(tmp_path / "sr")
    worker = JobWorker(index, spool, analyser, ["pacs", "archive"])
    files = make_mr_series(tmp_path / "a", 3)
    uid = index_series(index, files, 1.0)
    transition(index, uid, S.COMPLETE)
    assert worker.run_once() == uid
    study = index.get_study(uid)
    assert study is not None and study["status"] == "reported"
    assert study["result"]["priority"] == "routine"
    assert [o["destination"] for o in study["outbox"]] == ["pacs", "archive"]
    first_sr = Path(study["documents"][0])
    assert first_sr.is_file() and spool.outbox_dir in first_sr.parents
    # a late instance: back to received; the re-run gets the previous SR to supersede
    late = make_mr_series(tmp_path / "late", 1, study_instance_uid=uid, series_number=2)
    index_series(index, late, 9.0)
    assert index.get_study(uid)["status"] == "received"  # type: ignore[index]
    transition(index, uid, S.COMPLETE)
    worker.run_once()
    assert analyser.calls[-1] == (uid, 4, first_sr)
    rerun_sr = pydicom.dcmread(index.get_study(uid)["documents"][0])  # type: ignore[index]
    predecessor = rerun_sr.PredecessorDocumentsSequence[0]
    assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[
        0
    ].ReferencedSOPInstanceUID == (pydicom.dcmread(first_sr).SOPInstanceUID)
    assert len(index.outbox()) == 4  # both SRs, both destinations


def test_failed_analysis_is_retried_then_reported_not_analysed(
    index: Index, tmp_path: Path
) -> None:
    now = [time.time()]
    spool = Spool(tmp_path / "var")
    analyser = RecordingAnalyser(tmp_path / "sr", fail=True)
    worker = JobWorker(index, spool, analyser, ["pacs"], clock=lambda: now[0])
    uid = index_series(index, make_mr_series(tmp_path / "a", 1), 1.0)
    transition(index, uid, S.COMPLETE)
    assert worker.run_once() == uid
    study = index.get_study(uid)
    assert study is not None and study["status"] == "complete"
    assert study["retry_at"] == pytest.approx(now[0] + 10)
    assert study["error"] == {
        "code": "internal_error",
        "message": "RuntimeError: test analyser told to fail",
    }
    assert worker.run_once() is None  # not due yet
    now[0] += 10
    assert worker.run_once() == uid  # second failure: retry in 20 s
    now[0] += 20
    assert worker.run_once() == uid  # third failure: give up, but never silently
    study = index.get_study(uid)
    assert study is not None and study["status"] == "reported" and len(analyser.calls) == 3
    assert study["result"]["priority"] == "not_analysed"
    assert study["result"]["reason"]["code"] == "internal_error"
    (item,) = index.outbox()
    sr = read_triage_sr(pydicom.dcmread(item["path"]))
    assert sr.priority == "not_analysed" and sr.study_instance_uid == uid
    assert sr.reason is not None and "failed 3 times" in sr.reason["message"]
    analyser.fail = False  # a late instance gives it another chance, which succeeds
    index_series(index, make_mr_series(tmp_path / "b", 1, study_instance_uid=uid), now[0])
    transition(index, uid, S.COMPLETE)
    assert worker.run_once() == uid
    study = index.get_study(uid)
    assert study is not None and study["status"] == "reported" and study["error"] is None


def test_workers_analyse_different_studies_concurrently(index: Index, tmp_path: Path) -> None:
    """Several workers (serving.concurrent_studies) feed Ray Serve's batching: each claims a
    different study, and they really run at the same time (the barrier needs all four)."""
    import threading

    spool = Spool(tmp_path / "var")
    recorder = RecordingAnalyser(tmp_path / "sr")
    barrier = threading.Barrier(4, timeout=30)

    def analyser(uid: str, paths: list[Path], previous: Path | None) -> object:
        barrier.wait()  # raises BrokenBarrierError unless 4 analyses overlap
        return recorder(uid, paths, previous)

    worker = JobWorker(index, spool, analyser, [])
    uids = []
    for i in range(4):
        uids.append(index_series(index, make_mr_series(tmp_path / f"s{i}", 1), 1.0 + i))
        transition(index, uids[-1], S.COMPLETE)
    done: list[str | None] = []
    threads = [threading.Thread(target=lambda: done.append(worker.run_once())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(done) == sorted(uids)  # type: ignore[type-var]
    assert all(index.get_study(u)["status"] == "reported" for u in uids)  # type: ignore[index]


def test_a_rerun_whose_documents_were_already_delivered_ends_sent(
    index: Index, tmp_path: Path
) -> None:
    """The sender may finish a study's documents while it is being analysed again (a late
    instance re-opened it); a re-run that gives the same documents then has nothing to send,
    and the study must still end `sent`, not stay `reported` for ever."""
    from sqlalchemy import update

    from store.index import OUTBOX_SENT, OutboxItem

    spool = Spool(tmp_path / "var")
    worker = JobWorker(index, spool, RecordingAnalyser(tmp_path / "sr"), ["pacs"])
    uid = index_series(index, make_mr_series(tmp_path / "a", 3), 1.0)
    transition(index, uid, S.COMPLETE)
    worker.run_once()
    assert transition(index, uid, S.RECEIVED)  # re-opened before the sender finished
    with index.write() as s:
        s.execute(update(OutboxItem).values(state=OUTBOX_SENT))
    transition(index, uid, S.COMPLETE)
    worker.run_once()
    study = index.get_study(uid)
    assert study is not None and study["status"] == "sent"
    assert [o["state"] for o in study["outbox"]] == ["sent"]  # nothing sent twice
