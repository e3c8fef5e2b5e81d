"""Training datasets: phantoms and the PI-CAI layout (real ProstateX exam) on the model grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.metadata import InputSpec, Normalisation
from training.datasets import open_dataset, phantom_case, training_case

SPEC = InputSpec(
    spacing_xyz=(1.25, 1.25, 3.0),
    shape_zyx=(24, 64, 64),
    channels=("t2w", "adc", "hbv"),
    normalisation=tuple(Normalisation(channel=c) for c in ("t2w", "adc", "hbv")),
)


def test_phantom_case_on_model_grid() -> None:
    from training.phantoms import synthesize_case

    seed = 0  # csPCa-positive phantom (ISUP 2)
    case = phantom_case(seed, SPEC)
    truth = synthesize_case(seed)
    assert case.image.shape == (3, *SPEC.shape_zyx) and case.channels == SPEC.channels
    assert case.is_cspca == truth.is_cspca and case.has_zones
    assert set(np.unique(case.zones)) == {0, 1, 2}
    grid_ml = np.prod(SPEC.spacing_xyz) / 1000
    assert (case.zones > 0).sum() * grid_ml == pytest.approx(truth.gland_volume_ml, rel=0.1)
    assert case.lesions.any() == truth.is_cspca
    # lesions are where the phantom says: dark on T2W, bright at high b
    t2w, hbv = case.image[0], case.image[2]
    lesion, gland = case.lesions > 0, (case.zones > 0) & (case.lesions == 0)
    assert t2w[lesion].mean() < t2w[gland].mean() and hbv[lesion].mean() > hbv[gland].mean()


def test_picai_layout_with_real_prostatex(prostatex: Path, tmp_path: Path) -> None:
    """The real exam in PI-CAI layout (links in tmp_path; nothing copied into the repo)."""
    shared = prostatex.parent
    case_id = "10795_1000811"
    images = tmp_path / "images" / "10795"
    images.mkdir(parents=True)
    for c in ("t2w", "adc", "hbv"):
        (images / f"{case_id}_{c}.mha").symlink_to(
            shared / "reference_mha" / f"ProstateX-0001_07-08-2011_{c}.mha"
        )
    (tmp_path / "labels").symlink_to(shared / "labels")
    (tmp_path / "marksheet.csv").symlink_to(shared / "labels" / "marksheet_ProstateX-0001.csv")
    (raw,) = list(open_dataset(tmp_path))
    assert raw.case_id == case_id and raw.is_cspca is False
    assert raw.lesion_mask is not None and not raw.lesion_mask.array.any()
    assert raw.gland_mask is not None and raw.zone_mask is not None
    gland_ml = float(raw.gland_mask.array.sum()) * raw.gland_mask.voxel_volume_ml
    assert gland_ml == pytest.approx(28, rel=0.2)  # marksheet: prostate_volume 28 ml
    pz = np.argwhere(raw.zone_mask.array == 1).mean(axis=0)
    tz = np.argwhere(raw.zone_mask.array == 2).mean(axis=0)
    assert pz[1] > tz[1]  # PZ lies posterior (higher LPS y) of TZ
    case = training_case(raw, SPEC)
    assert case.image.shape == (3, *SPEC.shape_zyx) and np.isfinite(case.image).all()
    assert (case.zones > 0).sum() * np.prod(SPEC.spacing_xyz) / 1000 == pytest.approx(
        gland_ml, rel=0.15
    )


@pytest.mark.slow  # seconds of phantoms/training: `make test`, not test-fast
def test_dicom_folders_with_masks(tmp_path: Path) -> None:
    """`radtriage phantom` output (DICOM + masks/ + ground_truth.json) read as a dataset."""
    from training.phantoms import synthesize_case
    from training.phantoms.dicom_writer import write_study

    seeds = (900_011, 900_010)  # csPCa-positive with two lesions; negative
    for seed in seeds:
        write_study(synthesize_case(seed), tmp_path, distractors=False)
    raws = {r.case_id: r for r in open_dataset(tmp_path)}
    assert len(raws) == 2
    for seed in seeds:
        truth = synthesize_case(seed)
        raw = raws[truth.case_id]
        assert raw.is_cspca == truth.is_cspca
        assert raw.t2w.array.shape == truth.t2w.array.shape
        assert raw.lesion_mask is not None and raw.gland_mask is not None
        cspca = np.isin(truth.lesion_mask.array, [x.label for x in truth.lesions if x.is_cspca])
        assert np.array_equal(raw.lesion_mask.array > 0, cspca)
        case = training_case(raw, SPEC)
        assert case.has_zones and case.lesions.any() == truth.is_cspca
