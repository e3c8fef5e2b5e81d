"""Study completeness: when a ``received`` study is ready for analysis.

A study becomes ``complete``

- as soon as the required series (t2w, adc, hbv, found by `imaging.series_selection`) are
  present and geometrically whole (every slice, ImagesInAcquisition / NumberOfFrames / positions,
  `series_geometrically_complete`); this is checked once the study has been quiet for
  ``settle_s`` and has new instances since the last check, so a burst is not rescanned per file;
- otherwise when nothing has arrived for ``stable_age_s`` (the analyser then reports what is
  missing as "not analysed").

A study that will never be analysable becomes ``not_applicable`` after a short quiet period
(``not_applicable_after_s``): no MR series at all, or MR series whose Body Part Examined all name
another body part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from core.domain import REQUIRED_ROLES, StudyStatus
from dicom_node.jobs import transition
from store.index import Index, Series, Study

if TYPE_CHECKING:
    from imaging.series_selection import SelectionRules

log = logging.getLogger(__name__)

ReadyCheck = Callable[[Sequence[Path]], bool]


def required_series_complete(paths: Sequence[Path]) -> bool:
    """True when t2w, adc and hbv are all selected and each is geometrically whole."""
    from imaging.series_selection import select_series, series_geometrically_complete
    from imaging.study_reader import scan_study

    try:
        selection = select_series(scan_study(list(paths)))
        return all(
            role in selection.roles and series_geometrically_complete(selection.roles[role])
            for role in REQUIRED_ROLES
        )
    except Exception:  # anything odd: let the quiet period decide
        log.debug("completeness check failed", exc_info=True)
        return False


@dataclass(frozen=True)
class Decision:
    study_instance_uid: str
    status: StudyStatus
    reason: str


class Assembler:
    """Decides, on each `poll`, which of this node's ``received`` studies move on."""

    def __init__(
        self,
        index: Index,
        stable_age_s: float,
        *,
        settle_s: float = 0.5,
        not_applicable_after_s: float = 2.0,
        ready_check: ReadyCheck = required_series_complete,
        clock: Callable[[], float] = time.time,
        rules: SelectionRules | None = None,
    ) -> None:
        from imaging.series_selection import load_rules

        self.rules = rules or load_rules()  # its body-part policy decides `not_applicable`
        self.index = index
        self.stable_age_s = stable_age_s
        self.settle_s = min(settle_s, stable_age_s)
        self.not_applicable_after_s = min(not_applicable_after_s, stable_age_s)
        self.ready_check = ready_check
        self.clock = clock

    def poll(self) -> list[Decision]:
        now = self.clock()
        with self.index.read() as s:
            studies = s.execute(
                select(
                    Study.id,
                    Study.study_instance_uid,
                    Study.last_received_at,
                    Study.instance_count,
                    Study.checked_instance_count,
                ).where(Study.status == StudyStatus.RECEIVED.value, self.index.mine(Study.node_id))
            ).all()
        decisions = []
        for row in studies:
            decision = self._decide(row, now)
            if decision is None:
                continue
            values: dict[str, Any] = {"now": now}
            if decision.status == StudyStatus.COMPLETE:
                values["completed_at"] = now
            else:
                values["error_code"] = decision.reason.split(":", 1)[0]
                values["error_message"] = decision.reason
            if transition(self.index, decision.study_instance_uid, decision.status, **values):
                log.info(
                    "study %s -> %s (%s)",
                    decision.study_instance_uid,
                    decision.status,
                    decision.reason,
                )
                decisions.append(decision)
        return decisions

    def _decide(self, row: Any, now: float) -> Decision | None:
        uid: str = row.study_instance_uid
        age = now - row.last_received_at
        if age >= self.not_applicable_after_s:
            reason = self._not_applicable(row.id)
            if reason is not None:
                return Decision(uid, StudyStatus.NOT_APPLICABLE, reason)
        if age >= self.stable_age_s:
            return Decision(uid, StudyStatus.COMPLETE, f"quiet for {self.stable_age_s:g} s")
        count: int = row.instance_count
        if age >= self.settle_s and count != row.checked_instance_count:
            with self.index.write() as s:
                s.execute(
                    update(Study).where(Study.id == row.id).values(checked_instance_count=count)
                )
            if self.ready_check(self.index.instance_paths(uid)):
                return Decision(uid, StudyStatus.COMPLETE, "required series complete")
        return None

    def _not_applicable(self, study_id: int) -> str | None:
        with self.index.read() as s:
            series = s.execute(
                select(Series.modality, Series.body_part_examined).where(
                    Series.study_fk == study_id
                )
            ).all()
        mr = [bp for modality, bp in series if modality.upper() == "MR"]
        if not mr:
            found = sorted({m for m, _ in series}) or ["nothing"]
            return f"not_mr: no MR series in the study (found {', '.join(found)})"
        from imaging.series_selection import wrong_body_part

        parts = wrong_body_part(mr, self.rules)
        if parts is not None:
            return f"wrong_body_part: MR of {', '.join(parts)}, not of the prostate"
        return None
