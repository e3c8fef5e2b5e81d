"""Several DICOM nodes (one per hospital) on one index: each touches only the studies it received.

The shared-database tests run on a real throwaway PostgreSQL (`tests.dicom_node.pg`); the
migration of a pre-0003 index runs on SQLite (the single-node default).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text

from core.domain import StudyStatus
from core.errors import ConfigError
from core.settings import Settings
from dicom_node.jobs import JobWorker, claim_next, recover, transition
from dicom_node.node import DicomNode
from dicom_node.sender import Sender
from store.index import MIGRATIONS, UNOWNED, Index, make_engine
from store.spool import Spool
from tests.conftest import free_port, require_tool

from .peers import RecordingAnalyser, index_series, make_mr_series, storescp, storescu
from .pg import postgresql_server  # noqa: F401  (provides the postgresql_url fixture)

S = StudyStatus


def _add_study(index: Index, folder: Path, now: float, seed: int) -> str:
    return index_series(index, make_mr_series(folder, 2, seed=seed), now)


@pytest.mark.integration
def test_two_indexes_on_one_postgresql_keep_to_their_own_studies(
    postgresql_url: str, tmp_path: Path
) -> None:
    # two nodes of one site (the two-site case: tests/dicom_node/test_sites.py)
    a = Index(postgresql_url, node_id="HOSP_A", site_id="REGION")
    b = Index(postgresql_url, node_id="HOSP_B", site_id="REGION")
    try:
        uid_a = _add_study(a, tmp_path / "a", 1.0, seed=1)
        uid_b = _add_study(b, tmp_path / "b", 0.5, seed=2)  # older: first in a shared queue
        for uid in (uid_a, uid_b):
            assert transition(a, uid, S.COMPLETE)

        assert [s["study_instance_uid"] for s in a.list_studies()] == [uid_a]
        assert {s["study_instance_uid"] for s in a.list_studies(all_nodes=True)} == {uid_a, uid_b}
        assert a.get_study(uid_b)["node_id"] == "HOSP_B"  # type: ignore[index]
        assert a.counts()["studies"]["complete"] == 1 and a.counts()["instances"] == 2

        claim = claim_next(a, 10.0)
        assert claim is not None and claim.study_instance_uid == uid_a
        assert claim_next(a, 10.0) is None  # B's older study is not A's to take
        assert recover(b, 11.0) == []  # A's study left analysing is not B's to resume
        assert recover(a, 11.0) == [uid_a]

        # reports queue outbox rows owned by the study's node; each sender sees only its own
        worker_a = JobWorker(
            a, Spool(tmp_path / "var_a"), RecordingAnalyser(tmp_path / "sr"), ["pacs"]
        )
        assert worker_a.run_once() == uid_a
        assert [o["node_id"] for o in a.outbox()] == ["HOSP_A"]
        assert b.outbox() == []
        assert Index(postgresql_url).outbox()[0]["study_instance_uid"] == uid_a  # unscoped: all
        sender_b = Sender(b, [], Settings().sender, "HOSP_B")
        assert sender_b.run_once() == 0
        assert a.get_study(uid_a)["status"] == "reported"  # type: ignore[index]
        assert [o["state"] for o in a.outbox()] == ["pending"]  # B did not dead-letter it
    finally:
        a.close()
        b.close()


def test_empty_node_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="node_id"):
        Index(f"sqlite:///{tmp_path}/i.db", node_id=" ")


def test_rows_from_before_node_ids_are_adopted_by_the_first_node(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/index.db"
    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0002")
        connection.execute(
            text("INSERT INTO patients (id, patient_id, patient_name) VALUES (1, 'P1', '');")
        )
        connection.execute(
            text(
                "INSERT INTO studies (study_instance_uid, patient_fk, accession_number, "
                "study_date, study_description, referral_urgency, urgency_rank, status, "
                "status_changed_at, first_received_at, last_received_at, instance_count, "
                "checked_instance_count, analysed_instance_count, attempts) VALUES "
                "('1.2.3', 1, '', '', '', 'routine', 2, 'complete', 1, 1, 1, 0, 0, 0, 0)"
            )
        )
    engine.dispose()

    index = Index(url, node_id="RADTRIAGE")  # upgrades to head: the old row is unowned
    assert index.get_study("1.2.3") is None  # not yet of this node's site either
    tool = Index(url)
    row = tool.get_study("1.2.3")
    assert row is not None and row["node_id"] == UNOWNED and row["site_id"] == UNOWNED
    assert claim_next(index, 2.0) is None
    assert index.adopt_unowned() == 1
    assert index.get_study("1.2.3")["site_id"] == "RADTRIAGE"  # type: ignore[index]
    tool.close()
    assert index.adopt_unowned() == 0
    claim = claim_next(index, 2.0)
    assert claim is not None and claim.study_instance_uid == "1.2.3"
    index.close()


def _node_settings(root: Path, database_url: str, ae_title: str, pacs_port: int) -> Settings:
    return Settings.model_validate(
        {
            "dicom": {
                "ae_title": ae_title,
                "port": free_port(),
                "stable_age_s": 0.5,
                "low_water_mark_mb": 0,
                "destinations": [
                    {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}
                ],
            },
            "storage": {"root": str(root), "database_url": database_url},
            "sender": {"initial_backoff_s": 0.2},
        }
    )


def _wait_sent(node: DicomNode, uid: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study = node.get_study(uid)
        if study is not None and study["status"] == "sent":
            return study
        time.sleep(0.1)
    raise AssertionError(f"study {uid} not sent: {node.get_study(uid)}")


@pytest.mark.integration
def test_two_dicom_nodes_share_one_postgresql(postgresql_url: str, tmp_path: Path) -> None:
    """Hospital A and B each run a node (own AE title, port, spool) on one database; a study
    sent to A is analysed and reported by A from A's spool, B's by B, and the PACS gets both."""
    require_tool("storescu")
    require_tool("storescp")
    pacs_port = free_port()
    analysers = {h: RecordingAnalyser(tmp_path / f"sr_{h}") for h in ("A", "B")}
    settings = {
        h: _node_settings(tmp_path / f"var_{h}", postgresql_url, f"HOSP_{h}", pacs_port)
        for h in ("A", "B")
    }
    study_a = make_mr_series(tmp_path / "study_a", 3, seed=1, patient_id="RT-A-0001")
    study_b = make_mr_series(tmp_path / "study_b", 4, seed=2, patient_id="RT-B-0001")
    uid_a = str(pydicom.dcmread(study_a[0]).StudyInstanceUID)
    uid_b = str(pydicom.dcmread(study_b[0]).StudyInstanceUID)
    with (
        storescp(tmp_path / "pacs", pacs_port),
        DicomNode(settings["A"], analysers["A"], poll_interval_s=0.05) as node_a,
        DicomNode(settings["B"], analysers["B"], poll_interval_s=0.05) as node_b,
    ):
        assert (node_a.node_id, node_b.node_id) == ("HOSP_A", "HOSP_B")
        assert storescu(study_a, node_a.port, called="HOSP_A").returncode == 0
        assert storescu(study_b, node_b.port, called="HOSP_B").returncode == 0
        sent_a, sent_b = _wait_sent(node_a, uid_a), _wait_sent(node_b, uid_b)

        assert [(uid, n) for uid, n, _ in analysers["A"].calls] == [(uid_a, 3)]
        assert [(uid, n) for uid, n, _ in analysers["B"].calls] == [(uid_b, 4)]
        assert sent_a["node_id"] == "HOSP_A" and sent_b["node_id"] == "HOSP_B"
        assert [s["study_instance_uid"] for s in node_a.list_studies()] == [uid_a]
        assert [s["study_instance_uid"] for s in node_b.list_studies()] == [uid_b]
        # each node is its own site by default: "all nodes" are its site's nodes
        assert [s["study_instance_uid"] for s in node_a.list_studies(all_nodes=True)] == [uid_a]
        tool = Index(postgresql_url)  # a tool without a site sees every row
        everyone = {s["study_instance_uid"]: s["node_id"] for s in tool.list_studies()}
        tool.close()
        assert everyone == {uid_a: "HOSP_A", uid_b: "HOSP_B"}
        for node, uid in ((node_a, uid_a), (node_b, uid_b)):
            spool = node.spool.spool_dir
            assert all(spool in p.parents for p in node.index.instance_paths(uid))
            assert [o["state"] for o in node.outbox()] == ["sent"]
            assert node.counts()["studies"]["sent"] == 1
    received = {pydicom.dcmread(p).StudyInstanceUID for p in (tmp_path / "pacs").iterdir()}
    assert received == {uid_a, uid_b}
