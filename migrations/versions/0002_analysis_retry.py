"""Retry a failed analysis with backoff before giving up: studies.retry_at and
studies.analysis_failures (consecutive failures, reset by a successful analysis).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("retry_at", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("analysis_failures", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("analysis_failures")
        batch.drop_column("retry_at")
