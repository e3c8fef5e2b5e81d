"""The radiologist workspace's tables in the index (migration 0005): users, sessions, API
tokens, the audit hash chain and the radiologist's assessments, (the sortable result
columns migration 0005 adds to ``studies`` are in `workspace.worklist`).

ORM classes share `store.index.Base`, so alembic and `Index` see one schema.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from store.index import Base


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class UserSite(Base):
    """A user's grant of one site (0010): they sign in, and their sessions and tokens act,
    only at the nodes of the sites they are granted."""

    __tablename__ = "user_sites"

    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    site_id: Mapped[str] = mapped_column(String(64), primary_key=True)


class UserSession(Base):
    """A server-side login session; the cookie holds the id, the table only its sha256."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
    address: Mapped[str] = mapped_column(String(64), default="")


class ApiToken(Base):
    """A bearer token for integrators; the table holds only its sha256."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditEvent(Base):
    """Append-only; ``hash = sha256(prev_hash + canonical content)``. ``prev_hash`` is unique,
    so two writers can never fork the chain (the second insert fails and retries)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[float] = mapped_column(Float)
    user: Mapped[str] = mapped_column(String(64), default="")
    role: Mapped[str] = mapped_column(String(16), default="")
    action: Mapped[str] = mapped_column(String(32), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    address: Mapped[str] = mapped_column(String(64), default="")
    detail_json: Mapped[str] = mapped_column(Text, default="{}")
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: HMAC-SHA256(key, hash) with the `[audit] key_file` key (0007); None before anchoring
    mac: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: the site the event belongs to (0010); in the hashed content when not ""
    site_id: Mapped[str] = mapped_column(String(64), default="", server_default="", index=True)


class AuditForwarding(Base):
    """The ATNA sender's durable queue (0007): events after ``last_event_id`` are unsent."""

    __tablename__ = "audit_forwarding"

    destination: Mapped[str] = mapped_column(String(200), primary_key=True)
    last_event_id: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float)
    #: the sender that holds the destination until `lease_until` (nodes sharing the index)
    holder: Mapped[str] = mapped_column(String(128), default="")
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)


class Assessment(Base):
    """The radiologist's read of one study (current state; every change is also audited)."""

    __tablename__ = "assessments"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    acknowledged_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acknowledged_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    reported_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    override_priority: Mapped[str | None] = mapped_column(String(16), nullable=True)
    override_rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    override_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    override_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    override_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    pirads_overall: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pirads_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    isup_grade_group: Mapped[int | None] = mapped_column(Integer, nullable=True)
    biopsy_date: Mapped[str | None] = mapped_column(String(8), nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class FindingAssessment(Base):
    """Accept / reject / edit of one AI finding (IHE AI Result Assessment), with its PI-RADS."""

    __tablename__ = "finding_assessments"
    __table_args__ = (UniqueConstraint("study_instance_uid", "finding_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    finding_index: Mapped[int] = mapped_column(Integer)  # 0-based, in result.json lesions order
    decision: Mapped[str] = mapped_column(String(8))  # accept | reject | edit
    pirads: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sector: Mapped[str | None] = mapped_column(String(32), nullable=True)
    volume_ml: Mapped[float | None] = mapped_column(Float, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    by: Mapped[str] = mapped_column(String(64))
    at: Mapped[float] = mapped_column(Float)
