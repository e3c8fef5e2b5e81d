"""One decision record per change of a study's flag, and the radiologist's override where the
waiting list decides with it.

- ``decisions``: immutable rows (inputs with sources, flag, coded drivers, headline, cause,
  actor), appended by the waiting list (`store.results.append_decision`);
- ``waiting_list.override_json``: a radiologist's flag {"priority", "by", "reason"};
- ``waiting_list.sr_state``: what the last SR said (flag, deciding driver, PSA density).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("decided_at", sa.Float, nullable=False),
        sa.Column("decided_on", sa.String(10), nullable=False),
        sa.Column("cause", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False, server_default=""),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("priority_rank", sa.Integer, nullable=False),
        sa.Column("drivers_json", sa.Text, nullable=False),
        sa.Column("headline", sa.Text, nullable=False),
        sa.Column("inputs_json", sa.Text, nullable=False),
    )
    op.create_index("ix_decisions_study_instance_uid", "decisions", ["study_instance_uid"])
    op.create_index("ix_decisions_node_id", "decisions", ["node_id"])
    with op.batch_alter_table("waiting_list") as batch:
        batch.add_column(sa.Column("override_json", sa.Text, nullable=True))
        batch.add_column(sa.Column("sr_state", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("waiting_list") as batch:
        batch.drop_column("sr_state")
        batch.drop_column("override_json")
    op.drop_index("ix_decisions_node_id", "decisions")
    op.drop_index("ix_decisions_study_instance_uid", "decisions")
    op.drop_table("decisions")
