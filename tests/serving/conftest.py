"""Serving fixtures: a hand-weighted model repository and phantom studies (session scoped)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.serving.fixture_models import build_fixture_repository


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture_repository(tmp_path_factory.mktemp("models"), detector_versions=("1", "2"))


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """positive (ISUP 5, 0.83 ml), negative (no lesion) and no_t2w (negative minus its T2W)."""
    from training.phantoms import synthesize_case, write_study

    root = tmp_path_factory.mktemp("phantoms")
    positive = write_study(synthesize_case(2, cspca=True), root, distractors=False)
    negative = write_study(synthesize_case(4, cspca=False), root, distractors=False)
    no_t2w = root / "no_t2w"
    shutil.copytree(negative, no_t2w)
    for folder in no_t2w.glob("*_t2w*"):
        shutil.rmtree(folder)
    return {"positive": positive, "negative": negative, "no_t2w": no_t2w}
