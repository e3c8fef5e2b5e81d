"""Serving fixtures: a hand-weighted model repository, phantom studies (session scoped) and an
index holding studies that still await the AI."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.serving.fixture_models import build_fixture_repository

if TYPE_CHECKING:
    from workspace.app import ApiContext


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


@pytest.fixture
def pending_context(tmp_path: Path, phantoms: dict[str, Path]) -> tuple[ApiContext, str, str]:
    """A real index holding two studies still arriving: a routine one first, then a STAT one."""
    from cli.composition import IndexStudies
    from store.index import Index
    from tests.dicom_node.peers import index_series
    from workspace.app import ApiContext
    from workspace.metrics import Metrics

    index = Index(f"sqlite:///{tmp_path}/index.db")
    now = time.time()
    routine = index_series(index, sorted(phantoms["negative"].glob("*_t2w/*.dcm"))[:5], now - 600)
    stat = index_series(index, sorted(phantoms["positive"].glob("*_adc/*.dcm")), now - 60, "STAT")
    ctx = ApiContext(index=index, metrics=Metrics(), pending=IndexStudies(index).list_pending)
    return ctx, routine, stat
