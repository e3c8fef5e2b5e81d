"""`radtriage phantom`: write synthetic bpMRI DICOM studies with ground truth and masks."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="write synthetic bi-parametric prostate MRI DICOM studies",
        description="Synthetic bpMRI studies (T2W, DWI, ADC, computed b1400, distractor series) "
        "with ground_truth.json and gland/zone/lesion masks. Deterministic by seed.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--studies", type=int, default=1, help="number of studies (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first study (default 0)")
    p.add_argument("--vendor", choices=("siemens", "ge", "philips"), default="siemens")
    p.add_argument("--enhanced", action="store_true", help="Enhanced MR multi-frame files")
    p.add_argument(
        "--dce",
        action="store_true",
        help="add a dynamic contrast-enhanced T1 series (6 phases, classic MR): a distractor",
    )
    p.add_argument(
        "--request-days-ago",
        type=int,
        metavar="N",
        help="the imaging request was issued N days before today (0040,2004): the waiting-list "
        "clock the FDS escalation reads",
    )
    p.add_argument(
        "--referral",
        choices=("stat", "high", "medium", "routine", "low"),
        help="Requested Procedure Priority (0040,1003) of the request (default routine)",
    )
    label = p.add_mutually_exclusive_group()
    label.add_argument("--positive", action="store_true", help="every study has csPCa")
    label.add_argument("--negative", action="store_true", help="no study has csPCa")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from training.phantoms import ImagingRequest, generate_studies

    if args.studies < 1:
        raise InputError(f"--studies must be >= 1, got {args.studies}")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} exists and is not a folder; choose a folder path")
    cspca = True if args.positive else False if args.negative else None
    request = None
    if args.request_days_ago is not None or args.referral is not None:
        days = args.request_days_ago or 0
        if days < 0:
            raise InputError(f"--request-days-ago must be >= 0, got {days}")
        issued = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days)
        request = ImagingRequest(issued, (args.referral or "routine").upper())
    folders = generate_studies(
        args.out,
        args.studies,
        args.seed,
        vendor=args.vendor,
        enhanced=args.enhanced,
        cspca=cspca,
        dce=args.dce,
        request=request,
    )
    if args.json:
        studies = []
        for folder in folders:
            truth = json.loads((folder / "ground_truth.json").read_text())
            studies.append(
                {
                    "path": str(folder),
                    "study_instance_uid": truth["study_instance_uid"],
                    "case_id": truth["case_id"],
                    "label": truth["label"],
                    "lesions": len(truth["lesions"]),
                }
            )
        print(
            json.dumps(
                {
                    "out": str(args.out),
                    "vendor": args.vendor,
                    "enhanced": args.enhanced,
                    "dce": args.dce,
                    "studies": studies,
                }
            )
        )
    else:
        for folder in folders:
            print(folder)
    return 0
