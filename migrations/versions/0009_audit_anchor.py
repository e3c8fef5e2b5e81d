"""The anchored, forwarded audit trail: a keyed MAC per audit event (the key lives outside the
database) and, per ATNA syslog destination, the id of the last event it has received.

- ``audit_events.mac``: HMAC-SHA256 of the event's chain hash under the `[audit] key_file` key;
  NULL on events written before this migration (``audit verify`` accepts those only before the
  first anchored event).
- ``audit_forwarding``: the durable queue of the ATNA sender: events with a larger id than
  ``last_event_id`` are still to be sent to ``destination``. One sender at a time holds the
  destination (``holder`` until ``lease_until``), so that nodes sharing the database do not
  send each event once per node.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("mac", sa.String(64), nullable=True))
    op.create_table(
        "audit_forwarding",
        sa.Column("destination", sa.String(200), primary_key=True),
        sa.Column("last_event_id", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("holder", sa.String(128), nullable=False, server_default=""),
        sa.Column("lease_until", sa.Float, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("audit_forwarding")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("mac")
