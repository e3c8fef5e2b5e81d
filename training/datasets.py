"""Training data on the model grid, from three sources, all through `models.preprocessing`:

- synthetic phantoms (`training.phantoms.synthesize_case`), made in memory;
- the PI-CAI layout: `<images>/<patient_id>/<patient_id>_<study_id>_{t2w,adc,hbv}.mha` with
  `picai_labels`-style masks and a `marksheet.csv`;
- DICOM study folders (read by `imaging.study_volumes.load_study_volumes`), masks beside:
  `<study>/masks/{lesions,gland,zones}.{mha,nii.gz}` (any grid in the same patient coordinates).

`open_dataset(path)` yields native-grid `RawCase`s (evaluation uses it); `*_cases` put them on
the model grid as `TrainingCase`s.

Every source yields `TrainingCase`s: the same prepared image serving computes, plus labels
resampled (nearest neighbour) onto the model grid.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from core.domain import Volume, cspca_label
from core.errors import InputError
from models.metadata import InputSpec
from models.preprocessing import from_sitk, labels_to_grid, prepare_case

_MASK_SUFFIXES = (".nii.gz", ".mha", ".nii", ".nrrd")


@dataclass(frozen=True, eq=False)
class TrainingCase:
    """One case on the model grid. `zones`: 0 background, 1 PZ, 2 TZ (when `has_zones`; else
    only gland 0/1); `lesions`: 0/1 csPCa voxels."""

    case_id: str
    image: np.ndarray  # (C, Z, Y, X) float32, channels of the spec
    channels: tuple[str, ...]
    zones: np.ndarray  # (Z, Y, X) uint8
    lesions: np.ndarray  # (Z, Y, X) uint8
    is_cspca: bool
    has_zones: bool = True


def case_from_volumes(
    case_id: str,
    t2w: Volume,
    adc: Volume,
    hbv: Volume,
    spec: InputSpec,
    *,
    lesion_mask: Volume | None,
    zone_mask: Volume | None = None,
    gland_mask: Volume | None = None,
    is_cspca: bool | None = None,
) -> TrainingCase:
    """Prepare the image like serving does and put the labels on the same model grid."""
    prepared = prepare_case(t2w, adc, hbv, spec)
    shape = spec.shape_zyx
    lesions = (
        (labels_to_grid(lesion_mask, prepared.grid) > 0).astype(np.uint8)
        if lesion_mask is not None
        else np.zeros(shape, np.uint8)
    )
    if zone_mask is not None:
        zones, has_zones = labels_to_grid(zone_mask, prepared.grid), True
    elif gland_mask is not None:
        zones, has_zones = (labels_to_grid(gland_mask, prepared.grid) > 0).astype(np.uint8), False
    else:
        zones, has_zones = np.zeros(shape, np.uint8), False
    positive = bool(lesions.any()) if is_cspca is None else is_cspca
    image, channels = prepared.image, prepared.channels
    return TrainingCase(case_id, image, channels, zones, lesions, positive, has_zones)


def phantom_case(
    seed: int, spec: InputSpec, vendor: str = "siemens", family: str = "standard"
) -> TrainingCase:
    from training.phantoms import synthesize_case

    case = synthesize_case(seed, vendor=vendor, family=family)
    cspca_labels = [lesion.label for lesion in case.lesions if lesion.is_cspca]
    lesion_mask = case.lesion_mask.with_array(
        np.isin(case.lesion_mask.array, cspca_labels).astype(np.uint8)
    )
    return case_from_volumes(
        f"phantom-{vendor}-{seed}" + ("" if family == "standard" else f"-{family}"),
        case.t2w,
        case.adc,
        case.hbv,
        spec,
        lesion_mask=lesion_mask,
        zone_mask=case.zone_mask,
        is_cspca=case.is_cspca,
    )


def phantom_cases(
    spec: InputSpec,
    seeds: Iterable[int],
    vendors: Sequence[str] = ("siemens", "ge", "philips"),
    families: Sequence[str] = ("standard",),
) -> list[TrainingCase]:
    """Phantoms for `seeds`, vendors and phantom families in rotation (deterministic)."""
    return [
        phantom_case(
            s, spec, vendors[i % len(vendors)], families[(i // len(vendors)) % len(families)]
        )
        for i, s in enumerate(seeds)
    ]


def read_volume(path: Path) -> Volume:
    """An MHA/NIfTI/NRRD file as a Volume (SimpleITK; ITK/LPS geometry)."""
    try:
        return from_sitk(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


def _find_mask(folder: Path, stem: str) -> Path | None:
    for suffix in _MASK_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def read_marksheet(path: Path) -> dict[str, bool]:
    """PI-CAI marksheet.csv -> {"<patient_id>_<study_id>": case_csPCa}. An empty case_csPCa
    falls back to case_ISUP (>= 2); rows with neither (biopsy pending, as a `feedback export`
    marksheet may hold) are left out rather than counted as negatives."""
    out: dict[str, bool] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                cspca = cspca_label(row.get("case_csPCa"), row.get("case_ISUP"))
            except ValueError as exc:
                raise InputError(f"{path} line {line}: {exc}") from exc
            if cspca is not None:
                out[f"{row['patient_id']}_{row['study_id']}"] = cspca
    return out


@dataclass(frozen=True, eq=False)
class RawCase:
    """One labelled case on its native grids (what `open_dataset` yields; evaluation reads it).

    `lesion_mask` holds csPCa lesions (> 0); `zone_mask` 0/1 PZ/2 TZ; `gland_mask` 0/1."""

    case_id: str
    t2w: Volume
    adc: Volume
    hbv: Volume
    lesion_mask: Volume | None
    zone_mask: Volume | None
    gland_mask: Volume | None
    is_cspca: bool | None
    vendor: str | None = None  # a phantom's ground_truth.json says it


def training_case(raw: RawCase, spec: InputSpec) -> TrainingCase:
    return case_from_volumes(
        raw.case_id,
        raw.t2w,
        raw.adc,
        raw.hbv,
        spec,
        lesion_mask=raw.lesion_mask,
        zone_mask=raw.zone_mask,
        gland_mask=raw.gland_mask,
        is_cspca=raw.is_cspca,
    )


def iter_picai(
    images: Path,
    labels: Path,
    marksheet: Path,
    *,
    lesion_dir: str = "csPCa_lesion_delineations/human_expert/resampled",
    zone_dir: str | None = "anatomical_delineations/zonal_pz_tz/AI/Yuan23",
    gland_dir: str | None = "anatomical_delineations/whole_gland/AI/Bosma22b",
    zone_labels: tuple[int, int] = (1, 2),
) -> Iterator[RawCase]:
    """Cases listed in `marksheet` from a PI-CAI layout. `zone_labels` are the (PZ, TZ) values
    of the zonal masks. A csPCa-positive case without a lesion mask is an error."""
    for case_id, positive in read_marksheet(marksheet).items():
        patient = case_id.split("_")[0]
        folder = images / patient
        paths = {c: folder / f"{case_id}_{c}.mha" for c in ("t2w", "adc", "hbv")}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise InputError(f"PI-CAI case {case_id} lacks {missing}")
        vols = {c: read_volume(p) for c, p in paths.items()}
        lesion_path = _find_mask(labels / lesion_dir, case_id)
        if lesion_path is None and positive:
            raise InputError(f"csPCa-positive case {case_id} has no lesion mask in {lesion_dir}")
        lesion = read_volume(lesion_path) if lesion_path else None
        zones = gland = None
        zone_path = _find_mask(labels / zone_dir, case_id) if zone_dir else None
        if zone_path is not None:
            z = read_volume(zone_path)
            pz, tz = zone_labels
            arr = np.where(z.array == pz, 1, np.where(z.array == tz, 2, 0)).astype(np.uint8)
            zones = z.with_array(arr)
            gland = z.with_array((arr > 0).astype(np.uint8))
        if gland_dir and (gland_path := _find_mask(labels / gland_dir, case_id)) is not None:
            g = read_volume(gland_path)
            gland = g.with_array((g.array > 0).astype(np.uint8))
        yield RawCase(
            case_id, vols["t2w"], vols["adc"], vols["hbv"], lesion, zones, gland, positive
        )


def picai_cases(spec: InputSpec, images: Path, labels: Path, marksheet: Path) -> list[TrainingCase]:
    """`iter_picai` on the model grid."""
    return [training_case(r, spec) for r in iter_picai(images, labels, marksheet)]


def iter_dicom(root: Path) -> Iterator[RawCase]:
    """Every sub-folder of `root` holding a DICOM study and a `masks/` folder."""
    from imaging.study_volumes import load_study_volumes

    found = False
    for study in sorted(p for p in root.iterdir() if p.is_dir()):
        masks = study / "masks"
        if not masks.is_dir():
            continue
        found = True
        vols = load_study_volumes(study)
        paths = {k: _find_mask(masks, k) for k in ("lesions", "zones", "gland")}
        read = {k: read_volume(p) if p else None for k, p in paths.items()}
        gland = read["gland"]
        if gland is None and read["zones"] is not None:
            gland = read["zones"].with_array((read["zones"].array > 0).astype(np.uint8))
        lesions, is_cspca = _cspca_only(study, read["lesions"])
        truth = study / "ground_truth.json"
        vendor = json.loads(truth.read_text("utf-8")).get("vendor") if truth.is_file() else None
        yield RawCase(
            study.name,
            vols.t2w,
            vols.adc,
            vols.hbv,
            lesions,
            read["zones"],
            gland,
            is_cspca,
            vendor=vendor,
        )
    if not found:
        raise InputError(
            f"no study folders with a masks/ sub-folder under {root}, and no marksheet.csv "
            "(PI-CAI layout: marksheet.csv, images/, labels/)"
        )


def _cspca_only(study: Path, lesions: Volume | None) -> tuple[Volume | None, bool | None]:
    """With a `ground_truth.json` (as `radtriage phantom` writes), keep only the lesion labels
    it marks csPCa and take the case label from it; otherwise every lesion voxel is csPCa."""
    truth_path = study / "ground_truth.json"
    if not truth_path.is_file():
        return lesions, None
    truth = json.loads(truth_path.read_text(encoding="utf-8"))
    keep = [int(x["label"]) for x in truth.get("lesions", []) if x.get("cspca")]
    if lesions is not None:
        lesions = lesions.with_array(np.isin(lesions.array, keep).astype(np.uint8))
    return lesions, bool(keep)


def dicom_cases(spec: InputSpec, root: Path) -> list[TrainingCase]:
    """`iter_dicom` on the model grid."""
    return [training_case(r, spec) for r in iter_dicom(root)]


def open_dataset(path: Path) -> Iterator[RawCase]:
    """A labelled folder: PI-CAI layout when it holds `marksheet.csv` (with `images/` and
    `labels/`), else DICOM study folders with `masks/`."""
    path = Path(path)
    if (path / "marksheet.csv").is_file():
        return iter_picai(path / "images", path / "labels", path / "marksheet.csv")
    if not path.is_dir():
        raise InputError(f"{path} is not a folder")
    return iter_dicom(path)
