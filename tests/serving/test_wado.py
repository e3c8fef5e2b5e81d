"""WADO-RS: the study the node holds and the SR/SEG it produced, retrieved by DICOMweb clients
we did not write: `dicomweb-client`, and Orthanc's DICOMweb plugin configured with our server as
a peer (what a PACS or viewer back end does). Files come only from the index; UIDs in the path
are validated; every retrieval is an audit event of the caller."""

from __future__ import annotations

import contextlib
import io
import re
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cli.composition import build_http_app
from dicom_node.ingest import Ingest
from store.index import Index, Study
from store.spool import Spool
from tests.conftest import require_tool
from tests.serving.test_dicomweb import ORTHANC_DICOMWEB_PLUGIN, _client, _serve
from tests.serving.workspace_helpers import add_users
from workspace.app import ApiContext
from workspace.metrics import Metrics
from workspace.tables import User, UserSite

dicomweb_client = pytest.importorskip("dicomweb_client", reason="pip: dicomweb-client ([dev])")

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path, Path]:
    """A phantom study's T2w files and the SR and SEG `radtriage infer` wrote for it."""
    from cli.main import main as radtriage

    root = tmp_path_factory.mktemp("wado")
    with contextlib.redirect_stdout(io.StringIO()):
        assert radtriage(["phantom", "--out", str(root / "s"), "--seed", "5", "--positive"]) == 0
        (study,) = [p for p in (root / "s").iterdir() if p.is_dir()]
        assert radtriage(["infer", str(study), "--out", str(root / "out"), "--device", "cpu"]) == 0
    files = sorted(p for p in study.rglob("*.dcm") if "_t2w" in p.parent.name)[:6]
    return files, root / "out" / "sr.dcm", root / "out" / "seg.dcm"


class Node:
    """The node's index and spool with the study received (the C-STORE store path) and its
    documents recorded, behind the web app's sign-in."""

    def __init__(self, tmp_path: Path, analysed: tuple[list[Path], Path, Path]) -> None:
        files, sr, seg = analysed
        self.index = Index(f"sqlite:///{tmp_path}/index.db")
        ingest = Ingest(Spool(tmp_path / "var"), self.index, on_stored=lambda uid: None)
        for path in files:
            assert ingest.receive_part10(path.read_bytes(), "test").ok
        self.files, self.sr, self.seg = files, sr, seg
        self.study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert str(pydicom.dcmread(sr, stop_before_pixels=True).StudyInstanceUID) == self.study
        with self.index.write() as s:
            s.execute(
                update(Study)
                .where(Study.study_instance_uid == self.study)
                .values(documents_json=f'["{sr}", "{seg}"]')
            )
        self.app = build_http_app(ApiContext(index=self.index, metrics=Metrics()))
        self.tokens = add_users(self.index)
        self.audit = self.app.state.audit


def _uids(datasets: list[Any]) -> set[str]:
    return {str(d.SOPInstanceUID) for d in datasets}


@pytest.mark.integration
def test_dicomweb_client_retrieves_study_series_instance_and_metadata(
    tmp_path: Path, analysed: tuple[list[Path], Path, Path]
) -> None:
    node = Node(tmp_path, analysed)
    sr = pydicom.dcmread(node.sr)
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in node.files}
    with _serve(node.app) as url:
        client = _client(url, node.tokens["radiologist"])
        study = client.retrieve_study(node.study)
        assert _uids(study) == set(originals) | {
            str(sr.SOPInstanceUID),
            str(pydicom.dcmread(node.seg, stop_before_pixels=True).SOPInstanceUID),
        }
        for ds in study:  # byte for byte what the node stored, pixels included
            if str(ds.SOPInstanceUID) in originals:
                original = pydicom.dcmread(originals[str(ds.SOPInstanceUID)])
                assert ds.PixelData == original.PixelData and ds.Modality == "MR"
        (got_sr,) = client.retrieve_series(node.study, str(sr.SeriesInstanceUID))
        assert got_sr.SOPClassUID == SR_STORAGE and got_sr == sr
        mr = pydicom.dcmread(node.files[0], stop_before_pixels=True)
        one = client.retrieve_instance(
            node.study, str(mr.SeriesInstanceUID), str(mr.SOPInstanceUID)
        )
        assert one.SOPInstanceUID == mr.SOPInstanceUID
        metadata = client.retrieve_study_metadata(node.study)
        assert len(metadata) == len(study)
        assert all("7FE00010" not in item for item in metadata)
        by_sop = {item["00080018"]["Value"][0]: item for item in metadata}
        assert by_sop[str(sr.SOPInstanceUID)]["00080060"]["Value"] == ["SR"]
        series_meta = client.retrieve_series_metadata(node.study, str(mr.SeriesInstanceUID))
        assert {m["00080018"]["Value"][0] for m in series_meta} == set(originals)
    _, events = node.audit.events(limit=20)
    wado = [e for e in events if e["action"] == "wado"]
    assert wado and all(e["user"] == "rita" and e["study_instance_uid"] == node.study for e in wado)
    full = [e for e in wado if e["detail"].get("sop_classes", {}).get(SR_STORAGE)]
    assert full and full[-1]["detail"]["sop_classes"][SEG_STORAGE] == 1


