"""Ray Serve integration: real Ray (local, 2 CPUs), real ONNX Runtime, phantom DICOM studies.

Ray starts once for the module; every test talks to the same running application. Studies are
read and reported on this side (`triage.analysis.StudyAnalyser`); only volumes go to Ray.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from core.settings import Settings
from imaging.study_reader import scan_study
from models.repository import ModelRepository
from triage.analysis import StudyAnalyser

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("var")
    return Settings.model_validate(
        {
            "storage": {"root": str(root), "database_url": f"sqlite:///{root}/radtriage.db"},
            "models": {"repository": str(model_repository), "shadow": "cspca_detector:2"},
            "serving": {
                "max_batch_size": 4,
                "batch_wait_timeout_s": 1.0,
                "num_cpus_per_replica": 0.25,
                "device": "cpu",
            },
        }
    )


@pytest.fixture(scope="module")
def app(settings: Settings) -> Iterator[object]:
    from serving.deployments import APP_NAME, build_app
    from serving.ray_local import init_local_ray

    init_local_ray(num_cpus=2, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(build_app(settings), name=APP_NAME, route_prefix=None)
        yield handle
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def analyser(app, settings: Settings) -> StudyAnalyser:
    from serving.serve_engine import ServeEngine

    return StudyAnalyser(ServeEngine(app), Path(settings.storage.root) / "results", settings.triage)


def test_concurrent_studies_are_batched_and_answered(
    analyser: StudyAnalyser, phantoms: dict[str, Path], tmp_path: Path
) -> None:
    studies = {
        "pos": phantoms["positive"],
        "neg": phantoms["negative"],
        "no_t2w": phantoms["no_t2w"],
        "pos2": phantoms["positive"],
    }
    with ThreadPoolExecutor(len(studies)) as pool:
        futures = {
            key: pool.submit(analyser.analyse, scan_study(path), tmp_path / key)
            for key, path in studies.items()
        }
        out = {key: f.result(timeout=120) for key, f in futures.items()}
    assert out["pos"].result.priority == "urgent"
    assert out["pos2"].result.priority == "urgent"
    assert out["neg"].result.priority == "routine"
    assert out["no_t2w"].result.priority == "not_analysed"
    assert out["no_t2w"].result.reason["code"] == "missing_t2w"
    for key in studies:
        assert (tmp_path / key / "result.json").is_file()
        assert (tmp_path / key / "sr.dcm").is_file()
    sizes = [a.batch_sizes.get("detector", 0) for a in out.values()]
    assert max(sizes) > 1, f"no batching observed: {sizes}"


def test_bad_item_in_a_batch_fails_alone(app) -> None:
    detector = serve.get_deployment_handle("detector", app_name="radtriage")
    good = np.zeros((3, 16, 64, 64), np.float32)
    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    wrong_shape = np.zeros((3, 8, 64, 64), np.float32)
    items = [good, nan, good + 1, wrong_shape, good - 1]
    pinned = [("cspca_detector:1", x) for x in items] + [("cspca_detector:2", good)]
    answers = [r.result(timeout_s=60) for r in [detector.infer.remote(x) for x in pinned]]
    # each item answered by the version it was pinned to, even within one batch
    assert [a.model.ref.version for a in answers] == ["1"] * 5 + ["2"]
    results = [a.item for a in answers]
    assert [r.ok for r in results] == [True, False, True, False, True, True]
    assert "NaN" in results[1].error["message"]
    assert "expects batches of shape" in results[3].error["message"]
    assert results[0].raise_for_error()["output"].shape == (1, 16, 64, 64)
    assert max(r.batch_size for r in results) > 1
    unpinned = detector.infer.remote(good).result(timeout_s=60)
    assert unpinned.model is None and "NAME:VERSION" in unpinned.item.error["message"]


def test_models_and_shadow_comparisons(
    app, analyser: StudyAnalyser, phantoms: dict[str, Path], tmp_path: Path
) -> None:
    models = app.models.remote().result(timeout_s=30)
    assert models["detector"]["version"] == "1" and models["shadow"]["version"] == "2"
    assert models["detector"]["thresholds"]["urgent"] == 0.5
    analysis = analyser.analyse(scan_study(phantoms["positive"]), tmp_path)
    assert analysis.result.model.version == "1"  # shadow never reaches the result
    shadow = analysis.shadow
    assert shadow is not None and shadow.error is None
    assert (shadow.model.name, shadow.model.version) == ("cspca_detector", "2")
    assert 0.0 <= shadow.case_likelihood <= 1.0


def test_rolling_update_swaps_versions_and_refuses_a_corrupt_one(
    app,
    analyser: StudyAnalyser,
    settings: Settings,
    model_repository: Path,
    phantoms: dict[str, Path],
    tmp_path: Path,
) -> None:
    """New versions arrive through user_config; a tampered file never replaces a good model."""
    from serving.deployments import APP_NAME, build_app

    corrupt = model_repository / "cspca_detector" / "3"
    shutil.copytree(model_repository / "cspca_detector" / "1", corrupt)
    meta = (corrupt / "metadata.json").read_text().replace('"version": "1"', '"version": "3"')
    (corrupt / "metadata.json").write_text(meta)
    with (corrupt / "model.onnx").open("ab") as f:
        f.write(b"tampered")
    refs = {
        **settings.models.role_refs(),
        "detector": "cspca_detector:2",
        "shadow": "cspca_detector:3",
    }
    try:
        # a set with one tampered version is refused whole: the detector does not move either
        serve.run(build_app(settings, refs), name=APP_NAME, route_prefix=None)
        models = app.models.remote().result(timeout_s=30)
        assert models["detector"]["version"] == "1"
        assert models["shadow"]["version"] == "2"  # still the verified one it had
        assert models["detector"]["last_error"]["code"] == "model_integrity"
        # a good set swaps as one unit, and a study records exactly what scored it
        serve.run(
            build_app(settings, {**refs, "shadow": "cspca_detector:2"}),
            name=APP_NAME,
            route_prefix=None,
        )
        models = app.models.remote().result(timeout_s=30)
        assert models["detector"]["version"] == "2" and models["detector"]["last_error"] is None
        v2 = ModelRepository(model_repository).resolve("cspca_detector:2").metadata
        assert models["detector"]["digest"] == v2.digest
        analysis = analyser.analyse(scan_study(phantoms["negative"]), tmp_path)
        assert analysis.result.model.version == "2"
        assert analysis.result.model.digest == v2.digest
        assert v2.thresholds is not None
        assert analysis.result.thresholds == {
            "urgent": v2.thresholds.urgent,
            "soon": v2.thresholds.soon,
        }
    finally:
        shutil.rmtree(corrupt)
        serve.run(build_app(settings), name=APP_NAME, route_prefix=None)
