"""Load and backpressure (issue 12, item 5): parallel senders into the live node lose nothing
and the urgent study jumps the backlog (fast version of tests/campaigns/load_ingest.py); the
bounded work queue answers 0xA700 to a new study when full, never a silent drop."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from core.domain import StudyStatus
from core.errors import OutOfResourcesError
from core.settings import Settings
from dicom_node.jobs import claim_next, transition
from dicom_node.node import DicomNode, WorkQueue
from store.index import Index, InstanceRecord
from tests.campaigns.load_ingest import run_campaign
from tests.conftest import free_port, require_tool

from .peers import RecordingAnalyser, index_series, make_mr_series
from .pg import postgresql_server  # noqa: F401  (fixture)


def test_work_queue_refuses_a_new_study_when_full_and_admits_queued_ones(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    now = [0.0]
    queue = WorkQueue(index, limit=2, refresh_s=1.0, clock=lambda: now[0])
    a = index_series(index, make_mr_series(tmp_path / "a", 2, rows=8, columns=8), 1.0)
    queue.admit("1.2.3.4")  # new and admitted: counted before the index has it
    assert queue.depth() == 2
    with pytest.raises(OutOfResourcesError) as refused:
        queue.admit("1.2.3.5")
    assert refused.value.dimse_status == 0xA700 and queue.refused_studies == 1
    queue.admit(a)  # a queued study's later instances are always accepted
    queue.admit("1.2.3.4")
    transition(index, a, StudyStatus.NOT_APPLICABLE, now=3.0)  # a leaves the queue
    now[0] = 2.0  # next count: the index holds none of the queue now
    queue.admit("1.2.3.5")
    assert queue.depth() == 1


def test_claim_next_takes_the_urgent_study_before_an_older_routine_backlog(
    tmp_path: Path,
) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    backlog = [
        index_series(index, make_mr_series(tmp_path / f"r{i}", 1, rows=8, columns=8), float(i))
        for i in range(5)
    ]
    soon = index_series(
        index, make_mr_series(tmp_path / "m", 1, rows=8, columns=8), 10.0, priority="MEDIUM"
    )
    urgent = index_series(
        index, make_mr_series(tmp_path / "u", 1, rows=8, columns=8), 11.0, priority="STAT"
    )
    for uid in [*backlog, soon, urgent]:
        assert transition(index, uid, StudyStatus.COMPLETE, now=12.0)
    order = []
    while (claim := claim_next(index, 20.0)) is not None:
        order.append(claim.study_instance_uid)
    assert order == [urgent, soon, *backlog]


@pytest.mark.integration
def test_full_work_queue_answers_out_of_resources_over_the_wire(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings.model_validate(
        {
            "dicom": {
                "port": port,
                "stable_age_s": 3600,
                "low_water_mark_mb": 0,
                "max_queued_studies": 1,
                "workers": 2,  # counters and backpressure summed over receiver processes
            },
            "storage": {
                "root": str(tmp_path / "var"),
                "database_url": f"sqlite:///{tmp_path}/var/index.db",
            },
        }
    )
    first = make_mr_series(tmp_path / "a", 2, rows=16, columns=16)
    second = make_mr_series(tmp_path / "b", 1, rows=16, columns=16)
    with DicomNode(settings, RecordingAnalyser(tmp_path / "sr")) as node:
        ae = AE(ae_title="LOADSCU")
        ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="RADTRIAGE")
        assert assoc.is_established
        try:
            statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in first]
            refused = assoc.send_c_store(pydicom.dcmread(second[0])).Status
        finally:
            assoc.release()
        assert statuses == [0x0000, 0x0000]
        assert refused == 0xA700
        assert node.counts()["queue"] == {"depth": 1, "limit": 1, "refused_studies": 1}
        assert node.queue_depth() == 1
        uid = str(pydicom.dcmread(second[0]).SOPInstanceUID)
        assert not list((tmp_path / "var" / "spool").rglob(f"{uid}.dcm"))  # nothing half kept
        assert node.counts()["ingest"]["refused"] == {"0xA700": 1}


@pytest.mark.integration
def test_eight_parallel_senders_lose_nothing_and_urgent_jumps_the_queue(tmp_path: Path) -> None:
    require_tool("storescu")
    require_tool("storescp")
    started = time.monotonic()
    report = run_campaign(tmp_path, senders=8, studies=12, instances=25, workers=2)
    assert report["workers"] == 2 and report["instances"] == 300 and report["acknowledged"] == 300
    assert report["lost"] == 0 and report["stuck"] == 0
    assert report["urgent"]["referral_urgency"] == "urgent"
    assert report["urgent"]["overtaken"] >= 1, report  # there was a backlog and it jumped it
    assert time.monotonic() - started < 120


def _race_into(index: Index, files: list[Path]) -> list[bool]:
    """Eight threads index the same new study at once, each file twice (a resend)."""
    from concurrent.futures import ThreadPoolExecutor

    records = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        records.append(
            InstanceRecord(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_instance_uid=ds.SeriesInstanceUID,
                study_instance_uid=ds.StudyInstanceUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                path=f,
                size_bytes=1,
                patient_id=ds.PatientID,
                modality="MR",
            )
        )
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda r: index.add_instance(r, 1.0), records + records))


def test_parallel_writers_on_sqlite_index_every_instance_once(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    files = make_mr_series(tmp_path / "a", 40, rows=8, columns=8)
    added = _race_into(index, files)
    assert sum(added) == 40
    [study] = index.list_studies()
    assert study["instances"] == 40


@pytest.mark.integration
def test_parallel_writers_on_postgresql_race_without_a_process_lock(
    tmp_path: Path, postgresql_url: str
) -> None:
    index = Index(postgresql_url, node_id="RADTRIAGE")
    files = make_mr_series(tmp_path / "a", 40, rows=8, columns=8)
    added = _race_into(index, files)
    assert sum(added) == 40  # every instance indexed once, the resends seen as duplicates
    [study] = index.list_studies()
    assert study["instances"] == 40
    index.close()
