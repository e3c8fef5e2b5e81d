"""Patient identity is Patient ID plus Issuer of Patient ID (0010,0021): two hospitals' MRN
12345 are two patients. patients.issuer_of_patient_id ("" when the sender gives none; existing
rows get ""), and the unique key moves from patient_id to (patient_id, issuer_of_patient_id).

SQLite cannot drop a column's UNIQUE, so there the table is rebuilt inside a savepoint under
deferred foreign keys (``PRAGMA defer_foreign_keys``, reset at commit): the rows are kept
aside, the old table is dropped, the new one created and the rows put back with their ids, so
every studies.patient_fk points at its patient again when the foreign keys are checked.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UNIQUE_NAME = "uq_patients_identity"


def _rebuild_sqlite(with_issuer: bool) -> None:
    # a savepoint opens a transaction when none is open, so the pragma holds until it ends
    op.execute("SAVEPOINT migration_0004")
    op.execute("PRAGMA defer_foreign_keys = ON")
    op.execute("CREATE TABLE _patients_0004 AS SELECT * FROM patients")
    op.drop_table("patients")
    extra: list[sa.schema.SchemaItem] = (
        [
            sa.Column("issuer_of_patient_id", sa.String(64), nullable=False, server_default=""),
            sa.UniqueConstraint("patient_id", "issuer_of_patient_id", name=UNIQUE_NAME),
        ]
        if with_issuer
        else []
    )
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False, unique=not with_issuer),
        sa.Column("patient_name", sa.String(324), nullable=False),
        *extra,
    )
    kept = "id, patient_id, patient_name"  # the issuer takes its server default ""
    op.execute(f"INSERT INTO patients ({kept}) SELECT {kept} FROM _patients_0004")
    op.drop_table("_patients_0004")
    op.execute("RELEASE migration_0004")  # deferred foreign keys are checked at the commit


def _patient_id_unique_name() -> str | None:
    for uq in sa.inspect(op.get_bind()).get_unique_constraints("patients"):
        if uq["column_names"] == ["patient_id"]:
            return uq["name"]
    return None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(with_issuer=True)
        return
    op.add_column(
        "patients",
        sa.Column("issuer_of_patient_id", sa.String(64), nullable=False, server_default=""),
    )
    old = _patient_id_unique_name()
    if old:
        op.drop_constraint(old, "patients", type_="unique")
    op.create_unique_constraint(UNIQUE_NAME, "patients", ["patient_id", "issuer_of_patient_id"])


def downgrade() -> None:
    """Only possible while no Patient ID has two issuers (the old key would be violated)."""
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(with_issuer=False)
        return
    op.drop_constraint(UNIQUE_NAME, "patients", type_="unique")
    op.drop_column("patients", "issuer_of_patient_id")
    op.create_unique_constraint("patients_patient_id_key", "patients", ["patient_id"])
