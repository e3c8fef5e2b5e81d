"""The audit chain anchored outside the database: a per-event HMAC under a key file the index
does not hold and an exported head file. Whoever can write the database cannot delete the newest
events, rebuild the chain from any row, or strip the MACs without `audit verify` failing."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from cli.main import main
from core.settings import load_settings
from store.index import Index
from tests.dicom_node.pg import postgresql_server  # noqa: F401 - fixture
from workspace.audit import GENESIS, AuditAnchor, AuditTrail, anchor_from_settings, chain_hash


@pytest.fixture
def anchored(tmp_path: Path) -> tuple[AuditTrail, Index, Path]:
    db = tmp_path / "index.db"
    config = tmp_path / "radtriage.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path}"\ndatabase_url = "sqlite:///{db}"\n')
    settings = load_settings(config)
    index = Index(settings.storage.database_url)
    anchor = anchor_from_settings(settings.audit, settings.storage.root, create=True)
    audit = AuditTrail(index.engine, anchor)
    for i in range(12):
        audit.append("view_study", user="rita", role="radiologist", detail={"n": i})
    return audit, index, config


def _verify(config: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    code = main(["audit", "verify", "--config", str(config), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert (code == 0) == out["ok"]
    return out


def test_key_file_is_private_and_head_is_exported(anchored, capsys) -> None:
    audit, _, config = anchored
    root = config.parent
    assert stat.S_IMODE((root / "audit.key").stat().st_mode) == 0o600
    head = json.loads((root / "audit-head.json").read_text())
    newest = audit.events(limit=1)[1][0]
    assert head["id"] == newest["id"] and head["hash"] == newest["hash"]
    assert head["anchored_from"] == 1
    assert _verify(config, capsys) == {
        "ok": True,
        "events": 12,
        "first_bad_id": None,
        "problem": None,
    }


def test_deleting_the_newest_rows_fails(anchored, capsys) -> None:
    _, index, config = anchored
    with index.engine.begin() as c:  # the chain that is left is intact by itself
        c.execute(text("DELETE FROM audit_events WHERE id > 9"))
    out = _verify(config, capsys)
    assert not out["ok"] and out["first_bad_id"] == 12
    assert "ends before the exported head" in out["problem"]


def _rehash_from(index: Index, first_id: int, mac: str | None) -> None:
    """What an attacker with database access does: edit a row, then recompute every hash
    (and write some MAC, lacking the key) from there to the end."""
    with index.engine.begin() as c:
        rows = c.execute(text("SELECT * FROM audit_events ORDER BY id")).mappings().all()
        prev = GENESIS
        for row in rows:
            if row["id"] >= first_id:
                detail = json.loads(row["detail_json"])
                if row["id"] == first_id:
                    detail = {"n": 999}
                content = {
                    "at": row["at"],
                    "user": row["user"],
                    "role": row["role"],
                    "action": row["action"],
                    "study_instance_uid": row["study_instance_uid"],
                    "address": row["address"],
                    "detail": detail,
                }
                new_hash = chain_hash(prev, content)
                c.execute(
                    text(
                        "UPDATE audit_events SET detail_json = :d, prev_hash = :p, hash = :h, "
                        "mac = :m WHERE id = :id"
                    ),
                    {
                        "d": json.dumps(detail, sort_keys=True),
                        "p": prev,
                        "h": new_hash,
                        "m": mac,
                        "id": row["id"],
                    },
                )
                prev = new_hash
            else:
                prev = row["hash"]


@pytest.mark.parametrize("first_id", [1, 6, 12])
@pytest.mark.parametrize("mac", [None, "0" * 64])
def test_rehashing_from_any_row_fails(anchored, capsys, first_id: int, mac: str | None) -> None:
    _, index, config = anchored
    _rehash_from(index, first_id, mac)
    chain_only = AuditTrail(index.engine).verify()
    assert chain_only.problem != "content does not match hash"  # the plain chain is consistent
    out = _verify(config, capsys)
    assert not out["ok"] and out["first_bad_id"] == first_id
    assert out["problem"] == "MAC does not match the audit key"


def test_stripping_every_mac_and_the_key_check_fails(anchored, capsys) -> None:
    _, index, config = anchored
    _rehash_from(index, 1, None)
    (config.parent / "audit.key").unlink()  # verify without the key: MACs cannot be checked
    out = _verify(config, capsys)
    assert not out["ok"] and "key file" in out["problem"]


def test_missing_head_file_with_anchored_events_fails(anchored, capsys) -> None:
    _, _, config = anchored
    (config.parent / "audit-head.json").unlink()
    out = _verify(config, capsys)
    assert not out["ok"] and "head file is missing" in out["problem"]


def test_appends_continue_the_anchor_across_processes(anchored, capsys) -> None:
    """`users add` (another process) appends with the same key; verify stays green."""
    _, _, config = anchored
    import io
    import sys

    stdin, sys.stdin = sys.stdin, io.StringIO("s3cret-pass-word\n")
    try:
        assert (
            main(
                [
                    "users",
                    "add",
                    "ann",
                    "--role",
                    "admin",
                    "--password-stdin",
                    "--config",
                    str(config),
                ]
            )
            == 0
        )
    finally:
        sys.stdin = stdin
    capsys.readouterr()
    head = json.loads((config.parent / "audit-head.json").read_text())
    assert head["id"] == 13
    assert _verify(config, capsys)["events"] == 13


@pytest.mark.integration
def test_anchor_on_postgresql(postgresql_url: str, tmp_path: Path) -> None:
    """Migration 0007 on PostgreSQL; two writers (two anchors on the same files, as two
    processes) keep one anchored chain; truncation is found."""
    import threading

    index = Index(postgresql_url)
    key, head = tmp_path / "audit.key", tmp_path / "head.json"
    trails = [AuditTrail(index.engine, AuditAnchor.load(key, head, create=True)) for _ in range(2)]

    def write(trail: AuditTrail) -> None:
        for i in range(15):
            trail.append("view_study", user="t", study_instance_uid=f"1.2.{i}")

    threads = [threading.Thread(target=write, args=(t,)) for t in trails]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = trails[0].verify()
    assert result.ok and result.events == 30, result
    assert json.loads(head.read_text())["id"] == max(e["id"] for e in trails[0].after(0, 100))
    with index.engine.begin() as c:
        c.execute(text("DELETE FROM audit_events WHERE id = (SELECT max(id) FROM audit_events)"))
    assert "ends before the exported head" in (trails[0].verify().problem or "")


def test_a_deleted_head_file_does_not_move_the_anchor(anchored, capsys) -> None:
    """Head file deleted and MACs stripped from the oldest rows, then the server appends
    again: the new head is anchored from the first event that still has a MAC, and rewriting
    any row before it still fails there (its hash feeds the anchored rows)."""
    audit, index, config = anchored
    (config.parent / "audit-head.json").unlink()
    with index.engine.begin() as c:
        c.execute(text("UPDATE audit_events SET mac = NULL WHERE id <= 5"))
    audit.append("login", user="rita")
    head = json.loads((config.parent / "audit-head.json").read_text())
    assert head["anchored_from"] == 6
    assert _verify(config, capsys)["ok"]  # stripping a MAC alone changes no content
    _rehash_from(index, 3, None)
    out = _verify(config, capsys)
    assert not out["ok"] and out["first_bad_id"] == 6
