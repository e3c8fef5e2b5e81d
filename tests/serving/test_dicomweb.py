"""DICOMweb: STOW-RS feeds the C-STORE store path (`dicom_node.ingest.Ingest`: spool, index,
completeness wake-up) with a per-instance answer; QIDO-RS lists our results. The client is
`dicomweb-client` (an implementation we did not write) against a real HTTP server."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import uvicorn
from fastapi.testclient import TestClient

from cli.composition import build_http_app
from core.settings import HttpSettings
from dicom_node.ingest import Ingest
from store.index import Index
from store.spool import Spool
from tests.conftest import free_port, require_tool
from tests.serving.workspace_helpers import add_study, add_users
from workspace.app import ApiContext
from workspace.metrics import Metrics

dicomweb_client = pytest.importorskip("dicomweb_client", reason="pip: dicomweb-client ([dev])")


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from cli.main import main as radtriage

    root = tmp_path_factory.mktemp("stow")
    with contextlib.redirect_stdout(io.StringIO()):
        assert radtriage(["phantom", "--out", str(root), "--seed", "3"]) == 0
    return sorted(p for p in root.rglob("*.dcm") if "_t2w" in p.parent.name)[:12]


class Node:
    def __init__(self, tmp_path: Path) -> None:
        self.index = Index(f"sqlite:///{tmp_path}/index.db")
        self.spool = Spool(tmp_path / "var")
        self.woken: list[str] = []
        self.ingest = Ingest(self.spool, self.index, on_stored=self.woken.append)
        # the node's C-STORE store path, as the composition root wires it
        http = HttpSettings(stow=True)  # STOW-RS is off unless configured
        ctx = ApiContext(index=self.index, metrics=Metrics(), ingest=self.ingest, http=http)
        self.app = build_http_app(ctx)
        self.tokens = add_users(self.index)


@contextlib.contextmanager
def _serve(app: object) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/dicomweb"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _client(url: str, token: str) -> dicomweb_client.DICOMwebClient:
    return dicomweb_client.DICOMwebClient(url, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.integration
def test_stow_rs_from_dicomweb_client_lands_in_spool_and_index(
    tmp_path: Path, study_files: list[Path]
) -> None:
    node = Node(tmp_path)
    datasets = [pydicom.dcmread(p) for p in study_files]
    with _serve(node.app) as url:
        response = _client(url, node.tokens["integrator"]).store_instances(datasets)
    stored = response.ReferencedSOPSequence
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in stored) == sorted(
        str(d.SOPInstanceUID) for d in datasets
    )
    assert "FailedSOPSequence" not in response
    uid = str(datasets[0].StudyInstanceUID)
    study = node.index.get_study(uid)
    assert study is not None and study["instances"] == len(datasets)
    assert len(node.index.instance_paths(uid)) == len(datasets)
    assert set(node.woken) == {uid}  # the assembler is woken as after C-STORE


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: " + t.encode() + b"\r\n\r\n" + p + b"\r\n"
        for t, p in parts
    )
    return body + b"--" + boundary.encode() + b"--\r\n", (
        f'multipart/related; type="application/dicom"; boundary={boundary}'
    )


def test_stow_rs_answers_each_instance(tmp_path: Path, study_files: list[Path]) -> None:
    node = Node(tmp_path)
    c = TestClient(node.app)
    good = study_files[0].read_bytes()
    truncated = good[: len(good) // 2]
    body, ctype = _multipart(
        [("application/dicom", good), ("application/dicom", truncated), ("text/plain", b"hi")]
    )
    auth = {"Authorization": f"Bearer {node.tokens['integrator']}", "Content-Type": ctype}
    r = c.post("/dicomweb/studies", content=body, headers=auth)
    assert r.status_code == 202, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    answer = r.json()
    assert len(answer["00081199"]["Value"]) == 1
    failed = answer["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC210, 0xC210]
    assert all(f["00000902"]["Value"][0] for f in failed)  # a reason in words
    # nothing stored: 409; wrong media type: 415; no credentials: 401
    body, ctype = _multipart([("application/dicom", b"not dicom")])
    r = c.post("/dicomweb/studies", content=body, headers={**auth, "Content-Type": ctype})
    assert r.status_code == 409
    r = c.post("/dicomweb/studies", content=b"{}", headers={**auth, "Content-Type": "text/json"})
    assert r.status_code == 415
    assert (
        c.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code
        == 401
    )


@pytest.mark.integration
def test_qido_rs_lists_our_results(tmp_path: Path, samples_sr_seg: tuple[Path, Path]) -> None:
    node = Node(tmp_path)
    sr_path, seg_path = samples_sr_seg
    sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    uid = str(sr.StudyInstanceUID)
    add_study(node.index, uid, patient_id="P-7", documents=[sr_path, seg_path])
    add_study(node.index, "1.2.3.4", patient_id="P-8", documents=[])  # no results yet
    with _serve(node.app) as url:
        client = _client(url, node.tokens["radiologist"])
        studies = client.search_for_studies()
        assert [s["0020000D"]["Value"][0] for s in studies] == [uid]
        assert sorted(studies[0]["00080061"]["Value"]) == ["SEG", "SR"]
        assert client.search_for_studies(search_filters={"PatientID": "P-8"}) == []
        series = client.search_for_series(study_instance_uid=uid)
        assert sorted(s["00080060"]["Value"][0] for s in series) == ["SEG", "SR"]
        assert {s["0020000E"]["Value"][0] for s in series} >= {str(sr.SeriesInstanceUID)}
        page = client.search_for_series(study_instance_uid=uid, limit=1)
        assert len(page) == 1
    c = TestClient(node.app)
    assert c.get("/dicomweb/studies").status_code == 401
    auth = {"Authorization": f"Bearer {node.tokens['radiologist']}"}
    assert c.get("/dicomweb/studies?PatientName=x", headers=auth).status_code == 400
    r = c.get(f"/dicomweb/studies/{uid}/series?limit=1", headers=auth)
    assert "additional results" in r.headers.get("warning", "")
    # the filter applies before the page limit (issue 23): newer studies without results, and
    # newer ones of other patients, never hide the match
    for n in range(5):
        add_study(node.index, f"1.2.3.5.{n}", patient_id=f"P-9{n}", documents=[sr_path])
    found = c.get("/dicomweb/studies?PatientID=P-7&limit=1", headers=auth).json()
    assert [s["0020000D"]["Value"][0] for s in found] == [uid]


@pytest.fixture(scope="module")
def samples_sr_seg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An SR and SEG as `radtriage infer` writes them."""
    from cli.main import main as radtriage

    root = tmp_path_factory.mktemp("qido")
    with contextlib.redirect_stdout(io.StringIO()):
        assert radtriage(["phantom", "--out", str(root / "s"), "--seed", "3", "--positive"]) == 0
        (study,) = [p for p in (root / "s").iterdir() if p.is_dir()]
        assert radtriage(["infer", str(study), "--out", str(root / "out"), "--device", "cpu"]) == 0
    return root / "out" / "sr.dcm", root / "out" / "seg.dcm"


ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.mark.integration
def test_orthanc_dicomweb_plugin_pushes_a_study_to_us(
    tmp_path: Path, study_files: list[Path]
) -> None:
    """Orthanc's DICOMweb plugin (Debian `orthanc-dicomweb`) as a cloud platform would: STOW-RS
    of a whole study to our endpoint, with a bearer token."""
    from cli.demo.pacs import OrthancPacs

    require_tool("Orthanc")
    if not ORTHANC_DICOMWEB_PLUGIN.is_file():
        pytest.skip(f"{ORTHANC_DICOMWEB_PLUGIN} missing (apt: orthanc-dicomweb, see .ci/run)")
    node = Node(tmp_path)
    with _serve(node.app) as url:

        class OrthancWithDicomWeb(OrthancPacs):
            def config(self) -> dict[str, Any]:
                return {
                    **super().config(),
                    "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)],
                    "DicomWeb": {
                        "Enable": True,
                        "Servers": {
                            "radtriage": {
                                "Url": url + "/",
                                "HttpHeaders": {
                                    "Authorization": f"Bearer {node.tokens['integrator']}"
                                },
                            }
                        },
                    },
                }

        with OrthancWithDicomWeb(tmp_path / "orthanc") as pacs:
            for path in study_files:
                pacs.upload(path)
            uid = str(pydicom.dcmread(study_files[0], stop_before_pixels=True).StudyInstanceUID)
            orthanc_id = pacs.find_study(uid)
            pacs.request(
                "POST",
                "/dicom-web/servers/radtriage/stow",
                {"Resources": [orthanc_id], "Synchronous": True},
            )
    study = node.index.get_study(uid)
    assert study is not None and study["instances"] == len(study_files)
    assert node.woken and set(node.woken) == {uid}