def test_wado_refusals(tmp_path: Path, analysed: tuple[list[Path], Path, Path]) -> None:
    node = Node(tmp_path, analysed)
    c = TestClient(node.app)
    auth = {"Authorization": f"Bearer {node.tokens['radiologist']}"}
    base = f"/dicomweb/studies/{node.study}"
    assert c.get(base).status_code == 401  # no credentials
    ml = {"Authorization": f"Bearer {node.tokens['ml_engineer']}"}
    assert c.get(base, headers=ml).status_code == 403  # not a clinical role
    for bad in ("..%2F..%2Fetc", "1.2.abc", "1." + "2" * 70, "1..2"):
        assert c.get(f"/dicomweb/studies/{bad}", headers=auth).status_code in (400, 404)
    assert c.get("/dicomweb/studies/1.2.3.4", headers=auth).status_code == 404
    assert c.get(f"{base}/series/1.2.3", headers=auth).status_code == 404
    r = c.get(base, headers={**auth, "Accept": "image/jpeg"})
    assert r.status_code == 406
    r = c.get(
        base,
        headers={
            **auth,
            "Accept": 'multipart/related; type="application/dicom"; '
            "transfer-syntax=1.2.840.10008.1.2.4.50",
        },
    )
    assert r.status_code == 406  # never transcoded: stored syntaxes only
    r = c.get(base, headers={**auth, "Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200  # no transfer syntax named: as stored
    syntaxes = set(re.findall(rb"transfer-syntax=([0-9.]+)", r.content))
    assert syntaxes == {b"1.2.840.10008.1.2.1"}  # phantoms, SR and SEG: Explicit VR LE
    explicit = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    assert c.get(base, headers={**auth, "Accept": explicit}).status_code == 200
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    # another site's study is not this node's to serve, even to a user granted both sites
    with Session(node.index.engine) as s, s.begin():
        rita = s.scalar(select(User.id).where(User.name == "rita"))
        s.add(UserSite(user_fk=rita, site_id="OTHER"))
    other = build_http_app(
        ApiContext(
            index=Index(f"sqlite:///{tmp_path}/index.db", node_id="OTHER"), metrics=Metrics()
        )
    )
    assert TestClient(other).get(base, headers=auth).status_code == 404


@pytest.mark.integration
def test_orthanc_retrieves_our_sr_through_wado_rs(
    tmp_path: Path, analysed: tuple[list[Path], Path, Path]
) -> None:
    """Orthanc's DICOMweb plugin with radtriage as a DICOMweb server: its retrieve (WADO-RS)
    of our SR series lands the SR in Orthanc under the same UIDs."""
    from cli.demo.pacs import OrthancPacs

    require_tool("Orthanc")
    if not ORTHANC_DICOMWEB_PLUGIN.is_file():
        pytest.skip(f"{ORTHANC_DICOMWEB_PLUGIN} missing (apt: orthanc-dicomweb, see .ci/run)")
    node = Node(tmp_path, analysed)
    sr = pydicom.dcmread(node.sr, stop_before_pixels=True)
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
                                    "Authorization": f"Bearer {node.tokens['radiologist']}"
                                },
                            }
                        },
                    },
                }

        with OrthancWithDicomWeb(tmp_path / "orthanc") as pacs:
            pacs.request(
                "POST",
                "/dicom-web/servers/radtriage/retrieve",
                {
                    "Resources": [{"Study": node.study, "Series": str(sr.SeriesInstanceUID)}],
                    "Synchronous": True,
                },
            )
            found = pacs.request(
                "POST",
                "/tools/find",
                {
                    "Level": "Instance",
                    "Query": {"StudyInstanceUID": node.study},
                    "Expand": True,
                },
            )
            sops = {i["MainDicomTags"]["SOPInstanceUID"] for i in found}
            assert sops == {str(sr.SOPInstanceUID)}
            (instance,) = found
            with urllib.request.urlopen(f"{pacs.url}/instances/{instance['ID']}/file") as r:
                stored = r.read()
    assert pydicom.dcmread(io.BytesIO(stored)) == pydicom.dcmread(node.sr)
