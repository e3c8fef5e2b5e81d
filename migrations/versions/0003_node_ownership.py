"""Several DICOM nodes share one index: studies.node_id and outbox.node_id name the node that
received the study (its files are in that node's spool). Existing rows get "" (unowned); the
first node that starts on the upgraded database adopts them (`Index.adopt_unowned`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("studies", "outbox")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("node_id", sa.String(64), nullable=False, server_default=""))
            batch.create_index(f"ix_{table}_node_id", ["node_id"])


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_node_id")
            batch.drop_column("node_id")
