"""A study as the server sees it: selected series, their volumes, and the `inspect` report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from core.domain import REQUIRED_ROLES, SeriesRole, Volume
from core.errors import (
    MissingSeriesError,
    NotDicomError,
    NotMRError,
    RadtriageError,
    WrongBodyPartError,
)
from imaging.series_selection import (
    Selection,
    SelectionRules,
    load_rules,
    select_series,
    wrong_body_part,
)
from imaging.study_reader import StudyScan, scan_study
from imaging.volumes import load_volume_with_headers


@dataclass
class StudyVolumes:
    """The three model inputs of a study with the datasets (no pixels) they came from."""

    study_instance_uid: str
    t2w: Volume
    adc: Volume
    hbv: Volume
    selection: Selection
    series_used: dict[str, str]  # role value -> SeriesInstanceUID
    headers: dict[SeriesRole, list[Dataset]]

    def volume(self, role: SeriesRole) -> Volume:
        return {SeriesRole.T2W: self.t2w, SeriesRole.ADC: self.adc, SeriesRole.HBV: self.hbv}[role]


def _scan(source: Path | StudyScan) -> StudyScan:
    scan = source if isinstance(source, StudyScan) else scan_study(Path(source))
    if not scan.series:
        detail = f"; e.g. {scan.skipped[0][0].name}: {scan.skipped[0][1]}" if scan.skipped else ""
        where = "" if isinstance(source, StudyScan) else f" in {source}"
        raise NotDicomError(f"no readable DICOM image files{where}{detail}")
    return scan


def check_study(scan: StudyScan, rules: SelectionRules) -> None:
    """Study-level refusals before selection: no MR at all, or clearly not a prostate exam.

    The body part is the rules' policy (`series_selection.wrong_body_part`): refused only when
    every MR series names a BodyPartExamined on the deny list (HEAD, KNEE, ...).
    """
    uid = scan.study_instance_uid
    mr = [s for s in scan.series if s.modality.upper() == "MR"]
    if not mr:
        modalities = sorted({s.modality or "?" for s in scan.series})
        raise NotMRError(
            f"study has no MR series (Modality {', '.join(modalities)}); radtriage analyses "
            "prostate MRI",
            study_instance_uid=uid,
        )
    parts = wrong_body_part((s.headers.get("BodyPartExamined") for s in mr), rules)
    if parts is not None:
        raise WrongBodyPartError(
            f"BodyPartExamined is {', '.join(parts)}, not prostate/pelvis; "
            "radtriage analyses prostate MRI only",
            study_instance_uid=uid,
        )


def load_study_volumes(
    source: Path | StudyScan, rules: SelectionRules | None = None
) -> StudyVolumes:
    """Scan, select the T2W/ADC/high-b series and build their volumes.

    Raises NotDicomError, NotMRError, WrongBodyPartError, MissingSeriesError (with `role`) or a
    volume error (GeometryError subclasses, UndecodablePixelDataError) for a selected series.
    """
    rules = rules or load_rules()
    scan = _scan(source)
    check_study(scan, rules)
    selection = select_series(scan, rules)
    return volumes_for_selection(scan, selection)


def volumes_for_selection(scan: StudyScan, selection: Selection) -> StudyVolumes:
    uid = scan.study_instance_uid
    for role in REQUIRED_ROLES:
        if role not in selection.roles:
            raise MissingSeriesError(
                f"no {_ROLE_NAMES[role]} series found in {len(scan.series)} series; "
                "see `radtriage inspect` for why each series was not used",
                role=role.value,
                study_instance_uid=uid,
            )
    volumes: dict[SeriesRole, Volume] = {}
    headers: dict[SeriesRole, list[Dataset]] = {}
    for role in REQUIRED_ROLES:
        try:
            volumes[role], headers[role] = load_volume_with_headers(selection.roles[role])
        except RadtriageError as exc:
            exc.study_instance_uid = exc.study_instance_uid or uid
            raise
    return StudyVolumes(
        study_instance_uid=uid,
        t2w=volumes[SeriesRole.T2W],
        adc=volumes[SeriesRole.ADC],
        hbv=volumes[SeriesRole.HBV],
        selection=selection,
        series_used={r.value: selection.roles[r].series_instance_uid for r in REQUIRED_ROLES},
        headers=headers,
    )


_ROLE_NAMES = {
    SeriesRole.T2W: "axial T2-weighted (t2w)",
    SeriesRole.ADC: "ADC map (adc)",
    SeriesRole.HBV: "high-b-value diffusion (hbv)",
}


def inspect_study(source: Path, rules: SelectionRules | None = None) -> dict[str, Any]:
    """The `radtriage inspect --json` report (DESIGN.md schema); errors go into `error`."""
    report: dict[str, Any] = {
        "study_instance_uid": None,
        "series": [],
        "volumes": {},
        "error": None,
    }
    try:
        rules = rules or load_rules()
        scan = _scan(Path(source))
        report["study_instance_uid"] = scan.study_instance_uid
        selection = select_series(scan, rules)
        report["series"] = [
            {
                "series_instance_uid": c.series_instance_uid,
                "series_number": c.series_number,
                "series_description": c.series_description,
                "role": c.role.value,
                "reason": c.reason,
                "instances": c.instances,
            }
            for c in selection.choices
        ]
        check_study(scan, rules)
        study = volumes_for_selection(scan, selection)
        report["volumes"] = {r.value: study.volume(r).geometry() for r in REQUIRED_ROLES}
    except RadtriageError as exc:
        report["error"] = exc.to_dict()
    return report
