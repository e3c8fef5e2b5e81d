"""Real DICOM peers for tests and benchmarks: DCMTK tools on loopback (Orthanc comes from
`cli.demo.pacs`, shared with the demo), plus a generator of classic MR series (pydicom)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from cli.demo.pacs import OrthancPacs as Orthanc  # noqa: F401 - re-exported for the tests
from cli.demo.pacs import stop_process as _stop
from cli.demo.pacs import wait_port
from store.index import Index, InstanceRecord


def make_mr_series(
    out_dir: Path,
    n_slices: int,
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    rows: int = 64,
    columns: int = 64,
    patient_id: str = "RT-TEST-0001",
    series_number: int = 1,
    series_description: str = "t2_tse_tra",
    requested_procedure_priority: str | None = None,
    body_part_examined: str = "PROSTATE",
    seed: int = 0,
) -> list[Path]:
    """Write an axial classic MR series (one file per slice, Explicit VR Little Endian)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid(entropy_srcs=[study_uid, "frame"])
    paths = []
    for i in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.PatientName = "Test^Radtriage"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19580101"
        ds.PatientSex = "M"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "ACC" + patient_id[-4:]
        ds.StudyID = "1"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MRI prostate"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.Modality = "MR"
        ds.BodyPartExamined = body_part_examined
        ds.FrameOfReferenceUID = frame_uid
        ds.Manufacturer = "radtriage-tests"
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = 100.0
        ds.RepetitionTime = 4000.0
        ds.EchoTrainLength = 16
        ds.MagneticFieldStrength = 3.0
        ds.ImagesInAcquisition = n_slices
        ds.SliceThickness = 3.0
        ds.SpacingBetweenSlices = 3.0
        ds.PixelSpacing = [0.5, 0.5]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [-16.0, -16.0, -30.0 + 3.0 * i]
        ds.SliceLocation = -30.0 + 3.0 * i
        if requested_procedure_priority:
            ds.RequestedProcedurePriority = requested_procedure_priority
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
        path = out_dir / f"MR{series_number:03d}_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(
    files: Sequence[Path],
    port: int,
    *,
    called: str = "RADTRIAGE",
    calling: str = "STORESCU",
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Send `files` with DCMTK storescu in one association."""
    exe = shutil.which("storescu") or "storescu"
    cmd = [exe, "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port)]
    cmd += [str(f) for f in files]
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@contextmanager
def storescp(out_dir: Path, port: int, aet: str = "STORESCP") -> Iterator[subprocess.Popen[bytes]]:
    """DCMTK storescp accepting everything into `out_dir` (flat, one file per instance)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("storescp") or "storescp"
    proc = subprocess.Popen(
        [exe, "-aet", aet, "-od", str(out_dir), "--fork", "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
        start_new_session=True,
    )
    try:
        wait_port(port)
        yield proc
    finally:
        _stop(proc)


# --- a small analyser at the node's seam (the real one is wired in serving) --------------------


class RecordingAnalyser:
    """Writes a minimal Comprehensive SR (highdicom) per call and records every call.

    UIDs are stable per (study, number of instances) so a resend carries the same SOP Instance
    UID. `fail` makes it raise (to test the ``failed`` state)."""

    def __init__(self, out_dir: Path, fail: bool = False) -> None:
        self.out_dir = out_dir
        self.fail = fail
        self.calls: list[tuple[str, int, Path | None]] = []

    def __call__(
        self, study_instance_uid: str, instance_paths: list[Path], previous_sr: Path | None
    ) -> Any:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes

        from core.domain import Priority, StudyStatus, TriageResult
        from dicom_node.jobs import AnalysisOutput, Document

        self.calls.append((study_instance_uid, len(instance_paths), previous_sr))
        if self.fail:
            raise RuntimeError("test analyser told to fail")
        evidence = pydicom.dcmread(instance_paths[0], stop_before_pixels=True)
        root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport)
        root.ContentSequence = [
            hd.sr.TextContentItem(
                name=codes.DCM.Finding,
                value=f"test analysis of {len(instance_paths)} instances",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
        key = [study_instance_uid, str(len(instance_paths))]
        sr = hd.sr.ComprehensiveSR(
            evidence=[evidence],
            content=root,
            series_instance_uid=pydicom.uid.generate_uid(entropy_srcs=[*key, "series"]),
            series_number=901,
            sop_instance_uid=pydicom.uid.generate_uid(entropy_srcs=[*key, "sr"]),
            instance_number=1,
            manufacturer="radtriage-tests",
            previous_versions=([pydicom.dcmread(previous_sr)] if previous_sr is not None else None),
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{sr.SOPInstanceUID}.dcm"
        sr.save_as(path)
        result = TriageResult(
            study_instance_uid=study_instance_uid,
            status=StudyStatus.REPORTED,
            priority=Priority.ROUTINE,
            case_likelihood=0.1,
        )
        document = Document(path, str(sr.SOPInstanceUID), str(sr.SOPClassUID), "SR")
        return AnalysisOutput(result=result, documents=[document])


def make_recording_analyser(settings: Any) -> RecordingAnalyser:
    """Factory for ``python -m dicom_node.node --analyser``."""
    return RecordingAnalyser(Path(settings.storage.root) / "test-analyser")


def encoded_dataset(path: Path) -> bytes:
    """The data set of a DICOM file as it travels in a C-STORE (file meta stripped)."""
    raw = path.read_bytes()
    group_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value
    return raw[144 + group_length :]


def index_series(index: Index, files: list[Path], now: float, priority: str = "") -> str:
    """Index these MR files as if the SCP had received them; returns the StudyInstanceUID."""
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        index.add_instance(
            InstanceRecord(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_instance_uid=ds.SeriesInstanceUID,
                study_instance_uid=ds.StudyInstanceUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                path=f,
                size_bytes=f.stat().st_size,
                patient_id=ds.PatientID,
                modality="MR",
                requested_procedure_priority=priority,
            ),
            now,
        )
    return str(ds.StudyInstanceUID)
