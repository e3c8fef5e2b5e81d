"""The bundled demo models through the serving pipeline on fresh phantoms (unseen seeds)."""

from __future__ import annotations

import numpy as np
import pytest

from core.domain import Prediction
from models.pipeline import TriagePipeline
from models.repository import ModelRepository
from training.train import dice

FRESH_SEEDS = (900_001, 900_002, 900_003, 900_004, 900_005, 900_006, 900_007, 900_008)
VENDORS = ("siemens", "ge", "philips")


@pytest.fixture(scope="module")
def pipeline() -> TriagePipeline:
    if not ModelRepository().names():
        pytest.fail("bundled models missing from models/repository (run radtriage train)")
    return TriagePipeline.from_repository(device="cpu", threads=1)


@pytest.fixture(scope="module")
def results(pipeline: TriagePipeline):  # type: ignore[no-untyped-def]
    from training.phantoms import synthesize_case

    out = []
    for i, seed in enumerate(FRESH_SEEDS):
        case = synthesize_case(seed, vendor=VENDORS[i % 3])
        out.append((case, pipeline.predict(case.t2w, case.adc, case.hbv)))
    return out


def test_bundled_models_are_demo_models(pipeline: TriagePipeline) -> None:
    for model in (pipeline.detector, pipeline.gland):
        assert not model.ref.clinical_use and model.ref.disclaimer
        assert model.metadata.training_data["synthetic"] is True


@pytest.mark.slow  # seconds of training/evaluation: `make test`, not test-fast
def test_gland_dice_on_fresh_phantoms(results) -> None:  # type: ignore[no-untyped-def]
    scores = []
    for case, prediction in results:
        assert prediction.gland_mask is not None
        assert prediction.gland_mask.array.shape == case.gland_mask.array.shape
        scores.append(dice(prediction.gland_mask.array, case.gland_mask.array))
        assert prediction.gland_volume_ml == pytest.approx(case.gland_volume_ml, rel=0.3)
    assert float(np.mean(scores)) >= 0.85, scores


@pytest.mark.slow  # the bundled models on fresh phantoms: `make test`
def test_positives_score_above_negatives(results) -> None:  # type: ignore[no-untyped-def]
    pos = [p.case_likelihood for c, p in results if c.is_cspca]
    neg = [p.case_likelihood for c, p in results if not c.is_cspca]
    assert pos and neg, "fresh seeds should include both classes"
    assert np.mean(pos) > np.mean(neg), (pos, neg)


@pytest.mark.slow  # the bundled models on fresh phantoms: `make test`
def test_prediction_contract(results) -> None:  # type: ignore[no-untyped-def]
    for case, p in results:
        assert isinstance(p, Prediction)
        assert p.likelihood_map is not None and p.lesion_labels is not None
        assert p.likelihood_map.array.dtype == np.float32
        assert p.likelihood_map.array.max() <= p.case_likelihood + 1e-6
        assert p.lesion_labels.array.max() == len(p.lesions)
        for lesion in p.lesions:
            assert lesion.category in {"ai_high", "ai_intermediate", "ai_low"}
            assert (p.lesion_labels.array == lesion.label).any()
            assert lesion.sector is None or "PI-RADS" not in lesion.sector
        assert p.likelihood_map.origin == case.t2w.origin


def test_batched_steps_match_predict(pipeline: TriagePipeline, results) -> None:  # type: ignore[no-untyped-def]
    cases = [c for c, _ in results[:2]]
    prepared = [pipeline.prepare(c.t2w, c.adc, c.hbv) for c in cases]
    gland = pipeline.gland.run(np.stack([pipeline.gland_input(p) for p in prepared]))
    detector = pipeline.detector.run(np.stack([pipeline.detector_input(p) for p in prepared]))
    for i, (_, expected) in enumerate(results[:2]):
        got = pipeline.finish(prepared[i], gland[i], detector[i])
        assert got.case_likelihood == pytest.approx(expected.case_likelihood, abs=1e-5)
        assert len(got.lesions) == len(expected.lesions)
