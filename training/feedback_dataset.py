"""What radiologists and pathologists concluded, as data: the outcome marksheet and a PI-CAI
layout training set (`radtriage feedback export --out DIR --dataset DIR`).

The dataset (`export_dataset`) is what `training.datasets.iter_picai`/`picai_cases`,
`radtriage train` (``data.source = "picai"``) and `radtriage evaluate --data` read unchanged::

    DIR/marksheet.csv     the cases written (outcome-marksheet columns, `MARKSHEET_COLUMNS`)
    DIR/images/<patient_id>/<patient_id>_<study_id>_{t2w,adc,hbv}.mha
    DIR/labels/csPCa_lesion_delineations/human_expert/resampled/<patient_id>_<study_id>.nii.gz
    DIR/export.json       counts, skipped cases by reason, the label rule

Images are the three spooled series the analysis used (the index's instance paths, the same
`imaging.study_volumes.load_study_volumes` selection, checked against the result's
`series_used`), on their native grids. Labels (csPCa voxels, 0/1, on the T2W grid):

- biopsy ISUP >= 2: the AI lesions the radiologist accepted or edited, from the SEG the analysis
  sent (segment "AI lesion N" is finding N-1); a positive case with no accepted finding, or
  whose accepted finding has no segment, is left out (a partial mask would teach "not cancer");
- biopsy ISUP 0-1: an empty mask, whatever the AI or the radiologist marked;
- no biopsy yet: left out.

Every name on disk is a pseudonym (sha256 of the site's identifiers); no path is built from a
DICOM or HTTP field, and the files carry pixels and geometry only. The set is written into a
temporary sibling folder and renamed into place: a refused or failed export leaves nothing
behind and never touches an existing folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

from core.domain import SeriesRole, Volume
from core.errors import GeometryError, InputError, RadtriageError
from core.progress import progress
from models.preprocessing import to_sitk

log = logging.getLogger(__name__)

COLUMNS = (
    "patient_id",
    "study_id",
    "study_instance_uid",
    "mri_date",
    "pirads",
    "case_ISUP",
    "case_csPCa",
    "ai_score",
    "model_name",
    "model_version",
    "site",
    "lesion_PIRADS",  # PI-CAI column: the radiologist's PI-RADS of each accepted/edited finding
    "finding_decisions",  # "<finding index>:<accept|reject|edit>;..." (result.json order)
)
MARKSHEET_COLUMNS = (*COLUMNS, "labelled_findings")
LESION_DIR = "csPCa_lesion_delineations/human_expert/resampled"  # `iter_picai`'s default
ACCEPTED = ("accept", "edit")
_LESION_LABEL = re.compile(r"^AI lesion (\d+)$")

# why a case is not in the voxel set (export.json `skipped`)
PENDING = "outcome_pending"
NO_ACCEPTED = "positive_without_accepted_finding"
NO_MASK = "accepted_finding_without_mask"
NO_SEG = "seg_unavailable"
SEG_MISMATCH = "seg_mismatch"
NO_IMAGES = "images_unavailable"
SERIES_CHANGED = "series_changed"
UNREADABLE = "images_unreadable"


def pseudonym(*parts: str) -> str:
    """16 hex digits of sha256 over `parts`: stable, carries no identifier."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Finding:
    """The radiologist's decision on one AI finding (`FindingAssessment`)."""

    index: int
    decision: str
    pirads: int | None


@dataclass(frozen=True)
class StudyFeedback:
    """One reported study: its marksheet row and what the dataset export needs besides."""

    row: dict[str, Any]
    findings: tuple[Finding, ...]
    result: dict[str, Any]
    documents: tuple[Path, ...]

    @property
    def case_id(self) -> str:
        return f"{self.row['patient_id']}_{self.row['study_id']}"

    @property
    def isup(self) -> int | None:
        value = self.row["case_ISUP"]
        return None if value == "" else int(value)

    def accepted(self) -> list[int]:
        """Indices of the findings accepted or edited that exist in result.json."""
        n = len(self.result.get("lesions") or ())
        return sorted(f.index for f in self.findings if f.decision in ACCEPTED and f.index < n)


