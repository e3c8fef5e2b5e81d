"""The one reader of a study's request attributes in DICOM headers: the referrer's urgency and
the request date, at top level or in the Request Attributes Sequence (0040,0275).

PACS images rarely carry them; the RIS order (`ris.orders`, HL7 v2 or FHIR) is the
better source and wins when it exists. Read tolerantly: an odd value is skipped, never raised.

- Requested Procedure Priority (0040,1003): the most urgent value found (`ReferralUrgency`).
- Issue Date of Imaging Service Request (0040,2004): the earliest valid date not in the future.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import date, datetime
from typing import Any

from pydicom.dataset import Dataset

from core.domain import ReferralUrgency
from core.priority import days_waited


def request_values(headers: Iterable[Dataset], keyword: str) -> Iterator[Any]:
    """`keyword` of each header, at top level and in its Request Attributes Sequence items."""
    for ds in headers:
        try:
            items = list(ds.get("RequestAttributesSequence") or [])
        except (TypeError, ValueError):
            items = []
        for item in (ds, *items):
            try:
                value = item.get(keyword)
            except (TypeError, ValueError):  # a malformed element: read tolerantly
                continue
            if value not in (None, ""):
                yield value


def requested_procedure_priority(ds: Dataset) -> str:
    """The most urgent Requested Procedure Priority of one header, as written ("" if none)."""
    best, best_urgency = "", ReferralUrgency.ROUTINE
    for value in request_values([ds], "RequestedProcedurePriority"):
        text = str(value).strip()
        urgency = ReferralUrgency.from_dicom(text)
        if not best or urgency.rank < best_urgency.rank:
            best, best_urgency = text, urgency
    return best


def referral_urgency(headers: Iterable[Dataset]) -> ReferralUrgency:
    """The most urgent Requested Procedure Priority (0040,1003) found; routine when absent."""
    best = ReferralUrgency.ROUTINE
    for value in request_values(headers, "RequestedProcedurePriority"):
        urgency = ReferralUrgency.from_dicom(str(value))
        if urgency.rank < best.rank:
            best = urgency
    return best


def parse_da(value: Any) -> date | None:
    """A DICOM DA (or HL7 DTM) value's date: its first 8 characters as YYYYMMDD; None if not."""
    try:
        return datetime.strptime(str(value or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def request_date(headers: Iterable[Dataset], today: date) -> date | None:
    """The earliest Issue Date of Imaging Service Request (0040,2004) not after `today`."""
    earliest: date | None = None
    for value in request_values(headers, "IssueDateOfImagingServiceRequest"):
        issued = parse_da(value)
        if issued is not None and issued <= today and (earliest is None or issued < earliest):
            earliest = issued
    return earliest


def _top_level(headers: Iterable[Dataset], keyword: str) -> list[Any]:
    out = []
    for ds in headers:
        try:
            out.append(ds.get(keyword))
        except (TypeError, ValueError):  # a malformed element: read tolerantly
            continue
    return out


def clock_start(
    headers: Iterable[Dataset], today: date
) -> tuple[date | None, str | None, str | None]:
    """(date, source, note) where the waiting-list clock of a study without an order starts:
    the earliest Issue Date of Imaging Service Request, else the earliest Study Date (0008,0020),
    else (None, None, None) and the caller falls back to the received date. A date after
    `today` is clamped to `today` and the note says so (never dropped)."""
    headers = list(headers)
    for source, values in (
        ("dicom_request", request_values(headers, "IssueDateOfImagingServiceRequest")),
        ("study_date", _top_level(headers, "StudyDate")),
    ):
        dates = [d for d in (parse_da(v) for v in values if v) if d is not None]
        if dates:
            first = min(dates)
            if first > today:
                note = f"{source} {first.isoformat()} is after today; clamped to today"
                return today, source, note
            return first, source, None
    return None, None, None


def days_since_referral(headers: Iterable[Dataset], today: date) -> int | None:
    """Days from `request_date` to `today` (`core.priority.days_waited`): None without a
    valid past date, or for a request over a year old (an archive study, not a waiting one)."""
    return days_waited(request_date(headers, today), today)
