"""The radiologist workspace: users, sessions, API tokens, the audit hash chain, assessments
(acknowledge, reported, override, per-finding accept/reject/edit, PI-RADS, biopsy ISUP) and
the sortable result columns on studies (priority, priority_rank, likelihood, largest lesion,
gland volume, PSA density, request date, patient sex and age).

Existing results are copied into the new columns from studies.result_json on upgrade.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from core.domain import Priority

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

RESULT_COLUMNS = (
    ("priority", sa.String(16)),
    ("priority_rank", sa.Integer()),
    ("case_likelihood", sa.Float()),
    ("largest_lesion_ml", sa.Float()),
    ("gland_volume_ml", sa.Float()),
    ("psa_density", sa.Float()),
    ("request_date", sa.String(8)),
    ("patient_sex", sa.String(16)),
    ("patient_age", sa.String(16)),
)
INDEXED = ("priority", "priority_rank", "case_likelihood", "request_date")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("session_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("user_fk", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("csrf_secret", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
        sa.Column("address", sa.String(64), nullable=False, server_default=""),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("user_fk", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("user", sa.String(64), nullable=False, server_default=""),
        sa.Column("role", sa.String(16), nullable=False, server_default=""),
        sa.Column("action", sa.String(32), nullable=False, index=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=True, index=True),
        sa.Column("address", sa.String(64), nullable=False, server_default=""),
        sa.Column("detail_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("prev_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
    )
    op.create_table(
        "assessments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("acknowledged_by", sa.String(64), nullable=True),
        sa.Column("acknowledged_at", sa.Float, nullable=True),
        sa.Column("reported_by", sa.String(64), nullable=True),
        sa.Column("reported_at", sa.Float, nullable=True),
        sa.Column("override_priority", sa.String(16), nullable=True),
        sa.Column("override_rank", sa.Integer, nullable=True),
        sa.Column("override_reason", sa.Text, nullable=True),
        sa.Column("override_by", sa.String(64), nullable=True),
        sa.Column("override_at", sa.Float, nullable=True),
        sa.Column("pirads_overall", sa.Integer, nullable=True),
        sa.Column("pirads_by", sa.String(64), nullable=True),
        sa.Column("isup_grade_group", sa.Integer, nullable=True),
        sa.Column("biopsy_date", sa.String(8), nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "finding_assessments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("finding_index", sa.Integer, nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("pirads", sa.Integer, nullable=True),
        sa.Column("sector", sa.String(32), nullable=True),
        sa.Column("volume_ml", sa.Float, nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("by", sa.String(64), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.UniqueConstraint("study_instance_uid", "finding_index"),
    )
    with op.batch_alter_table("studies") as batch:
        for name, type_ in RESULT_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
        for name in INDEXED:
            batch.create_index(f"ix_studies_{name}", [name])
    _backfill()


def _backfill() -> None:
    """Copy results analysed before 0005 into the sortable columns."""
    conn = op.get_bind()
    studies = sa.table(
        "studies",
        sa.column("id", sa.Integer),
        sa.column("result_json", sa.Text),
        sa.column("reported_at", sa.Float),
        *(sa.column(name, type_) for name, type_ in RESULT_COLUMNS),
    )
    rows = conn.execute(
        sa.select(studies.c.id, studies.c.result_json, studies.c.reported_at).where(
            studies.c.result_json.is_not(None)
        )
    ).all()
    for row in rows:
        try:
            doc = json.loads(row.result_json)
        except ValueError:
            continue
        lesions = doc.get("lesions") or []
        days = doc.get("days_waited")
        request_date = None
        if days is not None and row.reported_at:
            day = datetime.fromtimestamp(row.reported_at, UTC).date() - timedelta(days=int(days))
            request_date = day.strftime("%Y%m%d")
        conn.execute(
            sa.update(studies)
            .where(studies.c.id == row.id)
            .values(
                priority=doc.get("priority"),
                priority_rank=_rank(doc.get("priority")),
                case_likelihood=doc.get("case_likelihood"),
                largest_lesion_ml=max((x.get("volume_ml") or 0.0 for x in lesions), default=None),
                gland_volume_ml=doc.get("gland_volume_ml"),
                psa_density=doc.get("psa_density"),
                request_date=request_date,
            )
        )


def _rank(priority: str | None) -> int:
    try:
        return Priority(priority or "").rank
    except ValueError:
        return Priority.NOT_ANALYSED.rank


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        for name in INDEXED:
            batch.drop_index(f"ix_studies_{name}")
        for name, _ in RESULT_COLUMNS:
            batch.drop_column(name)
    for name in ("finding_assessments", "assessments", "audit_events", "api_tokens"):
        op.drop_table(name)
    op.drop_table("sessions")
    op.drop_table("users")
