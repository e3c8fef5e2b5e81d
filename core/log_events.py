"""Structured JSON logs without patient identifiers.

Every record becomes one JSON object per line: ``ts``, ``level``, ``logger``, ``event`` plus the
fields passed with `log_event`. Keys that name patient identifiers (PatientName, PatientID,
AccessionNumber, birth date, ...) are dropped whatever their spelling, so a careless `extra=` never
puts PHI in the log. Studies are referred to by StudyInstanceUID only.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import IO, Any

# Normalised (lower case, no separators) names of attributes that identify a patient.
PHI_KEYS = frozenset(
    {
        "patientname",
        "patientid",
        "otherpatientids",
        "patientbirthdate",
        "patientaddress",
        "patientsex",
        "patientage",
        "accessionnumber",
        "referringphysicianname",
        "institutionname",
        "studyid",
    }
)

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _is_phi(key: str) -> bool:
    return re.sub(r"[^a-z]", "", key.lower()) in PHI_KEYS


def scrub(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` without patient identifiers (recursively for nested dicts)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if _is_phi(key):
            continue
        out[key] = scrub(value) if isinstance(value, dict) else value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record; extra fields merged in, PHI keys removed."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        doc.update(scrub(extra))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_json_logging(level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Route the root logger to `stream` (stderr) as JSON lines; replaces existing handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with structured `fields` (PHI keys dropped; a field named like a LogRecord
    attribute, e.g. ``message``, gets a trailing underscore)."""
    safe = {(f"{k}_" if k in _STANDARD_ATTRS else k): v for k, v in scrub(fields).items()}
    logger.log(level, event, extra=safe)
