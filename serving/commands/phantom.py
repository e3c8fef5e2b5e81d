"""`radtriage phantom`: write synthetic bpMRI DICOM studies with ground truth and masks."""

from __future__ import annotations

import argparse
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
    label = p.add_mutually_exclusive_group()
    label.add_argument("--positive", action="store_true", help="every study has csPCa")
    label.add_argument("--negative", action="store_true", help="no study has csPCa")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from training.phantoms import generate_studies

    if args.studies < 1:
        raise InputError(f"--studies must be >= 1, got {args.studies}")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} exists and is not a folder; choose a folder path")
    cspca = True if args.positive else False if args.negative else None
    folders = generate_studies(
        args.out,
        args.studies,
        args.seed,
        vendor=args.vendor,
        enhanced=args.enhanced,
        cspca=cspca,
        dce=args.dce,
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
