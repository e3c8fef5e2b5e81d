"""Stored shadow results: what a candidate detector said on live studies, never sent anywhere.

One JSON line per study in `<storage root>/shadow/shadow.jsonl` (append-only, flushed per line):

    {"study_instance_uid", "at" (ISO UTC), "primary": {"name", "version", "likelihood"},
     "shadow": {"name", "version", "likelihood", "lesions"} | null, "error": str | null}

The server appends (`ShadowLog.append_comparison`); `radtriage models shadow-report` and the
promotion gate read it (`evaluation.shadow_report`). Only numbers and model references are
stored: no patient identifier beyond the StudyInstanceUID that joins it to the outcomes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.domain import ModelRef

SHADOW_FILE = "shadow.jsonl"


@dataclass(frozen=True)
class ShadowRecord:
    study_instance_uid: str
    at: str
    primary_model: str  # NAME:VERSION
    primary_likelihood: float
    shadow_model: str | None
    shadow_likelihood: float | None
    error: str | None = None


class ShadowLog:
    """Append-only JSONL of shadow comparisons under `folder`."""

    def __init__(self, folder: Path | str) -> None:
        self.path = Path(folder) / SHADOW_FILE
        self._lock = threading.Lock()

    def append_comparison(
        self,
        study_instance_uid: str,
        primary: ModelRef,
        primary_likelihood: float,
        shadow: ModelRef | None,
        shadow_likelihood: float | None,
        *,
        shadow_lesions: int | None = None,
        error: str | None = None,
    ) -> None:
        """Store one study's primary and shadow case likelihoods (or the shadow's error)."""
        entry: dict[str, Any] = {
            "study_instance_uid": str(study_instance_uid),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "primary": {
                "name": primary.name,
                "version": primary.version,
                "likelihood": float(primary_likelihood),
            },
            "shadow": None
            if shadow is None or shadow_likelihood is None
            else {
                "name": shadow.name,
                "version": shadow.version,
                "likelihood": float(shadow_likelihood),
                "lesions": shadow_lesions,
            },
            "error": error,
        }
        line = json.dumps(entry) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()

    def records(self) -> Iterator[ShadowRecord]:
        """Every stored comparison, oldest first (a torn last line is skipped)."""
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    raw = json.loads(line)
                    primary = raw["primary"]
                    shadow = raw.get("shadow")
                    yield ShadowRecord(
                        study_instance_uid=str(raw["study_instance_uid"]),
                        at=str(raw["at"]),
                        primary_model=f"{primary['name']}:{primary['version']}",
                        primary_likelihood=float(primary["likelihood"]),
                        shadow_model=f"{shadow['name']}:{shadow['version']}" if shadow else None,
                        shadow_likelihood=float(shadow["likelihood"]) if shadow else None,
                        error=raw.get("error"),
                    )
                except (ValueError, KeyError, TypeError):
                    continue
