"""What the node records of a study's result: the sortable result columns on ``studies`` and the
``waiting_list`` row (the flag last decided and what each way out last received).

Written by the analysis (`update_result_columns`, in the transaction that stores
``result_json``) and by the waiting-list clock; read by the worklist, FHIR and HL7 projections.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Boolean, Float, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from core.domain import TriageResult
from dicom_node.index import Base, Instance, Study


class WaitingListEntry(Base):
    __tablename__ = "waiting_list"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    priority: Mapped[str] = mapped_column(String(16))
    priority_rank: Mapped[int] = mapped_column(Integer)
    days_waited: Mapped[int | None] = mapped_column(Integer, nullable=True)
    decided_on: Mapped[str] = mapped_column(String(10))
    reasons_json: Mapped[str] = mapped_column(Text, default="[]")
    sr_priority: Mapped[str | None] = mapped_column(String(16), nullable=True)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hl7_priority: Mapped[str | None] = mapped_column(String(16), nullable=True)
    hl7_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    study_reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # what the result says now (flag, PSA density, SR), and what was last queued for FHIR
    result_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    fhir_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stale: Mapped[bool] = mapped_column(Boolean, default=False)  # set by a changed order
    updated_at: Mapped[float] = mapped_column(Float)


def request_date_of(result: TriageResult, now: float) -> str | None:
    """YYYYMMDD of the imaging request: the result's own when it carries one, else the day
    `days_waited` before the report."""
    own = getattr(result, "request_date", None)
    if own:
        return str(own)
    if result.days_waited is None:
        return None
    day = datetime.fromtimestamp(now, UTC).date() - timedelta(days=result.days_waited)
    return day.strftime("%Y%m%d")


def _patient_header(session: Session, study_id: int) -> tuple[str | None, str | None]:
    """PatientSex (0010,0040) and PatientAge (0010,1010) from one instance of the study."""
    from pydicom import dcmread

    path = session.scalar(
        select(Instance.path).where(Instance.study_fk == study_id).order_by(Instance.id).limit(1)
    )
    if path is None:
        return None, None
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientSex", "PatientAge"])
    except Exception:  # unreadable now: the columns stay empty, the worklist shows a dash
        return None, None
    sex = str(ds.get("PatientSex") or "")[:16] or None
    age = str(ds.get("PatientAge") or "")[:16] or None
    return sex, age


def update_result_columns(
    session: Session, study_id: int, result: TriageResult, now: float
) -> None:
    """Copy a finished result into the sortable ``studies`` columns (call it in the same
    transaction that stores ``result_json``)."""
    largest = max((lesion.volume_ml for lesion in result.lesions), default=None)
    sex, age = _patient_header(session, study_id)
    session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(
            priority=result.priority.value,
            priority_rank=result.priority_rank
            if result.priority_rank is not None
            else result.priority.rank,
            case_likelihood=result.case_likelihood,
            largest_lesion_ml=largest,
            gland_volume_ml=result.gland_volume_ml,
            psa_density=result.psa_density,
            request_date=request_date_of(result, now),
            patient_sex=sex,
            patient_age=age,
        )
    )
