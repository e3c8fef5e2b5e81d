"""Study completeness: ready at once when whole, else after the quiet period; not applicable
quickly when no prostate MRI will ever come."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest

from core.domain import StudyStatus
from dicom_node.assembler import Assembler, required_series_complete
from store.index import Index, InstanceRecord


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _add(
    index: Index, study: str, sop: str, now: float, modality: str = "MR", body: str = ""
) -> None:
    index.add_instance(
        InstanceRecord(
            sop_instance_uid=sop,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            series_instance_uid=f"{study}.{modality}.1",
            study_instance_uid=study,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=Path(f"/nowhere/{sop}.dcm"),
            size_bytes=1,
            modality=modality,
            body_part_examined=body,
        ),
        now,
    )


def _status(index: Index, uid: str) -> str:
    study = index.get_study(uid)
    assert study is not None
    return str(study["status"])


def test_quiet_period_then_complete(tmp_path: Path) -> None:
    index, clock = Index(f"sqlite:///{tmp_path}/i.db"), Clock()
    checks: list[int] = []

    def never_ready(paths: Sequence[Path]) -> bool:
        checks.append(len(paths))
        return False

    asm = Assembler(index, stable_age_s=10, ready_check=never_ready, clock=clock)
    _add(index, "1.1", "1.1.1", clock.now)
    assert asm.poll() == []
    clock.now += 1
    assert asm.poll() == [] and checks == [1]
    assert asm.poll() == [] and checks == [1]  # no new instance: no rescan
    clock.now += 9.5
    [decision] = asm.poll()
    assert decision.status == StudyStatus.COMPLETE and "quiet" in decision.reason
    assert _status(index, "1.1") == "complete"
    assert index.get_study("1.1")["completed_at"] == clock.now  # type: ignore[index]


def test_complete_as_soon_as_required_series_are_whole(tmp_path: Path) -> None:
    index, clock = Index(f"sqlite:///{tmp_path}/i.db"), Clock()
    asm = Assembler(index, stable_age_s=600, ready_check=lambda p: len(p) >= 2, clock=clock)
    _add(index, "1.1", "1.1.1", clock.now)
    clock.now += 1
    assert asm.poll() == []
    _add(index, "1.1", "1.1.2", clock.now)
    clock.now += 1
    [decision] = asm.poll()
    assert decision.reason == "required series complete"


@pytest.mark.parametrize(
    ("modality", "body", "code"),
    [("SR", "", "not_mr"), ("CT", "PELVIS", "not_mr"), ("MR", "KNEE", "wrong_body_part")],
)
def test_not_applicable_after_a_short_quiet_period(
    tmp_path: Path, modality: str, body: str, code: str
) -> None:
    index, clock = Index(f"sqlite:///{tmp_path}/i.db"), Clock()
    asm = Assembler(index, stable_age_s=600, ready_check=lambda p: False, clock=clock)
    _add(index, "1.1", "1.1.1", clock.now, modality, body)
    assert asm.poll() == []
    clock.now += 2.5
    [decision] = asm.poll()
    assert decision.status == StudyStatus.NOT_APPLICABLE
    study = index.get_study("1.1")
    assert study is not None and study["status"] == "not_applicable"
    assert study["error"]["code"] == code


def test_prostate_mr_is_not_not_applicable(tmp_path: Path) -> None:
    index, clock = Index(f"sqlite:///{tmp_path}/i.db"), Clock()
    asm = Assembler(index, stable_age_s=600, ready_check=lambda p: False, clock=clock)
    _add(index, "1.1", "1.1.1", clock.now, "MR", "PROSTATE")
    _add(index, "1.1", "1.1.2", clock.now, "SR", "")
    clock.now += 5
    assert asm.poll() == []


def test_real_exam_is_ready_only_when_whole(prostatex: Path) -> None:
    paths = sorted(p for p in prostatex.rglob("*") if p.is_file() and p.suffix in {"", ".dcm"})
    assert required_series_complete(paths)
    adc = [p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).SeriesNumber == 8]
    missing_middle_adc = [p for p in paths if p != adc[len(adc) // 2]]
    assert not required_series_complete(missing_middle_adc)
