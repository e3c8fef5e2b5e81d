"""Phantom families: `standard` is fixed, `randomised` widens the domain (training's DR)."""

from __future__ import annotations

import numpy as np
import pytest

from training.phantoms import synthesize_case
from training.phantoms.anatomy import RANDOMISED, STANDARD


def _tilt_deg(case) -> float:  # type: ignore[no-untyped-def]
    """Angle between the slice normal and the patient's S axis."""
    normal = case.t2w.direction_matrix[:, 2]
    return float(np.degrees(np.arccos(abs(normal[2]) / np.linalg.norm(normal))))


def test_randomised_is_deterministic_and_differs_from_standard() -> None:
    a = synthesize_case(11, vendor="ge", family="randomised")
    b = synthesize_case(11, vendor="ge", family="randomised")
    s = synthesize_case(11, vendor="ge")
    assert np.array_equal(a.t2w.array, b.t2w.array)
    assert a.study_instance_uid == b.study_instance_uid
    assert a.t2w.array.shape != s.t2w.array.shape or not np.array_equal(a.t2w.array, s.t2w.array)


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="family must be one of"):
        synthesize_case(1, family="alien")


@pytest.mark.slow  # seconds of training/evaluation: `make test`, not test-fast
def test_randomised_family_covers_the_wider_ranges() -> None:
    standard = [synthesize_case(s, vendor="siemens", cspca=True) for s in range(20)]
    randomised = [
        synthesize_case(s, vendor="siemens", cspca=True, family="randomised") for s in range(20)
    ]

    def smallest_cspca(cases) -> float:  # type: ignore[no-untyped-def]
        return min(le.volume_ml for c in cases for le in c.lesions if le.is_cspca)

    # Lesions down to ~0.1 ml only in the randomised family (standard draws >= 0.35 ml).
    assert smallest_cspca(randomised) < 0.3 < smallest_cspca(standard)
    assert min(le.volume_ml for c in randomised for le in c.lesions if le.is_cspca) >= 0.05
    # Obliquity beyond the standard +-8 degrees, and slice thicknesses other than 3 mm.
    assert max(_tilt_deg(c) for c in randomised) > 10.0 >= max(_tilt_deg(c) for c in standard)
    assert {c.t2w.spacing[2] for c in standard} == {3.0}
    assert len({c.t2w.spacing[2] for c in randomised}) > 1
    # Glands outside the standard 20-80 ml.
    volumes = [c.gland_volume_ml for c in randomised]
    assert min(volumes) < STANDARD.gland_ml[0] + 5 or max(volumes) > STANDARD.gland_ml[1]
    assert RANDOMISED.cspca_ml[0] <= 0.1


@pytest.mark.slow  # seconds of training/evaluation: `make test`, not test-fast
def test_every_randomised_csPCa_case_keeps_a_labelled_lesion() -> None:
    for seed in range(30):
        case = synthesize_case(seed, vendor="philips", cspca=True, family="randomised")
        assert case.is_cspca
        assert np.any(case.lesion_mask.array > 0)
        assert np.isfinite(case.adc.array).all() and np.isfinite(case.hbv.array).all()
