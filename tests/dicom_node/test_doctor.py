"""`radtriage doctor`: index vs spool vs outbox vs results, found and repaired on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from cli.main import main
from core.domain import StudyStatus
from dicom_node.ingest import Ingest
from dicom_node.jobs import claim_next, transition
from store.index import Index
from store.spool import Spool, encode_file_meta

from .peers import encoded_dataset, make_mr_series


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f"""
[storage]
root = "{tmp_path / "var"}"
database_url = "sqlite:///{tmp_path / "var" / "index.db"}"
"""
    )
    return cfg


def _doctor(capsys: pytest.CaptureFixture[str], cfg: Path, *extra: str) -> tuple[int, dict]:
    code = main(["doctor", "--config", str(cfg), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def _ingest(ingest: Ingest, files: list[Path]) -> None:
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out = ingest.receive(
            encoded_dataset(f),
            str(ds.file_meta.TransferSyntaxUID),
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
        )
        assert out.ok, out.reason


def test_doctor_finds_and_repairs_what_a_crash_leaves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    spool = Spool(tmp_path / "var")
    index = Index(f"sqlite:///{tmp_path / 'var' / 'index.db'}", node_id="RADTRIAGE")
    ingest = Ingest(spool, index)
    a = make_mr_series(tmp_path / "a", 3, rows=8, columns=8)
    b = make_mr_series(tmp_path / "b", 2, rows=8, columns=8)
    _ingest(ingest, a + b)
    code, clean = _doctor(capsys, cfg)
    assert code == 0 and clean["ok"] and clean["checked"]["instances"] == 5

    # what SIGKILLs leave behind
    (spool.tmp_dir / "x.part").write_bytes(b"half")
    c = make_mr_series(tmp_path / "c", 1, rows=8, columns=8)[0]  # spooled, never indexed
    ds = pydicom.dcmread(c, stop_before_pixels=True)
    meta = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1")
    spool.store(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, meta, encoded_dataset(c)
    )
    lost = index.instance_paths(str(pydicom.dcmread(b[0]).StudyInstanceUID))[0]
    lost.unlink()  # an indexed file gone: not repairable
    uid_a = str(pydicom.dcmread(a[0]).StudyInstanceUID)
    assert transition(index, uid_a, StudyStatus.COMPLETE)
    assert claim_next(index, 1.0) is not None  # analysing, and then the process died
    orphan = spool.outbox_folder(uid_a) / "1.2.3.4.dcm"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"an SR the dead analysis wrote")

    code, found = _doctor(capsys, cfg)
    assert code == 1 and not found["ok"]
    assert found["by_check"] == {
        "partial_file": 1,
        "spool_unindexed": 1,
        "instance_file_missing": 1,
        "study_stuck_analysing": 1,
        "outbox_orphan_file": 1,
    }
    assert found["repaired"] == 0 and (spool.tmp_dir / "x.part").exists()  # a check changes nothing

    code, repaired = _doctor(capsys, cfg, "--repair")
    assert code == 1 and repaired["repaired"] == 4 and repaired["unrepaired"] == 1
    assert not (spool.tmp_dir / "x.part").exists() and not orphan.exists()
    assert index.get_study(uid_a)["status"] == "complete"
    assert index.get_study(str(ds.StudyInstanceUID))["instances"] == 1

    code, after = _doctor(capsys, cfg)
    assert code == 1 and after["by_check"] == {"instance_file_missing": 1}
    index.close()


def test_doctor_requeues_a_study_whose_pending_document_vanished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from store import outbox

    cfg = _config(tmp_path)
    spool = Spool(tmp_path / "var")
    index = Index(f"sqlite:///{tmp_path / 'var' / 'index.db'}", node_id="RADTRIAGE")
    files = make_mr_series(tmp_path / "a", 2, rows=8, columns=8)
    _ingest(Ingest(spool, index), files)
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    with index.write() as s:
        outbox.enqueue(
            s,
            outbox.Message(
                channel=outbox.Channel.DICOM,
                kind=outbox.Kind.TRIAGE_SR,
                study_instance_uid=uid,
                node_id="RADTRIAGE",
                destination="pacs",
                item_uid="1.2.3.9",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                path=str(spool.outbox_folder(uid) / "1.2.3.9.dcm"),
            ),
            now=0.0,
        )
        # an ORU waiting since the epoch for a RIS that never answers: stuck, not a file problem
        outbox.enqueue(
            s,
            outbox.Message(
                channel=outbox.Channel.HL7,
                kind=outbox.Kind.ORU,
                study_instance_uid=uid,
                node_id="RADTRIAGE",
                destination="ris",
                item_uid="RT1",
                payload="MSH|^~\\&|...",
            ),
            now=0.0,
        )
    code, found = _doctor(capsys, cfg, "--repair")
    assert found["by_check"] == {"outbox_file_missing": 1} and code == 0
    assert index.outbox(channel="dicom")[0]["state"] == "dead"
    assert index.get_study(uid)["status"] == "received"  # analysed again: a new report
    code, found = _doctor(capsys, cfg)
    assert code == 0
    view = found["outbox"]
    assert view["counts"]["dicom"]["dead"] == 1 and view["counts"]["hl7"]["pending"] == 1
    assert view["counts"]["fhir"] == {"pending": 0, "sent": 0, "dead": 0, "withdrawn": 0}
    (dead,) = view["dead_letters"]
    assert dead["file"] == "1.2.3.9.dcm" and "path" not in dead and "payload" not in dead
    assert dead["last_error"] == "document missing (doctor)"
    assert [(i["channel"], i["item_uid"]) for i in view["stuck"]] == [("hl7", "RT1")]
    assert str(tmp_path) not in json.dumps(view)
    main(["doctor", "--config", str(cfg)])
    text = capsys.readouterr().out
    assert "outbox   hl7    1 pending" in text and "DEAD     dicom/triage_sr to pacs" in text
    index.close()