def write_marksheet(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --- the SEG the analysis sent ----------------------------------------------------------------


def seg_document(documents: Sequence[Path]) -> Path | None:
    """The SEG among a study's sent documents (paths the index holds), by its Modality."""
    for path in documents:
        try:
            if str(pydicom.dcmread(path, stop_before_pixels=True).Modality) == "SEG":
                return path
        except Exception:
            continue
    return None


def read_lesion_masks(
    seg_path: Path, study_instance_uid: str, t2w_headers: Sequence[Any], t2w: Volume
) -> dict[int, np.ndarray]:
    """{finding index: bool mask on the T2W grid} from a SEG written by `dicom_node.seg`.

    Raises GeometryError when the SEG belongs to another study or references images that are
    not this T2W series (a re-sent or re-analysed study)."""
    from imaging.seg_frames import segment_masks

    seg = pydicom.dcmread(seg_path)
    if str(seg.get("StudyInstanceUID", "")) != study_instance_uid:
        raise GeometryError("the SEG belongs to another study")
    by_number = segment_masks(seg, t2w_headers, t2w, strict=True)
    findings: dict[int, int] = {}  # segment number -> finding index
    for s in seg.SegmentSequence:
        m = _LESION_LABEL.match(str(s.SegmentLabel))
        if m:
            findings[int(s.SegmentNumber)] = int(m.group(1)) - 1
    return {index: by_number[number] for number, index in findings.items()}


# --- the dataset ------------------------------------------------------------------------------


@dataclass
class DatasetExport:
    """What `export_dataset` wrote and what it left out, by reason."""

    root: Path
    written: int = 0
    positive: int = 0
    negative: int = 0
    labelled_findings: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_cases: list[dict[str, str]] = field(default_factory=list)

    def skip(self, case_id: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.skipped_cases.append({"case_id": case_id, "reason": reason, "detail": detail})

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": str(self.root),
            "written": self.written,
            "positive": self.positive,
            "negative": self.negative,
            "labelled_findings": self.labelled_findings,
            "skipped": dict(sorted(self.skipped.items())),
        }


@dataclass(frozen=True)
class _Case:
    volumes: dict[str, Volume]
    lesions: Volume
    labelled: int


def _load_case(study: StudyFeedback, index: Any, report: DatasetExport) -> _Case | None:
    """The case's volumes and csPCa mask, or None after recording why it is left out."""
    from imaging.study_reader import scan_study
    from imaging.study_volumes import load_study_volumes

    case_id, isup = study.case_id, study.isup
    if isup is None:
        report.skip(case_id, PENDING)
        return None
    positive, accepted = isup >= 2, study.accepted()
    if positive and not accepted:
        report.skip(case_id, NO_ACCEPTED)
        return None
    paths = index.instance_paths(study.row["study_instance_uid"])
    if not paths or not all(p.is_file() for p in paths):
        report.skip(case_id, NO_IMAGES, f"{sum(p.is_file() for p in paths)}/{len(paths)} files")
        return None
    try:
        vols = load_study_volumes(scan_study(paths))
    except RadtriageError as exc:
        report.skip(case_id, UNREADABLE, exc.reason_code)
        return None
    used = study.result.get("series_used") or {}
    if used and used != vols.series_used:
        report.skip(case_id, SERIES_CHANGED)
        return None
    t2w = vols.t2w
    mask = np.zeros(t2w.array.shape, dtype=np.uint8)
    if positive:
        seg = seg_document(study.documents)
        if seg is None:
            report.skip(case_id, NO_SEG)
            return None
        try:
            masks = read_lesion_masks(
                seg, study.row["study_instance_uid"], vols.headers[SeriesRole.T2W], t2w
            )
        except GeometryError as exc:
            report.skip(case_id, SEG_MISMATCH, exc.message)
            return None
        missing = [i for i in accepted if i not in masks or not masks[i].any()]
        if missing:
            report.skip(case_id, NO_MASK, ",".join(map(str, missing)))
            return None
        for i in accepted:
            mask[masks[i]] = 1
    volumes = {"t2w": t2w, "adc": vols.adc, "hbv": vols.hbv}
    return _Case(volumes, t2w.with_array(mask), len(accepted) if positive else 0)


def _check_target(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InputError(
            f"{root} already exists and is not an empty folder; the dataset export never "
            "overwrites: choose a new folder"
        )


def export_dataset(studies: Sequence[StudyFeedback], index: Any, root: Path) -> DatasetExport:
    """Write the PI-CAI layout training set of `studies` (see the module docstring) to `root`.

    `index`: the node's `store.index.Index` (instance paths). Raises InputError before
    writing anything when `root` exists and is not empty."""
    root = Path(root)
    _check_target(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    report = DatasetExport(root)
    rows = []
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        (staging / "images").mkdir()
        (staging / "labels" / LESION_DIR).mkdir(parents=True)
        for study in progress(studies, "feedback cases", len(studies)):
            case = _load_case(study, index, report)
            if case is None:
                continue
            patient = str(study.row["patient_id"])
            folder = staging / "images" / patient
            folder.mkdir(exist_ok=True)
            for channel, volume in case.volumes.items():
                sitk.WriteImage(
                    to_sitk(volume), str(folder / f"{study.case_id}_{channel}.mha"), True
                )
            label_path = staging / "labels" / LESION_DIR / f"{study.case_id}.nii.gz"
            sitk.WriteImage(to_sitk(case.lesions), str(label_path), True)
            rows.append({**study.row, "labelled_findings": case.labelled})
            report.written += 1
            report.labelled_findings += case.labelled
            if case.labelled:
                report.positive += 1
            else:
                report.negative += 1
        write_marksheet(staging / "marksheet.csv", rows, MARKSHEET_COLUMNS)
        manifest = {
            **report.to_dict(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "labels": "csPCa voxels: biopsy ISUP >= 2 -> AI lesions accepted/edited by the "
            "radiologist (the analysis SEG); ISUP 0-1 -> empty; no biopsy -> left out",
            "skipped_cases": report.skipped_cases,
        }
        (staging / "export.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
        _check_target(root)  # still free: another export did not take it meanwhile
        if root.exists():
            root.rmdir()
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("feedback dataset %s: %s", root, report.to_dict())
    return report
