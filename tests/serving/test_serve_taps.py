"""Ray Serve end to end with an imported gland model: the bundled 0.2.0 detector and TAPS
(lavlab-taps, imported with its declared pipeline, configs/models/taps.toml) served by real Ray
(local, 2 CPUs) give the gland the in-process engine gives for the same study.

The TAPS model comes from the `lavlab-taps` wheel, never from this repository (see
tests/models/test_taps_gland.py); without it the test skips and says so. The study is
ProstateX-0001 when ../shared/data exists, else a phantom (where TAPS, trained on real MRI,
finds no gland: both engines must then agree that there is none).
"""

from __future__ import annotations

import shutil
import zipfile
from datetime import date
from pathlib import Path

import pytest

from core.priority import WaitingPolicy
from core.settings import Settings
from imaging.study_reader import scan_study
from tests.conftest import REPO, SHARED_DATA
from tests.models.test_taps_gland import taps_wheel

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

# Ray's driver state is process-wide (own_process); TAPS's sliding window takes minutes here
pytestmark = [pytest.mark.integration, pytest.mark.own_process, pytest.mark.timeout(1800)]

DETECTOR, GLAND = "cspca_detector:0.2.0", "taps_gland:1.1.2"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.onnx_pipeline_import import import_declared_onnx

    work = tmp_path_factory.mktemp("taps_serve")
    with zipfile.ZipFile(taps_wheel()) as wheel:
        onnx_file = Path(wheel.extract("taps/resources/model_v1.onnx", work / "wheel"))
    repo = work / "repo"
    bundled = REPO / "models" / "repository" / "cspca_detector" / "0.2.0"
    shutil.copytree(bundled, repo / "cspca_detector" / "0.2.0")
    import_declared_onnx(
        onnx_file,
        REPO / "configs" / "models" / "taps.toml",
        name="taps_gland",
        version="1.1.2",
        repository=repo,
    )
    return repo


def _study(tmp_path: Path) -> Path:
    if (SHARED_DATA / "prostatex" / "ProstateX-0001").is_dir():
        return SHARED_DATA / "prostatex" / "ProstateX-0001"
    from training.phantoms import synthesize_case, write_study

    return write_study(synthesize_case(7), tmp_path / "phantom", distractors=False)


def test_taps_gland_through_ray_serve_equals_in_process(repository: Path, tmp_path: Path) -> None:
    from models.engine import LocalEngine
    from serving.deployments import APP_NAME, build_app
    from serving.ray_local import init_local_ray
    from serving.serve_engine import ServeEngine
    from triage.analysis import analyse_study

    study = scan_study(_study(tmp_path))
    today = date(2026, 12, 1)
    local = LocalEngine.load(repository, DETECTOR, GLAND, device="cpu", threads=2)
    here = analyse_study(study, tmp_path / "local", local, WaitingPolicy(), today=today).result
    assert here.status == "reported", here.reason

    settings = Settings.model_validate(
        {
            "storage": {"root": str(tmp_path / "var")},
            "models": {"repository": str(repository), "detector": DETECTOR, "gland": GLAND},
            "serving": {"num_cpus_per_replica": 0.5, "device": "cpu", "max_batch_size": 2},
        }
    )
    init_local_ray(num_cpus=2, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(build_app(settings), name=APP_NAME, route_prefix=None)
        engine = ServeEngine(handle, timeout_s=1200.0)
        served = analyse_study(study, tmp_path / "ray", engine, WaitingPolicy(), today=today)
        loaded = engine.loaded()
    finally:
        serve.shutdown()
        ray.shutdown()
    result = served.result
    print(
        f"\nTAPS gland via Ray Serve {result.gland_volume_ml} ml, in process "
        f"{here.gland_volume_ml} ml; case likelihood {result.case_likelihood} vs "
        f"{here.case_likelihood}; domain gate {result.domain_gate}"
    )
    if here.gland_volume_ml is None:  # a phantom: TAPS finds no gland in either engine
        assert result.gland_volume_ml is None
    else:
        assert result.gland_volume_ml is not None
        assert abs(result.gland_volume_ml - here.gland_volume_ml) <= 0.01 * here.gland_volume_ml
    assert result.case_likelihood == pytest.approx(here.case_likelihood, abs=1e-4)
    assert result.model is not None
    assert (result.model.name, result.model.version) == ("cspca_detector", "0.2.0")
    assert result.gland_model is not None and here.gland_model is not None
    assert (result.gland_model.name, result.gland_model.version) == ("taps_gland", "1.1.2")
    assert result.gland_model == here.gland_model
    assert (loaded["detector"]["name"], loaded["detector"]["version"]) == (
        "cspca_detector",
        "0.2.0",
    )
    assert (loaded["gland"]["name"], loaded["gland"]["version"]) == ("taps_gland", "1.1.2")
    # the 0.2.0 gate was fitted with its own gland model: this pair says so
    assert result.domain_gate == here.domain_gate == "not_fitted"
