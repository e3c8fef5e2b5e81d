"""Sites: the hospital a study, an order and an audit event belong to, and the sites a user
is granted (docs/scaling.md, "Sites").

- ``studies.site_id``, ``orders.site_id``: "" on rows written before this migration; the first
  node that starts on the upgraded database adopts them for its site (it was the only node
  then), as it adopts unowned studies (0003). Existing studies take their ``node_id`` as their
  site (the default site id is the node id).
- ``audit_events.site_id``: hashed with the event when not ""; events written before this
  migration keep "" (their hashes cover no site): `audit verify` checks them, no site's
  ``/api/audit`` lists them.
- ``user_sites``: one row per (user, site) grant; users without a grant are adopted the same way.
- ``patients.site_id``: a patient (Patient ID + issuer) is one per site, so the same MRN at
  two hospitals is two patients (existing ones take their studies' site).
- ``orders``: the placer order number is unique per site (two hospitals' RIS may both number
  order 1001).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_OLD_UQ_SQLITE = "uq_orders_placer_namespace"
_OLD_UQ_POSTGRES = "orders_placer_namespace_placer_order_number_key"
_NEW_UQ = "uq_orders_site_placer"
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _site_column() -> sa.Column:
    return sa.Column("site_id", sa.String(64), nullable=False, server_default="")


def _rebuild_patients_sqlite() -> None:
    """SQLite cannot drop a UNIQUE: rebuild patients with the rows put back by id (as 0004), so
    the deferred foreign keys of studies.patient_fk find their patients again."""
    op.execute("CREATE TABLE _patients_0010 AS SELECT * FROM patients")
    op.drop_table("patients")
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("patient_name", sa.String(324), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(64), nullable=False, server_default=""),
        _site_column(),
        sa.UniqueConstraint(
            "site_id", "patient_id", "issuer_of_patient_id", name="uq_patients_site_identity"
        ),
    )
    kept = "id, patient_id, patient_name, issuer_of_patient_id"
    op.execute(f"INSERT INTO patients ({kept}) SELECT {kept} FROM _patients_0010")
    op.drop_table("_patients_0010")


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:  # patients is rebuilt: check studies.patient_fk at the end (as 0004)
        op.execute("SAVEPOINT migration_0010")
        op.execute("PRAGMA defer_foreign_keys = ON")
    for table in ("studies", "audit_events"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(_site_column())
            batch.create_index(f"ix_{table}_site_id", ["site_id"])
    op.execute("UPDATE studies SET site_id = node_id")
    with op.batch_alter_table("orders", naming_convention=_NAMING) as batch:
        batch.add_column(_site_column())
        batch.create_index("ix_orders_site_id", ["site_id"])
        batch.drop_constraint(_OLD_UQ_SQLITE if sqlite else _OLD_UQ_POSTGRES, type_="unique")
        batch.create_unique_constraint(
            _NEW_UQ, ["site_id", "placer_namespace", "placer_order_number"]
        )
    if sqlite:
        _rebuild_patients_sqlite()
    else:
        op.add_column("patients", _site_column())
        op.drop_constraint("uq_patients_identity", "patients", type_="unique")
        op.create_unique_constraint(
            "uq_patients_site_identity",
            "patients",
            ["site_id", "patient_id", "issuer_of_patient_id"],
        )
    op.execute(
        "UPDATE patients SET site_id = COALESCE((SELECT MIN(studies.site_id) FROM studies "
        "WHERE studies.patient_fk = patients.id), '')"
    )
    op.create_table(
        "user_sites",
        sa.Column("user_fk", sa.Integer, sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("site_id", sa.String(64), primary_key=True),
    )
    if sqlite:
        op.execute("RELEASE migration_0010")  # deferred foreign keys are checked at the commit


def downgrade() -> None:
    op.drop_table("user_sites")
    with op.batch_alter_table("patients") as batch:
        batch.drop_constraint("uq_patients_site_identity", type_="unique")
        batch.create_unique_constraint(
            "uq_patients_identity", ["patient_id", "issuer_of_patient_id"]
        )
        batch.drop_column("site_id")
    with op.batch_alter_table("orders") as batch:
        batch.drop_constraint(_NEW_UQ, type_="unique")
        batch.create_unique_constraint(
            _OLD_UQ_POSTGRES, ["placer_namespace", "placer_order_number"]
        )
        batch.drop_index("ix_orders_site_id")
        batch.drop_column("site_id")
    for table in ("studies", "audit_events"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_site_id")
            batch.drop_column("site_id")