def test_stow_rs_is_off_unless_configured_and_only_for_integrators(
    tmp_path: Path, study_files: list[Path]
) -> None:
    node = Node(tmp_path)
    body, ctype = _multipart([("application/dicom", study_files[0].read_bytes())])

    def post(app: object, role: str) -> int:
        headers = {"Authorization": f"Bearer {node.tokens[role]}", "Content-Type": ctype}
        return TestClient(app).post("/dicomweb/studies", content=body, headers=headers).status_code  # type: ignore[arg-type]

    off = build_http_app(ApiContext(index=node.index, metrics=Metrics(), ingest=node.ingest))
    assert post(off, "integrator") == 405  # no STOW route at all
    assert post(node.app, "radiologist") == 403  # a radiologist session cannot inject images
    assert post(node.app, "ml_engineer") == 403
    assert post(node.app, "integrator") == 200
    assert post(node.app, "admin") == 200
    admin = {"Authorization": f"Bearer {node.tokens['admin']}"}
    events = TestClient(node.app).get("/api/audit", headers=admin).json()["events"]
    stow = [e for e in events if e["action"] == "stow"]
    assert [e["user"] for e in stow] == ["adam", "ian"]  # newest first: the uploader recorded
    uid = str(pydicom.dcmread(study_files[0], stop_before_pixels=True).StudyInstanceUID)
    assert stow[1]["study_instance_uid"] == uid and stow[1]["detail"]["instances"] == 1
    # the integrator token has no radiologist rights
    integrator = {"Authorization": f"Bearer {node.tokens['integrator']}"}
    c = TestClient(node.app)
    assert c.get("/api/worklist", headers=integrator).status_code == 403
    assert c.post(f"/api/studies/{uid}/acknowledge", headers=integrator).status_code == 403


def test_streamed_multipart_parser_reads_part_by_part() -> None:
    from dicom_node.dicomweb import iter_multipart

    parts = [("application/dicom", bytes([i]) * (300_000 + i)) for i in range(5)]
    body, _ = _multipart(parts, boundary="x" * 70)
    got = list(iter_multipart(io.BytesIO(b"preamble\r\n" + body), "x" * 70))
    assert got == parts
    with pytest.raises(ValueError, match="too large"):
        list(iter_multipart(io.BytesIO(body), "x" * 70, max_part_bytes=100_000))
    with pytest.raises(ValueError, match="ends inside a part"):
        list(iter_multipart(io.BytesIO(body[: len(body) // 2]), "x" * 70))
    with pytest.raises(ValueError, match="no multipart parts"):
        list(iter_multipart(io.BytesIO(b"no delimiter here"), "b"))
