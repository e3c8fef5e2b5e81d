"""The live waiting list: RIS orders (HL7 v2 / FHIR), the HL7 results outbox and each study's
time-dependent priority.

- ``orders``: one row per placer order (ORC-2 + namespace), matched to a study by Accession
  Number, then Patient ID + issuer (`ris.orders`).
- ``hl7_outbox``: ORU^R01 messages to each ``[[hl7.destinations]]``, sent with retries and a dead
  letter (`ris.hl7_results`).
- ``waiting_list``: per study, the priority last decided by the tick and the flags last sent by
  SR and by HL7 (`triage.waiting_list`); the sortable ``studies.priority``/``priority_rank``
  columns (0005) carry the same decision.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # studies.urgency_rank follows ReferralUrgency.rank (0 urgent, 2 soon, 3 routine), the one
    # urgency ranking, instead of 0/1/2
    op.execute(
        "UPDATE studies SET urgency_rank = CASE referral_urgency WHEN 'urgent' THEN 0 "
        "WHEN 'soon' THEN 2 ELSE 3 END"
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("placer_order_number", sa.String(64), nullable=False),
        sa.Column("placer_namespace", sa.String(64), nullable=False, server_default=""),
        sa.Column("filler_order_number", sa.String(64), nullable=False, server_default=""),
        sa.Column("accession_number", sa.String(64), nullable=False, server_default=""),
        sa.Column("patient_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("issuer_of_patient_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False, server_default="active"),
        sa.Column("referral_urgency", sa.String(16), nullable=False, server_default="routine"),
        sa.Column("request_date", sa.String(10), nullable=True),
        sa.Column(
            "suspected_cancer_pathway", sa.Boolean, nullable=False, server_default=sa.false()
        ),
        sa.Column("clinical_details", sa.Text, nullable=False, server_default=""),
        sa.Column("psa_ng_ml", sa.Float, nullable=True),
        sa.Column("source", sa.String(16), nullable=False, server_default="hl7"),
        sa.Column("message_control_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("changes", sa.Integer, nullable=False, server_default="0"),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("placer_namespace", "placer_order_number"),
    )
    for name in ("accession_number", "patient_id", "study_instance_uid"):
        op.create_index(f"ix_orders_{name}", "orders", [name])
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
    op.create_table(
        "waiting_list",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("priority_rank", sa.Integer, nullable=False),
        sa.Column("days_waited", sa.Integer, nullable=True),
        sa.Column("decided_on", sa.String(10), nullable=False),
        sa.Column("reasons_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("sr_priority", sa.String(16), nullable=True),
        sa.Column("sr_sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("hl7_priority", sa.String(16), nullable=True),
        sa.Column("hl7_fingerprint", sa.String(64), nullable=True),
        sa.Column("study_reported_at", sa.Float, nullable=True),
        sa.Column("result_fingerprint", sa.String(64), nullable=True),
        sa.Column("fhir_fingerprint", sa.String(64), nullable=True),
        sa.Column("stale", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("waiting_list")
    op.drop_table("hl7_outbox")
    for name in ("accession_number", "patient_id", "study_instance_uid"):
        op.drop_index(f"ix_orders_{name}", "orders")
    op.drop_table("orders")
