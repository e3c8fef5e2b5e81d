"""Synthetic bi-parametric prostate MRI phantoms: the training, test and demo data source.

`synthesize_case` builds a case in memory (fast, deterministic by seed); `write_study` writes it as
a vendor-flavoured DICOM study (classic or Enhanced MR) with `ground_truth.json` and masks.
"""

from training.phantoms.anatomy import (
    ACQUIRED_B_VALUES,
    HIGH_B_VALUE,
    VENDORS,
    PhantomCase,
    PhantomLesion,
    synthesize_case,
)
from training.phantoms.dicom_writer import ImagingRequest, generate_studies, write_study

__all__ = [
    "ACQUIRED_B_VALUES",
    "HIGH_B_VALUE",
    "VENDORS",
    "ImagingRequest",
    "PhantomCase",
    "PhantomLesion",
    "generate_studies",
    "synthesize_case",
    "write_study",
]
