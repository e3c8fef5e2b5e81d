"""Pure post-processing: lesion candidates, sectors, categories, gland gating."""

from __future__ import annotations

import numpy as np
import pytest

from core.domain import Volume
from core.priority import Thresholds
from models.metadata import PostprocessingSpec
from models.postprocessing import (
    category,
    extract_lesions,
    gate_to_gland,
    zone_probabilities,
    zones_from_probabilities,
    zones_from_pz_tz,
)

THRESHOLDS = Thresholds(urgent=0.6, soon=0.3)


def grid(array: np.ndarray) -> Volume:
    return Volume(array, (1.0, 1.0, 2.0), (-20.0, -20.0, -10.0))


def zones() -> Volume:
    """A 20x20x5 mm box gland: PZ posterior (high y in LPS), TZ anterior."""
    z = np.zeros((10, 40, 40), np.uint8)
    z[2:8, 10:30, 10:30] = 2
    z[2:8, 22:30, 10:30] = 1
    return grid(z)


def test_lesions_from_components() -> None:
    lmap = np.zeros((10, 40, 40), np.float32)
    lmap[3:5, 24:28, 12:16] = 0.9  # patient right (low x), posterior -> PZ, lower half
    lmap[6, 12:16, 24:27] = 0.4  # patient left, anterior -> TZ
    lmap[0, 0, 0] = 0.95  # a single voxel: below min volume
    spec = PostprocessingSpec(detection_threshold=0.25, min_lesion_volume_ml=0.01)
    lesions, labels = extract_lesions(grid(lmap), zones(), spec, THRESHOLDS)
    assert [round(les.likelihood, 2) for les in lesions] == [0.9, 0.4]
    first, second = lesions
    assert first.volume_ml == pytest.approx(2 * 4 * 4 * 2.0 / 1000)
    assert first.category == "ai_high" and second.category == "ai_intermediate"
    assert first.sector is not None and first.sector.startswith("right") and "PZp" in first.sector
    assert second.sector is not None and second.sector.startswith("left base TZa")
    np.testing.assert_allclose(first.centroid_mm, (-20 + 13.5, -20 + 25.5, -10 + 2 * 3.5))
    assert labels.array.dtype == np.uint8 and set(np.unique(labels.array)) == {0, 1, 2}
    assert (labels.array == first.label).sum() == 32


def test_no_lesion_below_threshold_and_max_lesions() -> None:
    lmap = np.zeros((10, 40, 40), np.float32)
    lmap[1, 1:3, 1:3] = 0.2
    assert extract_lesions(grid(lmap), None, PostprocessingSpec(), THRESHOLDS)[0] == ()
    for i in range(4):
        lmap[5, 2 + 8 * i : 5 + 8 * i, 5:8] = 0.5 + 0.1 * i
    spec = PostprocessingSpec(max_lesions=2, min_lesion_volume_ml=0.0)
    lesions, labels = extract_lesions(grid(lmap), None, spec, THRESHOLDS)
    assert len(lesions) == 2 and lesions[0].likelihood > lesions[1].likelihood
    assert lesions[0].sector is None and labels.array.max() == 2


def test_category_is_never_pirads() -> None:
    assert {category(x, THRESHOLDS) for x in (0.1, 0.3, 0.59, 0.6, 1.0)} == {
        "ai_low",
        "ai_intermediate",
        "ai_high",
    }


def test_zones_keep_largest_component() -> None:
    probs = np.zeros((3, 6, 20, 20), np.float32)
    probs[0] = 1.0
    probs[:, 1:5, 5:15, 5:15] = [[[[0.1]]], [[[0.7]]], [[[0.2]]]]
    probs[:, 0, 0, 0] = [0.0, 0.0, 1.0]  # a stray voxel
    out = zones_from_probabilities(probs)
    assert out[0, 0, 0] == 0 and (out == 1).sum() == 4 * 10 * 10


def test_gate_to_gland_only_with_a_plausible_gland() -> None:
    lmap = np.ones((10, 40, 40), np.float32)
    gland = np.zeros_like(lmap, dtype=bool)
    gland[2:8, 5:35, 5:35] = True  # 30 x 30 x 12 mm = 10.8 ml
    gated = gate_to_gland(lmap, gland, (1.0, 1.0, 2.0), margin_mm=3.0)
    assert gated[5, 20, 20] == 1.0 and gated[5, 0, 0] == 0.0 and gated[5, 3, 20] == 1.0
    tiny = np.zeros_like(gland)
    tiny[5, 20, 20] = True  # implausible gland: the map is not silenced
    assert np.all(gate_to_gland(lmap, tiny, (1.0, 1.0, 2.0), margin_mm=3.0) == 1.0)
    assert np.all(gate_to_gland(lmap, gland, (1.0, 1.0, 2.0), margin_mm=None) == 1.0)


def test_zones_from_pz_tz() -> None:
    pz = np.array([0.6, 0.3, 0.1, 0.0], np.float32)
    tz = np.array([0.1, 0.3, 0.3, 0.0], np.float32)
    assert zones_from_pz_tz(pz, tz).tolist() == [1, 1, 0, 0]
    probs = np.zeros((3, 4, 8, 8), np.float32)
    probs[0] = 1.0
    zones = np.zeros((4, 8, 8), np.uint8)
    zones[1:3, 2:6, 2:6] = 1
    probs[:, 1:3, 2:6, 2:6] = [[[[0.1]]], [[[0.8]]], [[[0.1]]]]
    probs[:, 0, 7, 7] = [0.0, 1.0, 0.0]  # outside the kept component and its margin
    restricted = zone_probabilities(probs, zones)
    assert restricted.shape == (2, 4, 8, 8) and restricted[0, 0, 7, 7] == 0.0
    assert restricted[0, 1, 3, 3] == pytest.approx(0.8)
