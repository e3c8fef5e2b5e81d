"""`radtriage feedback export --out DIR`: what radiologists and pathology concluded, as a
PI-CAI-style marksheet (``DIR/marksheet.csv``) that `evaluation.outcomes` reads.

Columns: ``patient_id``, ``study_id`` (pseudonyms: sha256 of the site's identifiers, so the
export carries no MRN or accession number), ``study_instance_uid``, ``mri_date``, ``pirads``,
``case_ISUP``, ``case_csPCa`` (YES when ISUP >= 2, NO when 0-1, empty while no biopsy result),
``ai_score`` (the case likelihood the model reported), ``model_name``, ``model_version``,
``site`` (the DICOM node). Studies without an AI score are left out (nothing to evaluate).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path
from typing import Any

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
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("feedback", help="export radiologists' reads and biopsy outcomes")
    sub = p.add_subparsers(dest="feedback_command", metavar="ACTION")
    sub.required = True
    e = sub.add_parser("export", help="write DIR/marksheet.csv (PI-CAI style)")
    e.add_argument("--out", type=Path, required=True, help="folder for marksheet.csv")
    e.add_argument("--config", type=Path, default=None, help="settings TOML")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run_export)


def pseudonym(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def marksheet_rows(session: Any) -> list[dict[str, Any]]:
    """One row per study with an AI score, in index order."""
    from sqlalchemy import select

    from dicom_node.index import Patient
    from dicom_node.worklist import STUDIES
    from dicom_node.workspace_tables import Assessment

    q = (
        select(
            STUDIES.c.study_instance_uid,
            STUDIES.c.study_date,
            STUDIES.c.accession_number,
            STUDIES.c.node_id,
            STUDIES.c.case_likelihood,
            STUDIES.c.result_json,
            Patient.patient_id,
            Assessment.pirads_overall,
            Assessment.isup_grade_group,
        )
        .select_from(
            STUDIES.join(Patient, STUDIES.c.patient_fk == Patient.id).outerjoin(
                Assessment, Assessment.study_instance_uid == STUDIES.c.study_instance_uid
            )
        )
        .where(STUDIES.c.case_likelihood.is_not(None))
        .order_by(STUDIES.c.id)
    )
    rows = []
    for r in session.execute(q):
        model = (json.loads(r.result_json) if r.result_json else {}).get("model") or {}
        isup = r.isup_grade_group
        rows.append(
            {
                "patient_id": pseudonym("patient", r.patient_id or ""),
                "study_id": pseudonym("study", r.study_instance_uid),
                "study_instance_uid": r.study_instance_uid,
                "mri_date": r.study_date or "",
                "pirads": r.pirads_overall if r.pirads_overall is not None else "",
                "case_ISUP": isup if isup is not None else "",
                "case_csPCa": "" if isup is None else ("YES" if isup >= 2 else "NO"),
                "ai_score": f"{r.case_likelihood:.6f}",
                "model_name": model.get("name", ""),
                "model_version": model.get("version", ""),
                "site": r.node_id or "",
            }
        )
    return rows


def run_export(args: argparse.Namespace) -> int:
    from core.settings import load_settings
    from dicom_node.index import Index

    settings = load_settings(args.config)
    index = Index(settings.storage.database_url)
    with index.read() as s:
        rows = marksheet_rows(s)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "marksheet.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    labelled = sum(1 for r in rows if r["case_csPCa"])
    if args.json:
        print(json.dumps({"marksheet": str(path), "cases": len(rows), "with_outcome": labelled}))
    else:
        print(f"wrote {path}: {len(rows)} cases, {labelled} with a biopsy outcome")
    return 0
