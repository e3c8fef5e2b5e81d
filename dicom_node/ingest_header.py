"""The values ingest reads from a data set's header, read from their bytes where that is exact.

`Header` answers the few questions ingest asks of every instance: an element's text, the Pixel
Data size the image attributes call for, the request priority. On the hot path (a little endian
data set that `dicom_node.encoding_check` has walked) each identifying element's value is
sliced out of the received bytes and a plain value (ASCII text, a 2-byte US) is read directly;
pydicom parses the identifying elements only when a value is anything else (non-ASCII text,
multiple values, a sequence, an odd VR or length), and then answers exactly as before. A header
pydicom parsed whole (deflated, big endian, a broken encoding) is read through pydicom only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import cached_property

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from dicom_node.encoding_check import (
    LONG_VRS,
    UNDEFINED_LENGTH,
    Walked,
    native_pixel_bytes,
    pixel_bytes_for,
)
from imaging.request_attributes import requested_procedure_priority


def _tag(keyword: str) -> int:
    return int(tag_for_keyword(keyword) or 0)


#: The elements ingest reads from a header: `dicom_node.ingest.record_from_header`, the
#: request priority (`imaging.request_attributes`), the Pixel Data size check and the
#: character set.
IDENTIFYING_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "AccessionNumber",
    "Modality",
    "StudyDescription",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "BodyPartExamined",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "RequestAttributesSequence",
    "RequestedProcedurePriority",
)
TAGS = {keyword: _tag(keyword) for keyword in IDENTIFYING_KEYWORDS}
IDENTIFYING_TAGS = frozenset(TAGS.values())
#: the last group holding an identifying element (Requested Procedure Priority)
LAST_GROUP = 0x0040

_US_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel")


def _plain_text(raw: bytes | None) -> bool:
    """One value of ASCII from space to tilde: read the same by every character set and by
    pydicom."""
    return raw is not None and raw.isascii() and b"\\" not in raw and raw.decode().isprintable()


def _ascii_text(raw: object) -> str | None:
    """A raw ASCII value without its padding; None for anything else (pydicom reads it)."""
    if isinstance(raw, bytes) and raw.isascii():
        return raw.decode("ascii").strip("\x00 ")
    return None


def text_of(ds: Dataset, keyword: str) -> str:
    """An element's value as text, from a pydicom data set. Raw ASCII values are decoded
    directly; anything else goes through pydicom's conversion (character sets, sequences)."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    text = _ascii_text(ds.get_item(tag).value)
    if text is not None:
        return text
    value = ds[tag].value
    return "" if value is None else str(value).strip("\x00 ")


class Header:
    """A received data set's identifying values. Build with `from_dataset` or `from_walk`."""

    def __init__(
        self,
        parse: Callable[[], Dataset],
        values: dict[int, tuple[bytes, bytes | None]] | None = None,
    ) -> None:
        self._parse = parse
        #: tag -> (VR, value bytes; None for an undefined length); None: read via pydicom only
        self._values = values

    @classmethod
    def from_dataset(cls, ds: Dataset) -> Header:
        """A header pydicom has parsed: every answer comes from pydicom."""
        return cls(lambda: ds)

    @classmethod
    def from_walk(
        cls, payload: memoryview, walked: Walked, parse: Callable[[bytes], Dataset]
    ) -> Header:
        """The identifying elements of a walked little endian data set, read from `payload`;
        `parse` turns their encoded bytes into a pydicom data set when an answer needs it."""
        values: dict[int, tuple[bytes, bytes | None]] = {}
        wanted: list[memoryview] = []
        starts = walked.top_level
        for i, (tag, start) in enumerate(starts):
            if tag >> 16 > LAST_GROUP:
                break
            if tag not in IDENTIFYING_TAGS:
                continue
            end = starts[i + 1][1] if i + 1 < len(starts) else len(payload)
            element = payload[start:end]
            wanted.append(element)
            values[tag] = _value(element, walked.implicit_vr)
        return cls(lambda: parse(b"".join(wanted)), values)

    @cached_property
    def dataset(self) -> Dataset:
        """The identifying elements as pydicom parses them (raises what the parse raises)."""
        return self._parse()

    def text(self, keyword: str) -> str:
        """An element's text without its padding; "" when absent (as `text_of`)."""
        values = self._values
        if values is not None:
            entry = values.get(TAGS[keyword])
            if entry is None:
                return ""
            text = _ascii_text(entry[1])
            if text is not None:
                return text
        return text_of(self.dataset, keyword)

    def native_pixel_bytes(self) -> int | None:
        """Bytes of native Pixel Data the image attributes call for (None: not checked)."""
        numbers = self._image_numbers()
        if numbers is None:  # parsed by pydicom, or an unusual value: read as pydicom does
            return native_pixel_bytes(self.dataset)
        rows, columns, bits, samples, frames = numbers
        if rows is None or columns is None or bits is None:
            return None
        photometric = self.text("PhotometricInterpretation").strip()
        return pixel_bytes_for(rows, columns, bits, samples or 1, frames, photometric)

    def _image_numbers(self) -> tuple[int | None, int | None, int | None, int | None, int] | None:
        """Rows, Columns, Bits Allocated, Samples per Pixel (each None when absent) and Number
        of Frames, when every one present is a plain value: one little endian US, digits; the
        Photometric Interpretation plain text. Else None."""
        values = self._values
        if values is None:
            return None
        numbers: list[int | None] = []
        for keyword in _US_KEYWORDS:
            entry = values.get(TAGS[keyword])
            if entry is None:
                numbers.append(None)
                continue
            vr, raw = entry
            if vr not in (b"US", b"") or raw is None or len(raw) != 2:
                return None
            numbers.append(int(struct.unpack("<H", raw)[0]))
        frames = self._frames()
        photometric = values.get(TAGS["PhotometricInterpretation"])
        if frames is None or (photometric is not None and not _plain_text(photometric[1])):
            return None
        rows, columns, bits, samples = numbers
        return rows, columns, bits, samples, frames

    def _frames(self) -> int | None:
        """Number of Frames when absent, empty or plain digits (absent or 0: 1); else None."""
        assert self._values is not None
        entry = self._values.get(TAGS["NumberOfFrames"])
        if entry is None:
            return 1
        if not _plain_text(entry[1]):
            return None
        text = (entry[1] or b"").decode("ascii").strip(" ")
        if not text:
            return 1
        return (int(text) or 1) if text.isdigit() else None

    def requested_procedure_priority(self) -> str:
        """The most urgent Requested Procedure Priority, as written ("" if none)."""
        values = self._values
        if values is None or TAGS["RequestAttributesSequence"] in values:
            return requested_procedure_priority(self.dataset)
        if TAGS["RequestedProcedurePriority"] not in values:
            return ""
        raw = values[TAGS["RequestedProcedurePriority"]][1]
        if raw is None or not _plain_text(raw):
            return requested_procedure_priority(self.dataset)
        return raw.decode("ascii").strip()


def _value(element: memoryview, implicit: bool) -> tuple[bytes, bytes | None]:
    """(VR, value) of one encoded little endian element the walk found whole; VR b"" when
    implicit, value None for an undefined length."""
    if implicit:
        (length,) = struct.unpack_from("<I", element, 4)
        vr, start = b"", 8
    else:
        vr = bytes(element[4:6])
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", element, 8)
            start = 12
        else:
            (length,) = struct.unpack_from("<H", element, 6)
            start = 8
    if length == UNDEFINED_LENGTH:
        return vr, None
    return vr, bytes(element[start : start + length])
