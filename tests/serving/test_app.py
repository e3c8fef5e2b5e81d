"""Composition root without Ray (backend="local"): analysis, metrics, models, promotions, HTTP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
from fastapi.testclient import TestClient

from cli.composition import RadtriageApp
from core.settings import Settings
from models.repository import GateDecision, ModelRepository
from store.index import Index
from workspace.accounts import Accounts


def test_local_app_analyses_reports_metrics_and_rolls_out_promotions(
    model_repository: Path, phantoms: dict[str, Path], tmp_path: Path
) -> None:
    repo = shutil.copytree(model_repository, tmp_path / "models")
    var = tmp_path / "var"
    var.mkdir()
    settings = Settings.model_validate(
        {
            "storage": {"root": str(var), "database_url": f"sqlite:///{var}/radtriage.db"},
            "models": {"repository": str(repo)},
            "serving": {"device": "cpu"},
        }
    )
    app = RadtriageApp(settings, backend="local")
    client = TestClient(app.http_app())
    accounts = Accounts(Index(settings.storage.database_url).engine)
    # granted the app's site (the node id): a user without one signs in nowhere
    accounts.add_user("mel", "ml_engineer", "correct horse battery", sites=[settings.site_id])
    auth = {"Authorization": f"Bearer {accounts.new_token('mel')}"}
    assert client.get("/readyz").status_code == 503
    app.start_models()
    assert client.get("/readyz").status_code == 200

    files = sorted(p for p in phantoms["positive"].rglob("*") if p.is_file())
    uid = str(pydicom.dcmread(next(p for p in files if p.suffix == ".dcm")).StudyInstanceUID)
    output = app.analyse(uid, files, None)  # instance paths, as the DicomNode passes them
    assert output.result.priority == "urgent"
    assert output.documents and all(d.path.is_file() for d in output.documents)
    written = json.loads((var / "results" / uid / "result.json").read_text())
    assert written["priority"] == "urgent" and written["analysed_at"]
    assert client.get("/api/models").status_code == 401  # no credentials, no data

    metrics = client.get("/metrics").text
    assert 'radtriage_studies_total{priority="urgent",status="reported"} 1.0' in metrics
    assert 'radtriage_model_info{name="cspca_detector",role="detector"' in metrics
    assert "radtriage_queue_depth 0.0" in metrics

    assert app.check_promotions() == {}
    forced = GateDecision("forced", "cspca_detector", "2", "1", "test", force_reason="test")
    ModelRepository(repo).promote("cspca_detector:2", forced, user="test")
    assert app.check_promotions() == {"detector": "cspca_detector:2"}
    models = client.get("/api/models", headers=auth).json()
    assert models["loaded"]["detector"]["version"] == "2"
    assert {(m["name"], m["version"]) for m in models["available"]} >= {("cspca_detector", "2")}
    assert 'version="2"' in client.get("/metrics").text
