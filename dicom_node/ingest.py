"""Ingest: one received instance -> validate -> spool (fsync) -> index -> status.

The network-free store path shared by the C-STORE handler (`dicom_node.scp`) and any other
receiver (DICOMweb STOW-RS). How to call it::

    ingest = Ingest(spool, index, on_stored=wake_assembler)
    # C-STORE: the data set bytes as received, in the negotiated transfer syntax, plus the
    # Affected SOP Class/Instance UIDs of the request (checked against the data set)
    outcome = ingest.receive(data, "1.2.840.10008.1.2.1", sop_class_uid=cls,
                             sop_instance_uid=sop, calling_ae_title="PACS")
    # STOW-RS: one Part 10 file (preamble, DICM, File Meta Information, data set); the SOP
    # Class/Instance and the transfer syntax come from its File Meta Information
    outcome = ingest.receive_part10(file_bytes, source="stow:user")
    outcome.status   # DIMSE status (0x0000 success); HTTP via `IngestOutcome.http_status`
    outcome.reason   # why it was refused (None on success), safe to log and to return

Statuses (`IngestOutcome.status`):

- ``0x0000`` success: durably spooled (file and folder fsynced) and indexed; also for a
  duplicate SOP Instance UID (``duplicate=True``, the index is unchanged).
- ``0xA700`` out of resources: free disk below the low-water mark, the write failed, or the
  work queue is full (`admit` refused a new study: `dicom_node.node.WorkQueue`); nothing is
  kept, the sender must resend.
- ``0xA900`` data set does not match SOP Class: a UID breaks the DICOM UID syntax
  (`core.uids.InvalidUIDError`), or the data set's SOP Class/Instance UID differ from the
  request's. Quarantined with the reason.
- ``0xC210`` cannot understand: the data set cannot be parsed, its encoding is broken
  (truncated or overlong elements, unknown VRs, unclosed sequences, nesting deeper than 32,
  Pixel Data shorter than the image needs: `dicom_node.encoding_check`) or it lacks
  Study/Series Instance UID. Quarantined with the reason.
- ``0xC000`` cannot understand: an unexpected failure of ours (e.g. the index database); the
  file may be in the spool and `dicom_node.node.reconcile` indexes it at the next start.

Every value read from the header is hostile: no path is built from one except a UID that passed
`core.uids.require_uid`, and log lines carry UIDs escaped, never patient data.
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from core.errors import (
    DatasetMismatchError,
    MalformedDicomError,
    OutOfResourcesError,
    RadtriageError,
)
from core.uids import require_uid
from dicom_node.encoding_check import (
    Walked,
    check_encoding,
    check_pixel_data_length,
    walk_encoding,
    walked_encoding,
)
from dicom_node.ingest_header import LAST_GROUP, Header
from store.index import Index, InstanceRecord
from store.spool import Spool, encode_file_meta

log = logging.getLogger(__name__)

# Header parsing stops after group 0x0040 (`LAST_GROUP`: Requested Procedure Priority lives
# there); pixel data and everything after it are never parsed on ingest.
# A deflated header is inflated at most this far (a deflate bomb stays small).
_MAX_INFLATED_HEADER = 1 << 20

HTTP_FOR_STATUS = {0x0000: 200, 0xA700: 507, 0xA900: 409, 0xC210: 400, 0xC000: 500}


def _stop_after_header(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag.group > LAST_GROUP)


def read_header(data: io.BytesIO | bytes | memoryview, transfer_syntax_uid: str) -> Dataset:
    """The data set's elements up to group 0x0040 from its encoded bytes, or
    `MalformedDicomError`."""
    ts = UID(transfer_syntax_uid)
    raw = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
    try:
        if ts == DeflatedExplicitVRLittleEndian:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            stream = io.BytesIO(inflater.decompress(raw, _MAX_INFLATED_HEADER))
        elif isinstance(data, io.BytesIO):
            stream = data
            stream.seek(0)
        else:
            stream = io.BytesIO(raw)
        return read_dataset(
            stream, ts.is_implicit_VR, ts.is_little_endian, stop_when=_stop_after_header
        )
    except Exception as exc:  # pydicom raises many types for broken input
        raise MalformedDicomError(
            f"cannot parse the data set in transfer syntax {ts}: {ascii(str(exc))[:300]}; "
            "check the sender"
        ) from exc
    finally:
        del raw


def identify(
    data: io.BytesIO | bytes | memoryview, payload: memoryview, transfer_syntax_uid: str
) -> tuple[Header, Walked | None]:
    """The header ingest needs, and the encoding walk when it passed.

    Hot path: `walk_encoding` checks the whole encoding once and notes where every top-level
    element starts; the identifying elements' values are then read from their bytes
    (`dicom_node.ingest_header`), pydicom parsing them only for an unusual value. A deflated
    or big endian data set, a syntax that is not walked or a broken encoding take the full
    `read_header` instead (the walk's error is raised later by `check_encoding`, after the
    header and UID checks, so a sender learns the same status as before). An implicit VR data
    set sent as explicit is read whole by pydicom's tolerant reader, and its walk is kept for
    the pixel size check."""
    try:
        walked = walk_encoding(payload, transfer_syntax_uid)
    except MalformedDicomError:
        walked = None
    if walked is None:
        return Header.from_dataset(read_header(data, transfer_syntax_uid)), None
    encoding = walked_encoding(transfer_syntax_uid)  # (implicit VR, little endian)
    if encoding is None or walked.implicit_vr != encoding[0] or not encoding[1]:
        return Header.from_dataset(read_header(data, transfer_syntax_uid)), walked
    header = Header.from_walk(payload, walked, lambda raw: read_header(raw, transfer_syntax_uid))
    return header, walked


def _int(header: Header, keyword: str) -> int | None:
    try:
        value = int(float(header.text(keyword).split("\\")[0]))
    except (ValueError, OverflowError):
        return None
    return value if -(2**31) <= value < 2**31 else None  # IS is a 32-bit integer


def record_from_header(
    header: Header | Dataset,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    path: Path,
    size_bytes: int,
    calling_ae_title: str = "",
) -> InstanceRecord:
    """Check the header against the request and build the index record.

    Raises `InvalidUIDError` (a UID breaks the syntax), `MalformedDicomError` (UIDs missing or
    unreadable) or `DatasetMismatchError` (header and request disagree)."""
    if isinstance(header, Dataset):
        header = Header.from_dataset(header)
    sop_class_uid = require_uid(sop_class_uid, "AffectedSOPClassUID")
    sop_instance_uid = require_uid(sop_instance_uid, "AffectedSOPInstanceUID")
    transfer_syntax_uid = require_uid(transfer_syntax_uid, "TransferSyntaxUID")
    try:
        study = header.text("StudyInstanceUID")
        series = header.text("SeriesInstanceUID")
        ds_sop_instance = header.text("SOPInstanceUID")
        ds_sop_class = header.text("SOPClassUID")
    except Exception as exc:
        raise MalformedDicomError(f"unreadable UID elements: {ascii(str(exc))[:300]}") from exc
    if not study or not series:
        raise MalformedDicomError(
            "data set has no Study Instance UID or Series Instance UID; fix the sender"
        )
    study = require_uid(study, "StudyInstanceUID")
    series = require_uid(series, "SeriesInstanceUID")
    if ds_sop_instance and require_uid(ds_sop_instance, "SOPInstanceUID") != sop_instance_uid:
        raise DatasetMismatchError(
            f"SOP Instance UID {ds_sop_instance} in the data set differs from "
            f"Affected SOP Instance UID {sop_instance_uid} in the C-STORE request"
        )
    if ds_sop_class and require_uid(ds_sop_class, "SOPClassUID") != sop_class_uid:
        raise DatasetMismatchError(
            f"SOP Class UID {ds_sop_class} in the data set differs from "
            f"Affected SOP Class UID {sop_class_uid} in the C-STORE request"
        )
    try:
        return InstanceRecord(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            series_instance_uid=series,
            study_instance_uid=study,
            transfer_syntax_uid=transfer_syntax_uid,
            path=path,
            size_bytes=size_bytes,
            patient_id=header.text("PatientID")[:64],
            issuer_of_patient_id=header.text("IssuerOfPatientID")[:64],
            patient_name=header.text("PatientName")[:324],
            accession_number=header.text("AccessionNumber")[:64],
            study_date=header.text("StudyDate")[:8],
            study_description=header.text("StudyDescription")[:64],
            modality=header.text("Modality")[:16],
            series_number=_int(header, "SeriesNumber"),
            series_description=header.text("SeriesDescription")[:64],
            body_part_examined=header.text("BodyPartExamined")[:16],
            instance_number=_int(header, "InstanceNumber"),
            requested_procedure_priority=header.requested_procedure_priority()[:16],
            calling_ae_title=calling_ae_title[:16],
        )
    except Exception as exc:
        raise MalformedDicomError(f"unreadable header elements: {ascii(str(exc))[:300]}") from exc


@dataclass
class IngestStats:
    """Counters for metrics; updated under the ingest lock."""

    stored: int = 0
    duplicates: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    bytes: int = 0


@dataclass(frozen=True)
class IngestOutcome:
    """What became of one instance. `reason` is None on success and otherwise names the
    status, the error class and why (escaped: safe for logs and HTTP responses)."""

    status: int
    reason: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    duplicate: bool = False
    quarantined: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == 0x0000

    @property
    def http_status(self) -> int:
        """The HTTP status a STOW-RS response uses for this instance."""
        return HTTP_FOR_STATUS.get(self.status, 500)


class Ingest:
    """Validate, spool, index. Thread-safe (one instance serves every association)."""

    def __init__(
        self,
        spool: Spool,
        index: Index,
        on_stored: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        admit: Callable[[str], None] | None = None,
    ) -> None:
        self.spool = spool
        self.index = index
        self.on_stored = on_stored
        self.clock = clock
        #: called with the StudyInstanceUID before spooling; raises `OutOfResourcesError`
        #: when the study may not be queued now (bounded work queue)
        self.admit = admit
        self.stats = IngestStats()
        self._lock = threading.Lock()

    def receive(
        self,
        data: io.BytesIO | bytes | memoryview,
        transfer_syntax_uid: str,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_ae_title: str = "",
    ) -> IngestOutcome:
        """Store one encoded data set (no File Meta); see the module docstring for statuses."""
        shown_uid = ascii(sop_instance_uid)[:80]
        try:
            payload = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
            header, walked = identify(data, payload, transfer_syntax_uid)
            rec = record_from_header(
                header,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                path=Path(),  # set once spooled
                size_bytes=0,
                calling_ae_title=calling_ae_title,
            )
            if self.admit is not None:
                self.admit(rec.study_instance_uid)
            meta = encode_file_meta(
                rec.sop_class_uid, rec.sop_instance_uid, rec.transfer_syntax_uid, calling_ae_title
            )
            if walked is None:
                check_encoding(payload, rec.transfer_syntax_uid, header.dataset)
            else:
                check_pixel_data_length(walked, rec.transfer_syntax_uid, header.native_pixel_bytes)
            size = len(meta) + len(payload)
            path = self.spool.store(
                rec.study_instance_uid, rec.series_instance_uid, rec.sop_instance_uid, meta, payload
            )
            del payload
            new = self.index.add_instance(replace(rec, path=path, size_bytes=size), self.clock())
        except OutOfResourcesError as exc:
            self._count_refused(exc.dimse_status)
            log.warning("instance %s refused: %s", shown_uid, exc.message)
            return IngestOutcome(exc.dimse_status, _reason(exc), sop_instance_uid)
        except (MalformedDicomError, DatasetMismatchError) as exc:
            self._count_refused(exc.dimse_status)
            reason = _reason(exc)
            content = _file_bytes(data, sop_class_uid, sop_instance_uid, transfer_syntax_uid)
            where = self.spool.quarantine(sop_instance_uid, content, reason)
            log.warning("instance %s refused (%s), kept as %s", shown_uid, reason, where.name)
            return IngestOutcome(exc.dimse_status, reason, sop_instance_uid, quarantined=where)
        except RadtriageError as exc:
            self._count_refused(exc.dimse_status)
            log.error("instance %s failed: %s", shown_uid, exc.message)
            return IngestOutcome(exc.dimse_status, _reason(exc), sop_instance_uid)
        except Exception as exc:
            self._count_refused(0xC000)
            log.exception("instance %s failed unexpectedly", shown_uid)
            return IngestOutcome(0xC000, f"0xC000 {type(exc).__name__}", sop_instance_uid)
        with self._lock:
            if new:
                self.stats.stored += 1
                self.stats.bytes += size
            else:
                self.stats.duplicates += 1
        if new and self.on_stored is not None:
            self.on_stored(rec.study_instance_uid)
        return IngestOutcome(
            0x0000, None, rec.sop_instance_uid, rec.study_instance_uid, duplicate=not new
        )

    def receive_part10(self, content: bytes, source: str = "") -> IngestOutcome:
        """Store one DICOM Part 10 file (STOW-RS). `source` is recorded like a calling AE
        title (at most 16 characters). The File Meta Information names the SOP Class and
        Instance and the transfer syntax; the data set is stored exactly as sent."""
        try:
            meta, offset = read_file_meta(content)
        except MalformedDicomError as exc:
            self._count_refused(exc.dimse_status)
            reason = _reason(exc)
            where = self.spool.quarantine("", content, reason)
            return IngestOutcome(exc.dimse_status, reason, quarantined=where)
        return self.receive(
            memoryview(content)[offset:],
            meta.get("TransferSyntaxUID", ""),
            sop_class_uid=meta.get("MediaStorageSOPClassUID", ""),
            sop_instance_uid=meta.get("MediaStorageSOPInstanceUID", ""),
            calling_ae_title=source,
        )

    def refuse_too_large(self, size: int, limit: int, sop_instance_uid: str) -> int:
        """Count and log a data set over ``dicom.max_instance_bytes``; returns 0xA700."""
        self._count_refused(0xA700)
        log.warning(
            "instance %s refused: its data set of %d bytes exceeds dicom.max_instance_bytes (%d)",
            ascii(sop_instance_uid)[:80],
            size,
            limit,
        )
        return 0xA700

    def _count_refused(self, status: int) -> None:
        with self._lock:
            self.stats.refused[status] = self.stats.refused.get(status, 0) + 1


# Explicit VR with a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR"}
_LONG_VRS |= {b"UT", b"UV"}

_META_KEYWORDS = {
    0x0002: "MediaStorageSOPClassUID",
    0x0003: "MediaStorageSOPInstanceUID",
    0x0010: "TransferSyntaxUID",
}


def read_file_meta(content: bytes) -> tuple[dict[str, str], int]:
    """The UIDs of a Part 10 file's File Meta Information (always Explicit VR Little Endian)
    and the offset where its data set starts; `MalformedDicomError` when there is none."""
    if len(content) < 132 or content[128:132] != b"DICM":
        raise MalformedDicomError("not a DICOM Part 10 file (no DICM prefix); send Part 10")
    pos, found = 132, {}
    try:
        while pos + 8 <= len(content):
            group, element = struct.unpack_from("<HH", content, pos)
            if group != 0x0002:
                break
            vr = content[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                (length,) = struct.unpack_from("<I", content, pos + 8)
                start = pos + 12
            else:
                (length,) = struct.unpack_from("<H", content, pos + 6)
                start = pos + 8
            if start + length > len(content):
                raise MalformedDicomError("File Meta Information is truncated")
            if element in _META_KEYWORDS:
                value = content[start : start + length].decode("ascii", "replace")
                found[_META_KEYWORDS[element]] = value.rstrip("\x00 ")
            pos = start + length
    except struct.error as exc:
        raise MalformedDicomError("File Meta Information is truncated") from exc
    return found, pos


def _reason(exc: RadtriageError) -> str:
    return f"0x{exc.dimse_status:04X} {type(exc).__name__}: {exc.message}"


def _file_bytes(
    data: io.BytesIO | bytes | memoryview, sop_class: str, sop_instance: str, ts: str
) -> bytes:
    """What the quarantine keeps: a Part 10 file where the UIDs allow one, else the bytes."""
    raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
    try:
        return encode_file_meta(sop_class, sop_instance, ts) + raw
    except Exception:
        return raw
