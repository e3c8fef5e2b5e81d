"""Spool durability/format and the SQL index (with its alembic migration)."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from core.domain import StudyStatus
from core.errors import OutOfResourcesError
from store.index import Base, Index, InstanceRecord, Study
from store.spool import Spool, encode_file_meta

from .peers import encoded_dataset, make_mr_series
from .pg import postgresql_server  # noqa: F401  (the postgresql_url fixture)

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"


def _record(
    sop: str, study: str = "1.2.3", series: str = "1.2.3.1", **kw: object
) -> InstanceRecord:
    fields = dict(
        sop_instance_uid=sop,
        sop_class_uid=MR,
        series_instance_uid=series,
        study_instance_uid=study,
        transfer_syntax_uid=EXPLICIT,
        path=Path(f"/spool/{sop}.dcm"),
        size_bytes=100,
        patient_id="P1",
        modality="MR",
    )
    fields.update(kw)
    return InstanceRecord(**fields)  # type: ignore[arg-type]


def test_migration_matches_models(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    with index.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    Index(f"sqlite:///{tmp_path}/index.db")  # second start: already at head


def test_spooled_file_is_the_received_dataset_with_file_meta(tmp_path: Path) -> None:
    src = make_mr_series(tmp_path / "src", 1)[0]
    ds = pydicom.dcmread(src)
    spool = Spool(tmp_path / "var")
    meta = encode_file_meta(MR, ds.SOPInstanceUID, EXPLICIT, "PACS")
    path = spool.store(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, meta, encoded_dataset(src)
    )
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == EXPLICIT
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.SourceApplicationEntityTitle == "PACS"
    assert back.file_meta.ImplementationClassUID
    assert back.PixelData == ds.PixelData
    assert not list(spool.tmp_dir.iterdir())  # nothing half-written left behind


def test_low_water_mark_refuses_before_writing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var", low_water_mark_mb=10**9)
    with pytest.raises(OutOfResourcesError, match="low-water mark") as info:
        spool.store("1.2", "1.2.1", "1.2.1.1", b"meta", b"data")
    assert info.value.dimse_status == 0xA700
    assert not list(spool.spool_dir.rglob("*.dcm"))


def test_quarantine_keeps_file_and_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var")
    path = spool.quarantine("1.2.3", b"garbage", "0xC210 cannot parse")
    assert path.read_bytes() == b"garbage"
    reason = Path(str(path)[: -len(".dcm")] + ".reason.txt")
    assert "0xC210" in reason.read_text()


def test_quarantine_respects_the_low_water_mark(tmp_path: Path) -> None:
    """Issue 23: refused data never takes the disk below the low-water mark (a peer sending
    malformed instances cannot fill it); only the reason is kept."""
    spool = Spool(tmp_path / "var", low_water_mark_mb=10**9)  # always below: a full disk
    path = spool.quarantine("1.2.3", b"garbage" * 1000, "0xC210 cannot parse")
    assert path.name.endswith(".reason.txt") and "not kept" in path.read_text()
    assert not list(spool.quarantine_dir.glob("*.dcm"))


def test_duplicate_is_idempotent_and_counts(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    now = time.time()
    assert index.add_instance(_record("1.2.3.1.1"), now)
    assert not index.add_instance(_record("1.2.3.1.1"), now + 1)
    assert index.add_instance(_record("1.2.3.1.2"), now + 2)
    study = index.get_study("1.2.3")
    assert study is not None
    assert study["instances"] == 2
    assert study["series"][0]["instances"] == 2
    assert study["status"] == "received"
    assert study["last_received_at"] == pytest.approx(now + 2)
    counts = index.counts()
    assert counts["instances"] == 2
    assert counts["studies"]["received"] == 1


def test_referral_urgency_takes_the_most_urgent(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    index.add_instance(_record("9.1", requested_procedure_priority="ROUTINE"), 1.0)
    index.add_instance(_record("9.2", series="1.2.3.2", requested_procedure_priority="STAT"), 2.0)
    study = index.get_study("1.2.3")
    assert study is not None and study["referral_urgency"] == "urgent"


def test_late_instance_sends_analysed_study_back_to_received(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    index.add_instance(_record("1.1"), 1.0)
    with index.write() as s:
        s.query(Study).update({"status": StudyStatus.SENT.value})
    index.add_instance(_record("1.2"), 2.0)
    study = index.get_study("1.2.3")
    assert study is not None and study["status"] == "received"


def test_late_non_mr_instance_does_not_trigger_a_rerun(tmp_path: Path) -> None:
    """PACS may route our own SR back to us: that must not start an analysis loop."""
    index = Index(f"sqlite:///{tmp_path}/index.db")
    index.add_instance(_record("1.1"), 1.0)
    with index.write() as s:
        s.query(Study).update({"status": StudyStatus.SENT.value})
    index.add_instance(_record("1.2", series="1.2.3.9", modality="SR"), 2.0)
    study = index.get_study("1.2.3")
    assert study is not None and study["status"] == "sent" and study["instances"] == 2


@pytest.mark.integration
def test_index_on_postgresql(postgresql_url: str) -> None:
    from dicom_node.jobs import claim_next, transition

    index = Index(postgresql_url)
    with index.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert index.add_instance(_record("1.1"), 1.0)
    assert not index.add_instance(_record("1.1"), 1.5)
    assert index.add_instance(
        _record("2.1", study="2.2", series="2.2.1", requested_procedure_priority="STAT"), 2.0
    )
    assert transition(index, "1.2.3", StudyStatus.COMPLETE)
    assert transition(index, "2.2", StudyStatus.COMPLETE)
    claim = claim_next(index, 3.0)
    assert claim is not None and claim.study_instance_uid == "2.2"  # urgent first
    with index.write() as s:
        s.query(Study).update({"status": StudyStatus.SENT.value})
    index.add_instance(_record("1.2"), 4.0)  # late MR instance: re-run
    assert index.get_study("1.2.3")["status"] == "received"  # type: ignore[index]
    assert index.counts()["instances"] == 3
    index.close()
