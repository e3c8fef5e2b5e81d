"""The demo's PACS peers: real Orthanc (Debian package) and the in-process receiver."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from cli.demo.pacs import LocalPacs, OrthancPacs
from tests.conftest import require_tool
from training.phantoms import synthesize_case, write_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    return write_study(synthesize_case(4242, cspca=True), out, distractors=False)


@pytest.mark.integration
def test_orthanc_stores_and_finds_a_study(tmp_path: Path, study: Path) -> None:
    require_tool("Orthanc")
    files = sorted(study.rglob("*.dcm"))
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with OrthancPacs(tmp_path / "orthanc") as pacs:
        assert pacs.find_study(uid) is None
        for f in files:
            pacs.upload(f)
        assert pacs.find_study(uid) is not None
        modalities = pacs.series_modalities(uid)
        assert modalities and set(modalities) == {"MR"}


def test_local_pacs_files_what_it_receives(tmp_path: Path, study: Path) -> None:
    first = sorted(study.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    with LocalPacs(tmp_path / "pacs") as pacs:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(MRImageStorage, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", pacs.port, ae_title=pacs.aet)
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0000
        assert pacs.series_modalities(str(ds.StudyInstanceUID)) == ["MR"]
        assert (tmp_path / "pacs" / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm").is_file()
