"""`radtriage evaluate` end to end with the bundled models (skips until they are bundled)."""

from __future__ import annotations

import json
import re

import pytest

from serving.cli import main


@pytest.fixture(scope="module")
def bundled() -> None:
    repo = pytest.importorskip("models.repository").ModelRepository()
    if "cspca_detector" not in repo.names() or "prostate_gland" not in repo.names():
        pytest.skip("bundled models not in models/repository yet")
    try:
        repo.resolve("cspca_detector")
    except Exception as exc:
        pytest.skip(f"no promoted bundled detector: {exc}")


def test_evaluate_json_and_report(bundled, tmp_path, capsys) -> None:
    report = tmp_path / "r.html"
    rc = main(
        [
            "evaluate",
            "--data",
            "phantoms:4:100000",
            "--json",
            "--bootstrap",
            "50",
            "--report",
            str(report),
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    for key in (
        "auroc",
        "ap",
        "picai_score",
        "froc",
        "thresholds",
        "calibration",
        "dice",
        "n_cases",
        "operating_points",
    ):
        assert key in doc
    assert doc["n_cases"] == 4
    assert set(doc["thresholds"]) == {"urgent", "soon"}
    assert "sensitivity_ci" in doc["thresholds"]["soon"]
    page = report.read_text()
    assert "data:image/png;base64," in page
    assert not re.search(r"(src|href)=[\"'](?!data:)", page)


def test_write_thresholds_refused_without_enough_cspca(bundled, capsys) -> None:
    rc = main(
        [
            "evaluate",
            "--data",
            "phantoms:3:100000",
            "--json",
            "--bootstrap",
            "10",
            "--write-thresholds",
        ]
    )
    assert rc == 2
    assert "csPCa" in json.loads(capsys.readouterr().out)["error"]["message"]
