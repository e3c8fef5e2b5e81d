"""Pure pre-processing: geometry of the model grid, resampling round trips, normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from core.domain import Volume
from models.metadata import InputSpec, Normalisation
from models.preprocessing import (
    labels_to_grid,
    model_grid,
    normalise,
    prepare_case,
    resample_to_reference,
)

OBLIQUE = tuple(
    np.array(
        [[np.cos(0.1), -np.sin(0.1), 0.0], [np.sin(0.1), np.cos(0.1), 0.0], [0.0, 0.0, 1.0]]
    ).ravel()
)


def volume(shape=(10, 40, 50), spacing=(0.8, 0.8, 3.0), origin=(-20.0, -15.0, -12.0), seed=0):
    rng = np.random.default_rng(seed)
    return Volume(rng.normal(100, 20, shape).astype(np.float32), spacing, origin, OBLIQUE)


SPEC = InputSpec(
    spacing_xyz=(2.0, 2.0, 3.0),
    shape_zyx=(8, 16, 16),
    channels=("t2w", "adc", "hbv"),
    normalisation=tuple(Normalisation(channel=c) for c in ("t2w", "adc", "hbv")),
)


def test_model_grid_is_centred_on_t2w_and_keeps_its_orientation() -> None:
    t2w = volume()
    grid = model_grid(t2w, SPEC)
    assert grid.array.shape == SPEC.shape_zyx
    assert grid.spacing == SPEC.spacing_xyz and grid.direction == t2w.direction
    centre_t2w = t2w.index_to_lps((np.array(t2w.size) - 1) / 2)
    centre_grid = grid.index_to_lps((np.array(grid.size) - 1) / 2)
    np.testing.assert_allclose(centre_grid, centre_t2w, atol=1e-6)


def test_resample_to_same_grid_is_identity_and_labels_stay_labels() -> None:
    v = volume()
    same = resample_to_reference(v, v, order=1)
    np.testing.assert_allclose(same.array, v.array, atol=1e-3)
    labels = v.with_array((np.arange(v.array.size).reshape(v.array.shape) % 3).astype(np.uint8))
    coarse = Volume(np.zeros((5, 20, 25), np.float32), (1.6, 1.6, 6.0), v.origin, v.direction)
    out = resample_to_reference(labels, coarse, order=0)
    assert out.array.dtype == np.uint8 and set(np.unique(out.array)) <= {0, 1, 2}
    assert labels_to_grid(labels, coarse).dtype == np.uint8


def test_resample_follows_patient_coordinates() -> None:
    """A bright point stays at the same LPS position across grids of different spacing."""
    fine = volume()
    arr = np.zeros_like(fine.array)
    arr[5, 19:22, 24:27] = 1000.0  # a 3x3 blob: a single voxel can fall between coarse centres
    fine = fine.with_array(arr)
    point = fine.index_to_lps([25, 20, 5])
    coarse = Volume(np.zeros((10, 20, 25), np.float32), (1.6, 1.6, 3.0), fine.origin, OBLIQUE)
    out = resample_to_reference(fine, coarse, order=1)
    peak = np.unravel_index(np.argmax(out.array), out.array.shape)
    assert np.linalg.norm(coarse.index_to_lps(peak[::-1]) - point) < 1.6


def test_prepare_case_shapes_normalisation_and_way_back() -> None:
    t2w, adc, hbv = (
        volume(seed=1),
        volume(shape=(10, 20, 25), spacing=(1.6, 1.6, 3.0), seed=2),
        (volume(shape=(10, 20, 25), spacing=(1.6, 1.6, 3.0), seed=3)),
    )
    prepared = prepare_case(t2w, adc, hbv, SPEC)
    assert prepared.image.shape == (3, *SPEC.shape_zyx) and prepared.image.dtype == np.float32
    assert np.isfinite(prepared.image).all() and np.abs(prepared.image).max() <= 5.0
    assert prepared.model_input(("hbv", "t2w")).shape == (2, *SPEC.shape_zyx)
    back = prepared.to_reference(np.ones(SPEC.shape_zyx, np.float32))
    assert back.array.shape == t2w.array.shape and back.spacing == t2w.spacing
    # the model grid (32 x 32 x 24 mm) covers the T2W centre but not its corners
    assert back.array[5, 20, 25] == pytest.approx(1.0) and back.array[0, 0, 0] == 0.0


def test_normalise_zscore_and_clip() -> None:
    a = np.array([0.0, 10.0, 20.0, 1000.0], np.float32)
    out = normalise(a, Normalisation(channel="adc", method="zscore", clip=(-1.0, 1.0)))
    assert out.max() == 1.0 and out.min() >= -1.0
    flat = normalise(np.full(4, 7.0, np.float32), Normalisation(channel="t2w"))
    assert np.all(flat == 0.0)
