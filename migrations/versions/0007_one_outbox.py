"""One outbox for every way out: ``outbox`` gets a channel (dicom, hl7, fhir), a kind (triage_sr,
seg, oru, fhir_report), a payload (HL7 and FHIR messages), the withdrawn state's bookkeeping
(``superseded_by``, ``closed_at``), and takes the rows of ``hl7_outbox``, which is dropped
(`store.outbox`).

The table is rebuilt (new table, copy, drop, rename) so that SQLite and PostgreSQL take the same
steps; DICOM rows keep their ids. A DICOM row's kind follows its SOP Class (Segmentation ->
seg, else triage_sr); ``sop_instance_uid`` becomes ``item_uid`` (HL7 rows: the message control
ID). Pending FHIR pushes were never rows (they were fingerprints on ``waiting_list``): the
waiting list's next full tick queues what the FHIR server has not accepted.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _create(name: str) -> None:
    op.create_table(
        name,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("channel", sa.String(8), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("item_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("path", sa.Text, nullable=True),
        sa.Column("payload", sa.Text, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("sent_at", sa.Float, nullable=True),
        sa.Column("closed_at", sa.Float, nullable=True),
        sa.Column("superseded_by", sa.Integer, nullable=True),
        sa.UniqueConstraint("channel", "destination", "item_uid", name="uq_outbox_item"),
    )


def _continue_ids(table: str) -> None:
    """Rows copied with their ids: the table's id sequence continues after them (PostgreSQL;
    SQLite takes MAX(rowid) + 1 by itself)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
            f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
        )


def _indexes() -> None:
    for column in ("channel", "study_instance_uid", "state", "node_id"):
        op.create_index(f"ix_outbox_{column}", "outbox", [column])


def upgrade() -> None:
    _create("outbox_0007")
    op.execute(
        "INSERT INTO outbox_0007 (id, channel, kind, study_instance_uid, destination, item_uid, "
        "sop_class_uid, path, payload, state, node_id, attempts, next_attempt_at, last_error, "
        "created_at, sent_at, closed_at) "
        "SELECT id, 'dicom', CASE WHEN sop_class_uid = '" + SEGMENTATION_STORAGE + "' "
        "THEN 'seg' ELSE 'triage_sr' END, study_instance_uid, destination, sop_instance_uid, "
        "sop_class_uid, path, NULL, state, node_id, attempts, next_attempt_at, last_error, "
        "created_at, sent_at, CASE WHEN state = 'pending' THEN NULL "
        "ELSE COALESCE(sent_at, next_attempt_at) END FROM outbox ORDER BY id"
    )
    _continue_ids("outbox_0007")  # the HL7 rows come after the DICOM rows
    op.execute(
        "INSERT INTO outbox_0007 (channel, kind, study_instance_uid, destination, item_uid, "
        "sop_class_uid, path, payload, state, node_id, attempts, next_attempt_at, last_error, "
        "created_at, sent_at, closed_at) "
        "SELECT 'hl7', 'oru', study_instance_uid, destination, message_control_id, NULL, NULL, "
        "message, state, node_id, attempts, next_attempt_at, last_error, created_at, sent_at, "
        "CASE WHEN state = 'pending' THEN NULL ELSE COALESCE(sent_at, next_attempt_at) END "
        "FROM hl7_outbox ORDER BY id"
    )
    op.drop_table("hl7_outbox")
    for column in ("study_instance_uid", "state", "node_id"):
        op.drop_index(f"ix_outbox_{column}", "outbox")
    op.drop_table("outbox")
    op.rename_table("outbox_0007", "outbox")
    _indexes()


def downgrade() -> None:
    op.create_table(
        "hl7_outbox",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("node_id", sa.String(64), nullable=False, server_default="", index=True),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("message_control_id", sa.String(20), nullable=False, unique=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending", index=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("sent_at", sa.Float, nullable=True),
    )
    # a withdrawn item was never sent and never will be: the old tables had no such state
    op.execute(
        "INSERT INTO hl7_outbox (study_instance_uid, node_id, destination, message_control_id, "
        "message, state, attempts, next_attempt_at, last_error, created_at, sent_at) "
        "SELECT study_instance_uid, node_id, destination, item_uid, payload, "
        "CASE WHEN state = 'withdrawn' THEN 'dead' ELSE state END, attempts, next_attempt_at, "
        "last_error, created_at, sent_at FROM outbox WHERE channel = 'hl7' ORDER BY id"
    )
    op.create_table(
        "outbox_0006",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=True),
        sa.Column("node_id", sa.String(64), nullable=False, server_default=""),
        sa.UniqueConstraint("destination", "sop_instance_uid"),
    )
    op.execute(
        "INSERT INTO outbox_0006 (id, study_instance_uid, destination, sop_instance_uid, "
        "sop_class_uid, path, state, attempts, next_attempt_at, last_error, created_at, "
        "sent_at, node_id) SELECT id, study_instance_uid, destination, item_uid, "
        "COALESCE(sop_class_uid, ''), COALESCE(path, ''), "
        "CASE WHEN state = 'withdrawn' THEN 'dead' ELSE state END, attempts, next_attempt_at, "
        "last_error, created_at, sent_at, node_id FROM outbox WHERE channel = 'dicom' ORDER BY id"
    )
    for column in ("channel", "study_instance_uid", "state", "node_id"):
        op.drop_index(f"ix_outbox_{column}", "outbox")
    op.drop_table("outbox")
    op.rename_table("outbox_0006", "outbox")
    _continue_ids("outbox")
    for column in ("study_instance_uid", "state", "node_id"):
        op.create_index(f"ix_outbox_{column}", "outbox", [column])
