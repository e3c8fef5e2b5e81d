"""An HL7 order and its audit event commit together: with the audit trail wired (as `serve`
wires it), each order message is an ``hl7_order`` event, and when the event cannot be written
the order is not applied and the RIS gets AE 207 (it retries later)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

import workspace.audit
from core.settings import Hl7Settings
from ris.hl7_listener import handle_message
from ris.orders import Order
from store.index import Index
from workspace.audit import AuditTrail

from .hl7_peers import orm_o01


def _orders(index: Index) -> list[str]:
    with index.read() as s:
        return list(s.scalars(select(Order.placer_order_number)))


def test_order_message_is_an_audit_event(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    audit = AuditTrail(index.engine)
    ack = handle_message(index, orm_o01("M1", "PLC1"), Hl7Settings(), 1.0e9, audit)
    assert "MSA|AA|M1" in ack
    assert _orders(index) == ["PLC1"]
    total, (only,) = audit.events()
    assert total == 1
    assert only["action"] == "hl7_order" and only["role"] == "hl7"
    assert only["detail"]["message_control_id"] == "M1"
    assert any("PLC1" in o for o in only["detail"]["orders"])


def test_order_is_not_applied_without_its_audit_event(tmp_path: Path, monkeypatch) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    audit = AuditTrail(index.engine)

    def broken(prev: str, content: dict) -> str:
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr(workspace.audit, "chain_hash", broken)
    ack = handle_message(index, orm_o01("M2", "PLC2"), Hl7Settings(), 1.0e9, audit)
    assert "MSA|AE|M2" in ack and "207" in ack
    assert _orders(index) == []
