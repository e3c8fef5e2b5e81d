"""`radtriage feedback export [--out DIR] [--dataset DIR]`: what radiologists and pathology
concluded, as a PI-CAI-style outcome marksheet (``--out``: ``DIR/marksheet.csv``, which
`evaluation.outcomes` reads) and as a PI-CAI layout training set (``--dataset``: images, csPCa
voxel labels and marksheet that `radtriage train` reads; `training.feedback_dataset`).

Marksheet columns: ``patient_id``, ``study_id`` (pseudonyms: sha256 of the site's identifiers,
so the export carries no MRN or accession number), ``study_instance_uid``, ``mri_date``,
``pirads``, ``case_ISUP``, ``case_csPCa`` (YES when ISUP >= 2, NO when 0-1, empty while no
biopsy result), ``ai_score`` (the case likelihood the model reported), ``model_name``,
``model_version``, ``site`` (the DICOM node), ``lesion_PIRADS`` (the radiologist's PI-RADS of
each accepted or edited finding), ``finding_decisions`` (``index:accept|reject|edit;...``).
Studies without an AI score are left out (nothing to evaluate).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from core.errors import InputError
from training.feedback_dataset import ACCEPTED, COLUMNS, Finding, StudyFeedback, pseudonym

__all__ = ["COLUMNS", "pseudonym", "register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("feedback", help="export radiologists' reads and biopsy outcomes")
    sub = p.add_subparsers(dest="feedback_command", metavar="ACTION")
    sub.required = True
    e = sub.add_parser(
        "export",
        help="write DIR/marksheet.csv (PI-CAI style) and/or a PI-CAI layout training set",
    )
    e.add_argument("--out", type=Path, default=None, help="folder for the outcome marksheet.csv")
    e.add_argument(
        "--dataset",
        type=Path,
        default=None,
        metavar="DIR",
        help="new folder for a PI-CAI layout training set (images/, labels/, marksheet.csv) "
        "of the studies with a biopsy outcome; never overwritten",
    )
    e.add_argument("--config", type=Path, default=None, help="settings TOML")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from core.settings import load_settings
    from store.index import Index
    from training.feedback_dataset import export_dataset, write_marksheet

    if args.out is None and args.dataset is None:
        raise InputError("feedback export needs --out DIR, --dataset DIR or both")
    settings = load_settings(args.config)
    index = Index(settings.storage.database_url)
    with index.read() as s:
        studies = read_feedback(s)
    rows = [st.row for st in studies]
    summary: dict[str, Any] = {
        "cases": len(rows),
        "with_outcome": sum(1 for r in rows if r["case_csPCa"]),
    }
    lines = []
    if args.dataset is not None:  # first: it may refuse its folder, and then nothing is written
        summary["dataset"] = export_dataset(studies, index, args.dataset).to_dict()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "marksheet.csv"
        write_marksheet(path, rows, COLUMNS)
        summary["marksheet"] = str(path)
        lines.append(
            f"wrote {path}: {summary['cases']} cases, {summary['with_outcome']} with a biopsy "
            "outcome"
        )
    if "dataset" in summary:
        d = summary["dataset"]
        skipped = ", ".join(f"{k} {v}" for k, v in d["skipped"].items()) or "none"
        lines.append(
            f"wrote dataset {d['dataset']}: {d['written']} cases ({d['positive']} csPCa with "
            f"{d['labelled_findings']} accepted lesions, {d['negative']} benign); "
            f"left out: {skipped}"
        )
    print(json.dumps(summary) if args.json else "\n".join(lines))
    return 0


def read_feedback(session: Any) -> list[StudyFeedback]:
    """Every study with an AI score, in index order, with the radiologist's findings."""
    from sqlalchemy import select

    from store.index import Patient, Study
    from workspace.tables import Assessment, FindingAssessment

    q = (
        select(Study, Patient.patient_id, Assessment.pirads_overall, Assessment.isup_grade_group)
        .join(Patient, Study.patient_fk == Patient.id)
        .outerjoin(Assessment, Assessment.study_instance_uid == Study.study_instance_uid)
        .where(Study.case_likelihood.is_not(None))
        .order_by(Study.id)
    )
    findings: dict[str, list[Finding]] = {}
    for fa in session.scalars(select(FindingAssessment).order_by(FindingAssessment.finding_index)):
        findings.setdefault(fa.study_instance_uid, []).append(
            Finding(fa.finding_index, fa.decision, fa.pirads)
        )
    out = []
    for study, patient_id, pirads, isup in session.execute(q):
        result = json.loads(study.result_json) if study.result_json else {}
        model = result.get("model") or {}
        mine = tuple(findings.get(study.study_instance_uid, ()))
        lesion_pirads = [str(f.pirads) for f in mine if f.decision in ACCEPTED and f.pirads]
        row = {
            "patient_id": pseudonym("patient", patient_id or ""),
            "study_id": pseudonym("study", study.study_instance_uid),
            "study_instance_uid": study.study_instance_uid,
            "mri_date": study.study_date or "",
            "pirads": pirads if pirads is not None else "",
            "case_ISUP": isup if isup is not None else "",
            "case_csPCa": "" if isup is None else ("YES" if isup >= 2 else "NO"),
            "ai_score": f"{study.case_likelihood:.6f}",
            "model_name": model.get("name", ""),
            "model_version": model.get("version", ""),
            "site": study.node_id or "",
            "lesion_PIRADS": ",".join(lesion_pirads),
            "finding_decisions": ";".join(f"{f.index}:{f.decision}" for f in mine),
        }
        documents = tuple(Path(p) for p in json.loads(study.documents_json or "[]"))
        out.append(StudyFeedback(row, mine, result, documents))
    return out
