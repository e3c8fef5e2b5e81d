"""The index: patients, studies, series, instances, the job state and the outbox, in SQL.

SQLAlchemy 2 ORM. SQLite by default (WAL journal, synchronous=NORMAL; one writer at a time
through a process lock, since SQLite has a single writer and its busy handler sleeps),
PostgreSQL by URL (``postgresql+psycopg://...``: the ingest path, `Index.add_instance`, runs
without the process lock in concurrent short transactions, a get-or-create race on a unique key
retried once; job and outbox transactions keep the lock, which makes their claims exclusive).
The schema is owned by the alembic migrations in ``migrations``; `Index.__init__`
upgrades the database to head.

Several DICOM nodes may share one database (one node per hospital, PostgreSQL): every study and
outbox row records the ``node_id`` of the node that received it, and an `Index` opened with a
``node_id`` assembles, claims, sends, recovers and lists only its own rows (the instance files
lie in that node's spool). An `Index` without ``node_id`` sees every row (tools, tests).

Times are UNIX epoch seconds (float, UTC). Read functions return plain dicts so the HTTP API and
metrics can serialise them without touching ORM objects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    true,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    InstrumentedAttribute,
    Mapped,
    Session,
    mapped_column,
    relationship,
)
from sqlalchemy.pool import PoolProxiedConnection

from core.domain import ReferralUrgency, StudyStatus
from core.errors import ConfigError, DatasetMismatchError
from core.redact import redact

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"

#: ``node_id`` of rows written before migration 0003 (or by an `Index` without a node id);
#: a node adopts them when it starts (`Index.adopt_unowned`).
UNOWNED = ""

#: The claim order of the work queue: `ReferralUrgency.rank`, the one urgency ranking.
URGENCY_RANK = {u: u.rank for u in ReferralUrgency}


class Base(DeclarativeBase):
    pass


class Patient(Base):
    """A patient is Patient ID plus Issuer of Patient ID (0010,0021): the same MRN from two
    hospitals is two patients. An absent issuer is "" (one namespace for all such senders)."""

    __tablename__ = "patients"
    __table_args__ = (
        UniqueConstraint(
            "site_id", "patient_id", "issuer_of_patient_id", name="uq_patients_site_identity"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    #: each site keeps its own patients (0010): one hospital's MRN never shows another's name
    site_id: Mapped[str] = mapped_column(String(64), default=UNOWNED, server_default="")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referral_urgency: Mapped[str] = mapped_column(String(16), default="routine")
    urgency_rank: Mapped[int] = mapped_column(Integer, default=ReferralUrgency.ROUTINE.rank)
    status: Mapped[str] = mapped_column(String(16), default="received", index=True)
    node_id: Mapped[str] = mapped_column(String(64), default=UNOWNED, server_default="", index=True)
    #: the hospital the study belongs to (migration 0010; `Index.site_id`)
    site_id: Mapped[str] = mapped_column(String(64), default=UNOWNED, server_default="", index=True)
    status_changed_at: Mapped[float] = mapped_column(Float)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    checked_instance_count: Mapped[int] = mapped_column(Integer, default=0)
    analysed_instance_count: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    analysis_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    retry_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    documents_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    previous_sr_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    analysis_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the result's sortable columns (migration 0005, `store.results.update_result_columns`)
    priority: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    priority_rank: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    case_likelihood: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    largest_lesion_ml: Mapped[float | None] = mapped_column(Float, nullable=True)
    gland_volume_ml: Mapped[float | None] = mapped_column(Float, nullable=True)
    psa_density: Mapped[float | None] = mapped_column(Float, nullable=True)
    request_date: Mapped[str | None] = mapped_column(String(8), nullable=True, index=True)
    patient_sex: Mapped[str | None] = mapped_column(String(16), nullable=True)
    patient_age: Mapped[str | None] = mapped_column(String(16), nullable=True)

    patient: Mapped[Patient] = relationship()
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[float] = mapped_column(Float)


class OutboxItem(Base):
    """One message on its way out, whatever the way (`store.outbox` is its state machine):
    a DICOM document (``path``) for a C-STORE destination, an HL7 ORU^R01 or the FHIR resources
    of one decision (``payload``). ``item_uid`` names it within its channel and destination
    (SOP Instance UID, MSH-10 message control ID, FHIR push id)."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("channel", "destination", "item_uid", name="uq_outbox_item"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(8), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    item_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    payload: Mapped[str | None] = mapped_column(Text, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    node_id: Mapped[str] = mapped_column(String(64), default=UNOWNED, server_default="", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    superseded_by: Mapped[int | None] = mapped_column(Integer, nullable=True)


