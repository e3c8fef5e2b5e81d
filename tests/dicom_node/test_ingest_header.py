"""`Header` read from the bytes answers exactly as pydicom's parse of the same header."""

from __future__ import annotations

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage

from dicom_node.encoding_check import walk_encoding
from dicom_node.ingest import read_header
from dicom_node.ingest_header import Header


def _base() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.PatientID = "RT-0001"
    ds.PatientName = "Test^Patient"
    ds.Modality = "MR"
    ds.SeriesNumber = "7"
    ds.InstanceNumber = "12"
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00" * 32
    return ds


def _encode(ds: Dataset, ts: str) -> memoryview:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, ts == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    return memoryview(buffer.getvalue())


def _variant(name: str) -> Dataset:
    ds = _base()
    if name == "latin1 name":
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"
    elif name == "multi-valued priority":
        ds.RequestedProcedurePriority = "STAT\\ROUTINE"
    elif name == "plain priority":
        ds.RequestedProcedurePriority = "HIGH "
    elif name == "priority in request attributes":
        item = Dataset()
        item.RequestedProcedurePriority = "STAT"
        ds.RequestAttributesSequence = [item]
        ds.RequestedProcedurePriority = "ROUTINE"
    elif name == "frames":
        ds.NumberOfFrames = "2"
        ds.PixelData = b"\x00" * 64
    elif name == "zero frames":
        ds.NumberOfFrames = "0"
    elif name == "odd frames":
        ds.NumberOfFrames = "+2"
    elif name == "rows as SS":
        del ds.Rows
        ds.add(DataElement(0x00280010, "SS", 4))
    elif name == "rows empty":
        del ds.Rows
        ds.add(DataElement(0x00280010, "US", None))
    elif name == "ybr 422":
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.SamplesPerPixel = 3
    elif name == "no samples":
        del ds.SamplesPerPixel
    elif name == "no image":
        del ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelData
    return ds


VARIANTS = [
    "plain",
    "latin1 name",
    "multi-valued priority",
    "plain priority",
    "priority in request attributes",
    "frames",
    "zero frames",
    "odd frames",
    "rows as SS",
    "rows empty",
    "ybr 422",
    "no samples",
    "no image",
]
KEYWORDS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
    "AccessionNumber",
    "PhotometricInterpretation",
]


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("variant", VARIANTS)
def test_header_from_bytes_answers_as_pydicom(variant: str, ts: str) -> None:
    payload = _encode(_variant(variant), ts)
    walked = walk_encoding(payload, ts)
    assert walked is not None
    fast = Header.from_walk(payload, walked, lambda raw: read_header(raw, ts))
    slow = Header.from_dataset(read_header(payload, ts))
    for keyword in KEYWORDS:
        assert fast.text(keyword) == slow.text(keyword), keyword
    assert fast.native_pixel_bytes() == slow.native_pixel_bytes()
    assert fast.requested_procedure_priority() == slow.requested_procedure_priority()


def test_plain_values_are_read_without_pydicom() -> None:
    payload = _encode(_variant("plain priority"), ExplicitVRLittleEndian)
    walked = walk_encoding(payload, ExplicitVRLittleEndian)
    assert walked is not None

    def refuse(_raw: bytes) -> Dataset:
        raise AssertionError("pydicom parse on the hot path")

    header = Header.from_walk(payload, walked, refuse)
    assert header.text("PatientName") == "Test^Patient"
    assert header.native_pixel_bytes() == 32
    assert header.requested_procedure_priority() == "HIGH"
