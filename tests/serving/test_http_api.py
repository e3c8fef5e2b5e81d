"""The HTTP API over a real index holding a phantom the real pipeline analysed: the study
view, key images (PNG with the outlines from the SEG that went to PACS), the SR/SEG as sent,
the radiologist's read and its export as a marksheet `evaluation.outcomes` reads."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from cli.composition import build_http_app
from core.domain import Priority
from core.settings import Settings
from store.index import Index, Study
from store.results import update_result_columns
from tests.serving.workspace_helpers import add_study, add_users, client
from workspace.app import ApiContext
from workspace.key_images import GLAND_COLOUR, LESION_COLOUR, SELECTED_COLOUR


@pytest.fixture(scope="module")
def analysed(
    model_repository: Path, phantoms: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TestClient, Index, str, dict[str, str]]:
    """The csPCa phantom indexed as the SCP would, analysed by the real pipeline, recorded."""
    from cli.composition import build_analyser, build_engine
    from imaging.study_reader import scan_study
    from tests.dicom_node.peers import index_series

    work = tmp_path_factory.mktemp("api")
    index = Index(f"sqlite:///{work}/index.db")
    files = sorted(phantoms["positive"].rglob("*.dcm"))
    uid = index_series(index, files, time.time() - 30)
    settings = Settings.model_validate(
        {"storage": {"root": str(work)}, "models": {"repository": str(model_repository)}}
    )
    engine = build_engine(settings.models, "cpu")
    analysis = build_analyser(settings, engine).analyse(scan_study(files), work / "results" / uid)
    now = time.time()
    with index.write() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        study.status = "sent"
        study.reported_at = now
        study.result_json = json.dumps(analysis.result.to_json_dict())
        study.documents_json = json.dumps([str(d.path) for d in analysis.documents])
        update_result_columns(s, study.id, analysis.result, now)
    tokens = add_users(index)
    return client(index), index, uid, tokens


def _as(tokens: dict[str, str], role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[role]}"}


def _pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def _count(rgb: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(rgb == np.asarray(colour, dtype=np.uint8), axis=-1).sum())


def test_operations_endpoints_are_open(analysed: tuple) -> None:
    c, _, _, tokens = analysed
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").status_code == 200
    assert c.get("/metrics").status_code == 200
    assert c.get("/openapi.json").status_code == 401  # the schema is behind login
    schema = c.get("/openapi.json", headers=_as(tokens, "ml_engineer")).json()
    assert (
        "/api/worklist" in schema["paths"]
        and "/api/studies/{study_instance_uid}" in schema["paths"]
    )


def test_study_view_has_the_patient_the_result_and_no_file_paths(analysed: tuple) -> None:
    c, _, uid, tokens = analysed
    doc = c.get(f"/api/studies/{uid}", headers=_as(tokens, "radiologist")).json()
    assert doc["study_instance_uid"] == uid and doc["patient_id"]
    assert doc["result"]["priority"] == Priority.URGENT.value
    assert {d["kind"] for d in doc["documents"]} == {"sr", "seg"}
    assert "/results/" not in json.dumps(doc)  # document URLs, never paths on the server
    row = c.get("/api/worklist", headers=_as(tokens, "radiologist")).json()["rows"][0]
    assert row["priority"] == "urgent" and row["largest_lesion_ml"] > 0
    assert row["gland_volume_ml"] > 0 and row["patient_sex"] in ("M", None)
    assert c.get("/api/studies/9.9.9", headers=_as(tokens, "radiologist")).status_code == 404


def test_key_images_show_the_lesion_and_the_gland(analysed: tuple) -> None:
    c, _, uid, tokens = analysed
    h = _as(tokens, "radiologist")
    info = c.get(f"/api/studies/{uid}/images", headers=h).json()
    assert info["has_gland"] and len(info["key_slices"]) >= 1
    z = info["key_slices"][0]
    assert 0 <= z < info["slices"] and info["default_slice"] == z
    for role in ("t2w", "adc", "hbv"):
        r = c.get(f"/api/studies/{uid}/images/{role}/{z}.png", params={"lesion": 0}, headers=h)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        rgb = _pixels(r.content)
        assert _count(rgb, SELECTED_COLOUR) > 10, role  # the selected lesion's outline
        assert _count(rgb, GLAND_COLOUR) > 10, role
    plain = _pixels(c.get(f"/api/studies/{uid}/images/t2w/{z}.png", headers=h).content)
    assert _count(plain, LESION_COLOUR) > 10 and _count(plain, SELECTED_COLOUR) == 0
    empty = _pixels(c.get(f"/api/studies/{uid}/images/t2w/0.png", headers=h).content)
    assert _count(empty, LESION_COLOUR) == 0  # first slice: below the prostate
    out = c.get(f"/api/studies/{uid}/images/t2w/{info['slices']}.png", headers=h)
    assert out.status_code == 404
    assert c.get(f"/api/studies/{uid}/images/dwi/0.png", headers=h).status_code == 422


def test_sr_and_seg_as_sent_to_pacs(analysed: tuple) -> None:
    c, _, uid, tokens = analysed
    for kind, modality in (("sr", "SR"), ("seg", "SEG")):
        r = c.get(f"/api/studies/{uid}/{kind}", headers=_as(tokens, "admin"))
        assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
        ds = pydicom.dcmread(io.BytesIO(r.content))
        assert ds.Modality == modality and ds.StudyInstanceUID == uid


def test_the_radiologists_read_and_the_feedback_export(analysed: tuple, tmp_path: Path) -> None:
    from cli.main import main
    from evaluation.outcomes import read_outcomes

    c, index, uid, tokens = analysed
    h = _as(tokens, "radiologist")
    base = f"/api/studies/{uid}"
    assert c.post(f"{base}/findings/0", json={"decision": "reject"}, headers=h).status_code == 200
    edit = {"decision": "edit", "pirads": 4, "sector": "PZpl", "volume_ml": 0.4}
    assert c.post(f"{base}/findings/0", json=edit, headers=h).status_code == 200
    assert c.post(f"{base}/findings/7", json=edit, headers=h).status_code == 404
    assert c.post(f"{base}/pirads", json={"pirads": 6}, headers=h).status_code == 422
    assert c.post(f"{base}/pirads", json={"pirads": 4}, headers=h).status_code == 200
    biopsy = {"isup_grade_group": 3, "biopsy_date": "20261120"}
    assert c.post(f"{base}/biopsy", json=biopsy, headers=h).status_code == 200
    assert c.post(f"{base}/reported", headers=h).status_code == 200
    a = c.get(f"{base}/assessment", headers=_as(tokens, "ml_engineer")).json()
    assert a["pirads_overall"] == 4 and a["isup_grade_group"] == 3 and a["reported_by"] == "rita"
    assert a["findings"] == [
        {**edit, "finding_index": 0, "comment": None, "by": "rita", "at": a["findings"][0]["at"]}
    ]
    events = c.get("/api/audit", params={"study": uid}, headers=_as(tokens, "admin")).json()
    actions = [e["action"] for e in events["events"]]
    # the assessment read is audited too (as the ml_engineer's)
    assert actions[:6] == ["assessment", "reported", "biopsy", "pirads", "finding", "finding"]
    assert events["events"][0]["user"] == "mel"
    assert events["events"][4]["detail"]["decision"] == "edit"

    add_study(index, "1.2.3.77", priority=Priority.ROUTINE, likelihood=0.2, patient_id="P77")
    config = tmp_path / "radtriage.toml"
    config.write_text(f'[storage]\ndatabase_url = "sqlite:///{index.engine.url.database}"\n')
    assert main(["feedback", "export", "--out", str(tmp_path / "fb"), "--config", str(config)]) == 0
    text = (tmp_path / "fb" / "marksheet.csv").read_text()
    assert "P77" not in text  # pseudonymised
    outcomes = {o.study_instance_uid: o for o in read_outcomes(tmp_path / "fb")}
    assert outcomes[uid].is_cspca is True and outcomes[uid].pirads == 4
    assert outcomes[uid].model_version and 0 <= outcomes[uid].ai_score <= 1
    assert outcomes["1.2.3.77"].is_cspca is None  # no biopsy yet


def test_pending_studies_are_listed_by_referral_urgency_without_patient_data(
    pending_context: tuple[ApiContext, str, str], phantoms: dict[str, Path]
) -> None:
    ctx, routine, stat = pending_context
    tokens = add_users(ctx.index)
    c = TestClient(build_http_app(ctx), headers=_as(tokens, "radiologist"))
    rows = c.get("/api/worklist/pending").json()
    assert [r["study_instance_uid"] for r in rows] == [stat, routine]  # STAT first, though newer
    assert [r["referral_urgency"] for r in rows] == ["urgent", "routine"]
    assert [r["status"] for r in rows] == ["received", "received"]
    n_adc = len(list(phantoms["positive"].glob("*_adc/*.dcm")))
    assert [r["instances"] for r in rows] == [n_adc, 5]
    assert all(r["received_at"] and r["error"] is None for r in rows)
    assert not {"patient_id", "patient_name", "accession_number"} & set(rows[0])
    page = c.get("/api/worklist").json()  # received studies are on the worklist too, pending
    assert page["total"] == 2 and {r["priority"] for r in page["rows"]} == {"pending"}