OUTBOX_PENDING = "pending"
OUTBOX_SENT = "sent"
OUTBOX_DEAD = "dead"
OUTBOX_WITHDRAWN = "withdrawn"
OUTBOX_STATES = (OUTBOX_PENDING, OUTBOX_SENT, OUTBOX_DEAD, OUTBOX_WITHDRAWN)


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP learned about one received instance (header fields + where it lies)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    size_bytes: int
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    instance_number: int | None = None
    requested_procedure_priority: str = ""
    calling_ae_title: str = ""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(database_url: str) -> Engine:
    """An engine for `database_url`; SQLite files get WAL and their folder is created."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            database_url, connect_args={"check_same_thread": False, "timeout": 30}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if database_url.startswith("postgresql://"):
        database_url = "postgresql+psycopg://" + database_url[len("postgresql://") :]
    return create_engine(database_url, pool_pre_ping=True)


def upgrade(engine: Engine) -> None:
    """Apply the alembic migrations up to head."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


class Index:
    """The node's database. One per process; safe to share between threads.

    `node_id` names the DICOM node this process runs when several share the database: its new
    studies and outbox rows carry it, and the node's reads (`mine`) see only those rows. None
    (tools, single-node tests) sees and writes every row as unowned."""

    def __init__(
        self, database_url: str, node_id: str | None = None, site_id: str | None = None
    ) -> None:
        if node_id is not None and not node_id.strip():
            raise ConfigError("node_id must not be empty; set dicom.node_id or dicom.ae_title")
        if site_id is not None and not site_id.strip():
            raise ConfigError("site_id must not be empty; set site.id or leave it out")
        self.node_id = node_id
        #: the site this node serves: every study read by UID, listed or changed through the
        #: HTTP, FHIR, DICOMweb and HL7 surfaces is this site's (`in_site`). None: every site
        #: (tools, single-node tests); a node given a node id defaults its site to it.
        self.site_id = site_id if site_id is not None else node_id
        try:
            self.engine = make_engine(database_url)
            upgrade(self.engine)
        except Exception as exc:  # a bad URL, an unreachable server, a newer schema
            # the URL and the driver's message may both carry the password
            raise ConfigError(
                f"cannot open the index database {redact(database_url)!r}: "
                f"{redact(str(exc))}; check storage.database_url"
            ) from None
        self._write_lock = threading.RLock()
        self._sqlite = self.engine.dialect.name == "sqlite"
        # Ingest: SQLite has one writer, so queue writers here rather than in its sleeping busy
        # handler; PostgreSQL takes concurrent ingest writers (docs/reliability.md).
        self._ingest_lock: AbstractContextManager[Any] = (
            self._write_lock if self._sqlite else nullcontext()
        )
        self._series_ids: dict[str, tuple[int, int]] = {}
        #: SQLite: the connection ingest keeps for instances of known series (under the lock)
        self._ingest_connection: PoolProxiedConnection | None = None

    def close(self) -> None:
        with self._write_lock:
            if self._ingest_connection is not None:
                self._ingest_connection.close()
                self._ingest_connection = None
        self.engine.dispose()

    @property
    def owner(self) -> str:
        """The ``node_id`` written on new rows."""
        return self.node_id if self.node_id is not None else UNOWNED

    def mine(self, column: InstrumentedAttribute[str]) -> Any:
        """WHERE clause on a ``node_id`` column: this node's rows (every row without node_id)."""
        return true() if self.node_id is None else column == self.node_id

    @property
    def site(self) -> str:
        """The ``site_id`` written on new rows."""
        return self.site_id if self.site_id is not None else UNOWNED

    def in_site(self, column: InstrumentedAttribute[str]) -> Any:
        """WHERE clause on a ``site_id`` column: this site's rows (every row without a site)."""
        return true() if self.site_id is None else column == self.site_id

    def adopt_unowned(self) -> int:
        """Give this node the rows without an owner (written before migration 0003, by a single
        node); returns how many studies it took. Called once at node start-up."""
        if self.node_id is None:
            return 0
        with self.write() as s:
            res = s.execute(
                update(Study).where(Study.node_id == UNOWNED).values(node_id=self.node_id)
            )
            s.execute(
                update(OutboxItem).where(OutboxItem.node_id == UNOWNED).values(node_id=self.node_id)
            )
            if self.site_id is not None:
                s.execute(
                    update(Study).where(Study.site_id == UNOWNED).values(site_id=self.site_id)
                )
                # audit events before sites stay without one: their hashes cover no site
                for table in ("patients", "orders"):  # orders is ris's table
                    s.execute(
                        text(f"UPDATE {table} SET site_id = :site WHERE site_id = ''"),
                        {"site": self.site_id},
                    )
                s.execute(
                    text(
                        "INSERT INTO user_sites (user_fk, site_id) SELECT id, :site FROM users "
                        "WHERE id NOT IN (SELECT user_fk FROM user_sites)"
                    ),
                    {"site": self.site_id},
                )
            return int(getattr(res, "rowcount", 0) or 0)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success; writers are serialised (SQLite)."""
        with (
            self._write_lock,
            Session(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    # --- ingest ---------------------------------------------------------------------------

    def add_instance(self, rec: InstanceRecord, now: float) -> bool:
        """Index a received instance. Returns False for a duplicate SOP Instance UID (the
        file was already indexed; nothing changes). A new instance for a study that was already
        analysed sends the study back to ``received`` so it is analysed again.

        This runs once per C-STORE, so it uses prepared SQL text and a cache of series ->
        (study, series) row ids: one SELECT, one INSERT and two UPDATEs in one transaction.
        Without the process lock (PostgreSQL) two associations may create the same patient,
        study, series or instance at once: the loser's unique-key error is retried once, and
        then finds the winner's rows (a duplicate instance returns False). The same holds
        for SQLite written by several receiver processes (``dicom.workers``): the process lock
        serialises one process's writers, SQLite's busy timeout the processes."""
        try:
            return self._add_instance(rec, now)
        except (IntegrityError, sqlite3.IntegrityError):
            self._series_ids.pop(rec.series_instance_uid, None)
            return self._add_instance(rec, now)

    def _add_instance(self, rec: InstanceRecord, now: float) -> bool:
        known = self._series_ids.get(rec.series_instance_uid)
        if known is not None and self._sqlite:
            with self._ingest_lock:
                return self._add_to_known_series(rec, known, now)
        with self._ingest_lock, self.engine.begin() as conn:
            # SQLite: the four statements go straight to the driver's cursor (named
            # parameters, same SQL, same transaction), skipping SQLAlchemy's per-statement
            # compile and result set-up, a third of the index's cost per instance
            raw = conn.connection.dbapi_connection if self._sqlite else None
            run = _on_cursor(raw.cursor()) if raw is not None else conn.execute
            if run(_SQL_DUPLICATE, {"sop": rec.sop_instance_uid}).fetchone() is not None:
                return False
            ids = self._series_ids.get(rec.series_instance_uid)
            created = ids is None
            if ids is None:
                ids = self._create_series(conn, rec, now)
            _insert_instance(run, rec, ids, now)
        if created:  # cache row ids only once they are committed
            self._series_ids[rec.series_instance_uid] = ids
        return True

    def _add_to_known_series(self, rec: InstanceRecord, ids: tuple[int, int], now: float) -> bool:
        """SQLite, a series whose rows exist: the same four statements and commit as
        `_add_instance`, on one connection ingest keeps (no pool checkout, reset and
        connection wrapper per instance: half the index's cost). Caller holds the lock."""
        if self._ingest_connection is None:
            self._ingest_connection = self.engine.raw_connection()
        raw = self._ingest_connection.dbapi_connection
        assert raw is not None
        try:
            cursor = raw.cursor()
            if cursor.execute(_SQL_DUPLICATE.text, {"sop": rec.sop_instance_uid}).fetchone():
                return False
            _insert_instance(_on_cursor(cursor), rec, ids, now)
            raw.commit()
        except BaseException:
            # a connection in an unknown state is not reused: the next instance gets a fresh one
            connection, self._ingest_connection = self._ingest_connection, None
            with contextlib.suppress(Exception):
                raw.rollback()
                connection.close()
            raise
        return True

    def _create_series(self, conn: Connection, rec: InstanceRecord, now: float) -> tuple[int, int]:
        """Get or create the patient, study and series rows of `rec`; returns row ids."""
        urgency = ReferralUrgency.from_dicom(rec.requested_procedure_priority)
        row = conn.execute(
            select(Study.id, Study.urgency_rank, Study.node_id, Study.site_id).where(
                Study.study_instance_uid == rec.study_instance_uid
            )
        ).first()
        if row is None:
            patient_id = conn.scalar(
                select(Patient.id).where(
                    Patient.patient_id == rec.patient_id,
                    Patient.issuer_of_patient_id == rec.issuer_of_patient_id,
                    Patient.site_id == self.site,
                )
            )
            if patient_id is None:
                patient_id = conn.execute(
                    insert(Patient).values(
                        patient_id=rec.patient_id,
                        issuer_of_patient_id=rec.issuer_of_patient_id,
                        patient_name=rec.patient_name,
                        site_id=self.site,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            study_id = conn.execute(
                insert(Study).values(
                    study_instance_uid=rec.study_instance_uid,
                    patient_fk=patient_id,
                    accession_number=rec.accession_number,
                    study_date=rec.study_date,
                    study_description=rec.study_description,
                    referral_urgency=urgency.value,
                    urgency_rank=URGENCY_RANK[urgency],
                    status=StudyStatus.RECEIVED.value,
                    node_id=self.owner,
                    site_id=self.site,
                    status_changed_at=now,
                    first_received_at=now,
                    last_received_at=now,
                    instance_count=0,
                    checked_instance_count=0,
                    analysed_instance_count=0,
                    attempts=0,
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        else:
            study_id = row.id
            if self.site_id is not None and row.site_id != self.site_id:
                # another hospital's study: never add to it (nor say whose it is)
                raise DatasetMismatchError(
                    "this Study Instance UID is not this site's; the instance is refused",
                    study_instance_uid=rec.study_instance_uid,
                )
            if row.node_id != self.owner:
                log.warning(
                    "study %s was first received by DICOM node %r: this node (%r) indexes the "
                    "instance but that node analyses the study, so its files must be readable "
                    "there (send a study to one node only)",
                    rec.study_instance_uid,
                    row.node_id,
                    self.owner,
                )
            if rec.requested_procedure_priority and URGENCY_RANK[urgency] < row.urgency_rank:
                conn.execute(
                    update(Study)
                    .where(Study.id == study_id)
                    .values(referral_urgency=urgency.value, urgency_rank=URGENCY_RANK[urgency])
                )
        series = conn.execute(
            select(Series.id, Series.study_fk).where(
                Series.series_instance_uid == rec.series_instance_uid
            )
        ).first()
        if series is not None and series.study_fk != study_id:
            raise DatasetMismatchError(
                "this Series Instance UID belongs to another study; the instance is refused",
                study_instance_uid=rec.study_instance_uid,
            )
        series_id = series.id if series is not None else None
        if series_id is None:
            series_id = conn.execute(
                insert(Series).values(
                    series_instance_uid=rec.series_instance_uid,
                    study_fk=study_id,
                    modality=rec.modality,
                    series_number=rec.series_number,
                    series_description=rec.series_description,
                    body_part_examined=rec.body_part_examined,
                    instance_count=0,
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        return int(study_id), int(series_id)

    @staticmethod
    def mr_instance_count(s: Session, study_id: int) -> int:
        """Instances of MR series in a study: what analysis reads, so what triggers re-runs."""
        return int(
            s.scalar(
                select(func.count())
                .select_from(Instance)
                .join(Series, Instance.series_fk == Series.id)
                .where(Instance.study_fk == study_id, func.upper(Series.modality) == "MR")
            )
            or 0
        )

    def known_paths(self) -> set[str]:
        with self.read() as s:
            return set(s.scalars(select(Instance.path)))

    # --- reads for the API and metrics -----------------------------------------------------

    def instance_paths(self, study_instance_uid: str) -> list[Path]:
        with self.read() as s:
            rows = s.scalars(
                select(Instance.path)
                .join(Study, Instance.study_fk == Study.id)
                .where(Study.study_instance_uid == study_instance_uid, self.in_site(Study.site_id))
                .order_by(Instance.id)
            )
            return [Path(p) for p in rows]

    def study_files(
        self, study_instance_uid: str
    ) -> tuple[list[dict[str, Any]], list[Path]] | None:
        """WADO-RS: this node's stored instances of a study (series and SOP Instance UIDs, SOP
        Class, transfer syntax, path; by series then instance number) and the paths of the
        documents (SR, SEG) it produced for it. None when the node holds no such study."""
        with self.read() as s:
            study = s.scalar(
                select(Study).where(
                    Study.study_instance_uid == study_instance_uid,
                    self.mine(Study.node_id),
                    self.in_site(Study.site_id),
                )
            )
            if study is None:
                return None
            rows = s.execute(
                select(Instance, Series.series_instance_uid)
                .join(Series, Instance.series_fk == Series.id)
                .where(Instance.study_fk == study.id)
                .order_by(Series.id, Instance.instance_number, Instance.id)
            )
            instances = [
                {
                    "series_instance_uid": series_uid,
                    "sop_instance_uid": inst.sop_instance_uid,
                    "sop_class_uid": inst.sop_class_uid,
                    "transfer_syntax_uid": inst.transfer_syntax_uid,
                    "path": Path(inst.path),
                }
                for inst, series_uid in rows
            ]
            documents = [Path(p) for p in json.loads(study.documents_json or "[]")]
            return instances, documents

    def list_studies(
        self,
        status: StudyStatus | str | None = None,
        limit: int = 200,
        all_nodes: bool = False,
        *,
        patient_ids: Sequence[str] = (),
        accession_numbers: Sequence[str] = (),
        with_documents: bool = False,
    ) -> list[dict[str, Any]]:
        """This node's studies (every node's with `all_nodes`), newest first, with status,
        referral urgency, counts and timings. The filters apply in SQL before `limit` (a
        search never misses a match that lies beyond the first page of all studies)."""
        with self.read() as s:
            q = select(Study, Patient).join(Patient, Study.patient_fk == Patient.id)
            if not all_nodes:
                q = q.where(self.mine(Study.node_id))
            q = q.where(self.in_site(Study.site_id))
            if status is not None:
                q = q.where(Study.status == str(status))
            if patient_ids:
                q = q.where(Patient.patient_id.in_(list(patient_ids)))
            if accession_numbers:
                q = q.where(Study.accession_number.in_(list(accession_numbers)))
            if with_documents:
                q = q.where(Study.documents_json.is_not(None), Study.documents_json != "[]")
            q = q.order_by(Study.first_received_at.desc()).limit(limit)
            return [_study_dict(st, p) for st, p in s.execute(q)]

    def get_study(self, study_instance_uid: str) -> dict[str, Any] | None:
        """One study with its series and outbox items, or None."""
        with self.read() as s:
            row = s.execute(
                select(Study, Patient)
                .join(Patient, Study.patient_fk == Patient.id)
                .where(Study.study_instance_uid == study_instance_uid, self.in_site(Study.site_id))
            ).first()
            if row is None:
                return None
            study, patient = row
            out = _study_dict(study, patient)
            out["series"] = [
                {
                    "series_instance_uid": se.series_instance_uid,
                    "series_number": se.series_number,
                    "series_description": se.series_description,
                    "modality": se.modality,
                    "body_part_examined": se.body_part_examined,
                    "instances": se.instance_count,
                }
                for se in s.scalars(
                    select(Series).where(Series.study_fk == study.id).order_by(Series.id)
                )
            ]
            out["outbox"] = self._outbox_rows(s, study_instance_uid=study_instance_uid)
            return out

    def outbox(
        self,
        state: str | None = None,
        study_instance_uid: str | None = None,
        channel: str | None = None,
    ) -> list[dict[str, Any]]:
        """This node's outbox items of every channel (or one), of its site's studies, oldest
        first."""
        with self.read() as s:
            return self._outbox_rows(
                s,
                state=state,
                study_instance_uid=study_instance_uid,
                node=self.mine,
                channel=channel,
                site=self.site_id,
            )

    def dead_letters(self) -> list[dict[str, Any]]:
        return self.outbox(state=OUTBOX_DEAD)

    @staticmethod
    def _outbox_rows(
        s: Session,
        state: str | None = None,
        study_instance_uid: str | None = None,
        node: Any = None,
        channel: str | None = None,
        site: str | None = None,
    ) -> list[dict[str, Any]]:
        q = select(OutboxItem).order_by(OutboxItem.id)
        if node is not None:
            q = q.where(node(OutboxItem.node_id))
        if site is not None:  # never another site's study (an item's own study may be gone)
            q = q.where(
                OutboxItem.study_instance_uid.not_in(
                    select(Study.study_instance_uid).where(Study.site_id != site)
                )
            )
        if state is not None:
            q = q.where(OutboxItem.state == state)
        if study_instance_uid is not None:
            q = q.where(OutboxItem.study_instance_uid == study_instance_uid)
        if channel is not None:
            q = q.where(OutboxItem.channel == channel)
        return [
            {
                "id": o.id,
                "channel": o.channel,
                "kind": o.kind,
                "study_instance_uid": o.study_instance_uid,
                "node_id": o.node_id,
                "destination": o.destination,
                "item_uid": o.item_uid,
                "sop_instance_uid": o.item_uid if o.channel == "dicom" else None,
                "sop_class_uid": o.sop_class_uid,
                "path": o.path,
                "payload": o.payload,
                "state": o.state,
                "attempts": o.attempts,
                "next_attempt_at": o.next_attempt_at,
                "last_error": o.last_error,
                "created_at": o.created_at,
                "sent_at": o.sent_at,
                "closed_at": o.closed_at,
                "superseded_by": o.superseded_by,
            }
            for o in s.scalars(q)
        ]

    def counts(self) -> dict[str, Any]:
        """Numbers for /metrics (this node's): studies by status, instances, outbox by state."""
        with self.read() as s:
            q_status = (
                select(Study.status, func.count())
                .where(self.mine(Study.node_id))
                .group_by(Study.status)
            )
            by_status = {row[0]: row[1] for row in s.execute(q_status)}
            q_state = (
                select(OutboxItem.state, func.count())
                .where(self.mine(OutboxItem.node_id))
                .group_by(OutboxItem.state)
            )
            by_state = {row[0]: row[1] for row in s.execute(q_state)}
            q_instances = select(func.count()).select_from(Instance)
            if self.node_id is not None:
                q_instances = q_instances.join(Study, Instance.study_fk == Study.id).where(
                    Study.node_id == self.node_id
                )
            instances = s.scalar(q_instances) or 0
        return {
            "studies": {st.value: int(by_status.get(st.value, 0)) for st in StudyStatus},
            "instances": int(instances),
            "outbox": {k: int(by_state.get(k, 0)) for k in OUTBOX_STATES},
        }


_RERUN_FROM = (
    StudyStatus.REPORTED.value,
    StudyStatus.SENT.value,
    StudyStatus.FAILED.value,
    StudyStatus.NOT_APPLICABLE.value,
)

# The ingest hot path as plain SQL (portable: SQLite and PostgreSQL), built once.
_SQL_DUPLICATE = text("SELECT id FROM instances WHERE sop_instance_uid = :sop")
_SQL_INSERT_INSTANCE = text(
    "INSERT INTO instances (sop_instance_uid, series_fk, study_fk, sop_class_uid, "
    "transfer_syntax_uid, instance_number, path, size_bytes, calling_ae_title, received_at) "
    "VALUES (:sop, :series, :study, :cls, :ts, :num, :path, :size, :aet, :now)"
)
_SQL_COUNT_SERIES = text("UPDATE series SET instance_count = instance_count + 1 WHERE id = :series")
_SQL_COUNT_STUDY = text(
    "UPDATE studies SET instance_count = instance_count + 1, last_received_at = :now "
    "WHERE id = :study"
)
_RERUN_IN = ", ".join(f"'{s}'" for s in _RERUN_FROM)
_SQL_COUNT_STUDY_MR = text(
    "UPDATE studies SET instance_count = instance_count + 1, last_received_at = :now, "
    f"status = CASE WHEN status IN ({_RERUN_IN}) THEN 'received' ELSE status END, "
    f"status_changed_at = CASE WHEN status IN ({_RERUN_IN}) THEN :now "
    "ELSE status_changed_at END, "
    f"analysis_failures = CASE WHEN status IN ({_RERUN_IN}) THEN 0 "
    "ELSE analysis_failures END WHERE id = :study"
)


def _on_cursor(cursor: Any) -> Callable[[Any, dict[str, Any]], Any]:
    """Runs SQL text with named parameters straight on a DB-API cursor."""
    return lambda sql, params: cursor.execute(sql.text, params)


def _insert_instance(
    run: Callable[[Any, dict[str, Any]], Any], rec: InstanceRecord, ids: tuple[int, int], now: float
) -> None:
    """The instance row of `rec` and its series' and study's counts, through `run` (SQL text,
    parameters) in the caller's transaction."""
    study_id, series_id = ids
    run(
        _SQL_INSERT_INSTANCE,
        {
            "sop": rec.sop_instance_uid,
            "series": series_id,
            "study": study_id,
            "cls": rec.sop_class_uid,
            "ts": rec.transfer_syntax_uid,
            "num": rec.instance_number,
            "path": str(rec.path),
            "size": rec.size_bytes,
            "aet": rec.calling_ae_title,
            "now": now,
        },
    )
    run(_SQL_COUNT_SERIES, {"series": series_id})
    # only a new MR instance re-opens an analysed study: a late SR/KO/PR (e.g. our own SR
    # routed back by PACS) is no reason to analyse again
    rerun_sql = _SQL_COUNT_STUDY_MR if rec.modality.upper() == "MR" else _SQL_COUNT_STUDY
    run(rerun_sql, {"study": study_id, "now": now})


def _study_dict(study: Study, patient: Patient) -> dict[str, Any]:
    result = json.loads(study.result_json) if study.result_json else None

    def ms(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round((b - a) * 1000.0, 1)

    return {
        "study_instance_uid": study.study_instance_uid,
        "node_id": study.node_id,
        "site_id": study.site_id,
        "patient_id": patient.patient_id,
        "issuer_of_patient_id": patient.issuer_of_patient_id,
        "patient_name": patient.patient_name,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "status": study.status,
        "referral_urgency": study.referral_urgency,
        # the current decision's flag (the waiting list writes it), else the analysis's
        "priority": study.priority or (result.get("priority") if result else None),
        "instances": study.instance_count,
        "attempts": study.attempts,
        "retry_at": study.retry_at,
        "error": (
            {"code": study.error_code, "message": study.error_message or ""}
            if study.error_code
            else None
        ),
        "result": result,
        "documents": json.loads(study.documents_json) if study.documents_json else [],
        "first_received_at": study.first_received_at,
        "last_received_at": study.last_received_at,
        "completed_at": study.completed_at,
        "analysis_started_at": study.analysis_started_at,
        "reported_at": study.reported_at,
        "sent_at": study.sent_at,
        "timings_ms": {
            "receive": ms(study.first_received_at, study.last_received_at),
            "wait_complete": ms(study.last_received_at, study.completed_at),
            "queue": ms(study.completed_at, study.analysis_started_at),
            "analysis": ms(study.analysis_started_at, study.reported_at),
            "send": ms(study.reported_at, study.sent_at),
        },
    }
