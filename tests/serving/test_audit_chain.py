"""The audit hash chain: intact after many appends (also from two threads at once), and any
edit, deletion or reordering of a row is found by `audit verify` (exit 1)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from cli.main import main
from store.index import Index
from workspace.audit import GENESIS, AuditTrail, chain_hash


@pytest.fixture
def trail(tmp_path: Path) -> tuple[AuditTrail, Index, Path]:
    db = tmp_path / "index.db"
    config = tmp_path / "radtriage.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path}"\ndatabase_url = "sqlite:///{db}"\n')
    index = Index(f"sqlite:///{db}")
    audit = AuditTrail(index.engine)
    for i in range(20):
        audit.append(
            "view_study",
            user="rita",
            role="radiologist",
            study_instance_uid=f"1.2.{i}",
            address="10.0.0.7",
            detail={"note": "<script>", "n": i, "name": "Zaharov^Ivan \u0417"},
        )
    return audit, index, config


def test_intact_chain_verifies(trail: tuple[AuditTrail, Index, Path], capsys) -> None:
    audit, _, config = trail
    result = audit.verify(batch=7)  # batches cross the chain's links
    assert result.ok and result.events == 20
    total, events = audit.events(limit=5)
    assert total == 20 and events[0]["study_instance_uid"] == "1.2.19"
    first = audit.events(offset=19, limit=1)[1][0]
    content = {
        k: first[k]
        for k in ("at", "user", "role", "action", "study_instance_uid", "address", "detail")
    }
    assert first["hash"] == chain_hash(GENESIS, content)
    assert main(["audit", "verify", "--config", str(config), "--json"]) == 0
    assert '"ok": true' in capsys.readouterr().out


def test_concurrent_appends_do_not_fork(trail: tuple[AuditTrail, Index, Path]) -> None:
    audit, index, _ = trail
    other = AuditTrail(index.engine)  # a second writer with its own lock, like another process

    def write(a: AuditTrail) -> None:
        for i in range(15):
            a.append("acknowledge", user="t", detail={"i": i})

    threads = [threading.Thread(target=write, args=(a,)) for a in (audit, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = audit.verify()
    assert result.ok and result.events == 50


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE audit_events SET user = 'mallory' WHERE id = 5",
        "UPDATE audit_events SET detail_json = '{\"n\": 99}' WHERE id = 5",
        "UPDATE audit_events SET at = at + 1 WHERE id = 5",
        "DELETE FROM audit_events WHERE id = 5",
    ],
)
def test_tampering_is_detected(
    tamper: str,
    trail: tuple[AuditTrail, Index, Path],
    capsys,
) -> None:
    audit, index, config = trail
    with index.engine.begin() as conn:
        conn.execute(text(tamper))
    result = audit.verify()
    assert not result.ok
    assert result.first_bad_id in (5, 6)  # the edited row, or the one after a deleted row
    assert result.events == 4
    assert main(["audit", "verify", "--config", str(config)]) == 1
    assert "BROKEN" in capsys.readouterr().out


def test_rewriting_a_row_with_a_fresh_hash_breaks_the_next_link(
    trail: tuple[AuditTrail, Index, Path],
) -> None:
    """An attacker who recomputes the edited row's own hash still breaks the next row."""
    audit, index, _ = trail
    with index.engine.begin() as conn:
        row = conn.execute(text("SELECT * FROM audit_events WHERE id = 5")).mappings().one()
        content = {
            "at": row["at"],
            "user": "mallory",
            "role": row["role"],
            "action": row["action"],
            "study_instance_uid": row["study_instance_uid"],
            "address": row["address"],
            "detail": {"note": "<script>", "n": 4, "name": "Zaharov^Ivan \u0417"},
        }
        conn.execute(
            text("UPDATE audit_events SET user = 'mallory', hash = :h WHERE id = 5"),
            {"h": chain_hash(row["prev_hash"], content)},
        )
    result = audit.verify()
    assert not result.ok and result.first_bad_id == 6
