"""The Storage SCP: C-ECHO and C-STORE over DICOM (pynetdicom), optionally over TLS.

Accepts every storage SOP Class (MR, Enhanced MR, Enhanced MR Color, and also SR, KO, PR, Raw
Data, private classes: a PACS sends whole studies) in whatever transfer syntax the peer
proposes first, because the data set is stored exactly as received and decoded only later.

Association negotiation (A-ASSOCIATE-RJ result/source/reason):

- calling AE title not in ``dicom.allowed_calling_aets``: rejected-permanent / service-user /
  0x03 *calling AE title not recognised*;
- called AE title is not ours (``dicom.ae_title``): rejected-permanent / service-user / 0x07
  *called AE title not recognised*;
- peer address not in ``dicom.allowed_hosts``: rejected-permanent / service-user / 0x01 *no
  reason given* (DICOM has no reason code for an address);
- more than ``dicom.max_associations`` at once: rejected-transient / service-provider
  (presentation) / 0x02 *local limit exceeded*.

C-STORE statuses this handler returns (the handler is thin: parse header, spool, fsync, index,
return; it never runs analysis):

- ``0x0000`` Success: the instance is durably in the spool (fsynced file and directory) and in
  the index. A duplicate SOP Instance UID also gets 0x0000 (idempotent: the index is unchanged).
- ``0xA700`` Refused, out of resources (`OutOfResourcesError`): free disk is below
  ``dicom.low_water_mark_mb`` or the spool write failed. Nothing is kept; the peer must resend.
- ``0xA900`` Error, data set does not match SOP Class (`DatasetMismatchError`): SOP Class or SOP
  Instance UID in the data set differ from the C-STORE request. Quarantined with a reason.
- ``0xC210`` Error, cannot understand (`MalformedDicomError`): the data set cannot be parsed or
  lacks Study/Series/SOP Instance UID. Quarantined with a reason.
- ``0xC000`` Error, cannot understand: an unexpected failure (e.g. the index database); the
  file may be in the spool and is indexed by `dicom_node.node.reconcile` at the next start.
"""

from __future__ import annotations

import io
import logging
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
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
from core.settings import DicomSettings, TlsSettings
from dicom_node.index import Index, InstanceRecord
from dicom_node.spool import Spool, encode_file_meta

log = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

# Header parsing stops after group 0x0040 (Requested Procedure Priority lives there); pixel
# data and everything after it are never parsed in the handler.
_LAST_GROUP = 0x0040


def _stop_after_header(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag.group > _LAST_GROUP)


def read_header(data: io.BytesIO | bytes, transfer_syntax_uid: str) -> Dataset:
    """The data set's elements up to group 0x0040 from its encoded bytes, or
    `MalformedDicomError`."""
    ts = UID(transfer_syntax_uid)
    raw = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
    try:
        if ts == DeflatedExplicitVRLittleEndian:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            stream = io.BytesIO(inflater.decompress(raw, 1 << 20))
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
            f"cannot parse the data set in transfer syntax {ts}: {exc}; check the sender"
        ) from exc


def _str(ds: Dataset, keyword: str) -> str:
    """An element's value as text. Raw ASCII values are decoded directly (this runs for every
    C-STORE); anything else goes through pydicom's conversion (character sets, sequences)."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    raw = ds.get_item(tag).value
    if isinstance(raw, bytes) and raw.isascii():
        return raw.decode("ascii").strip("\x00 ")
    value = ds[tag].value
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(float(_str(ds, keyword).split("\\")[0]))
    except (ValueError, OverflowError):
        return None


def _requested_procedure_priority(ds: Dataset) -> str:
    value = _str(ds, "RequestedProcedurePriority")
    if value:
        return value
    for item in ds.get("RequestAttributesSequence") or []:
        value = _str(item, "RequestedProcedurePriority")
        if value:
            return value
    return ""


def record_from_header(
    ds: Dataset,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    path: Path,
    size_bytes: int,
    calling_ae_title: str = "",
) -> InstanceRecord:
    """Check the header against the request and build the index record.

    Raises `MalformedDicomError` (UIDs missing/unreadable) or `DatasetMismatchError`."""
    try:
        study = _str(ds, "StudyInstanceUID")
        series = _str(ds, "SeriesInstanceUID")
        ds_sop_instance = _str(ds, "SOPInstanceUID")
        ds_sop_class = _str(ds, "SOPClassUID")
    except Exception as exc:
        raise MalformedDicomError(f"unreadable UID elements: {exc}") from exc
    if not study or not series:
        raise MalformedDicomError(
            "data set has no Study Instance UID or Series Instance UID; fix the sender"
        )
    if ds_sop_instance and ds_sop_instance != sop_instance_uid:
        raise DatasetMismatchError(
            f"SOP Instance UID {ds_sop_instance} in the data set differs from "
            f"Affected SOP Instance UID {sop_instance_uid} in the C-STORE request"
        )
    if ds_sop_class and ds_sop_class != sop_class_uid:
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
            transfer_syntax_uid=str(transfer_syntax_uid),
            path=path,
            size_bytes=size_bytes,
            patient_id=_str(ds, "PatientID")[:64],
            patient_name=_str(ds, "PatientName")[:324],
            accession_number=_str(ds, "AccessionNumber")[:64],
            study_date=_str(ds, "StudyDate")[:8],
            study_description=_str(ds, "StudyDescription")[:64],
            modality=_str(ds, "Modality")[:16],
            series_number=_int(ds, "SeriesNumber"),
            series_description=_str(ds, "SeriesDescription")[:64],
            body_part_examined=_str(ds, "BodyPartExamined")[:16],
            instance_number=_int(ds, "InstanceNumber"),
            requested_procedure_priority=_requested_procedure_priority(ds),
            calling_ae_title=calling_ae_title[:16],
        )
    except Exception as exc:
        raise MalformedDicomError(f"unreadable header elements: {exc}") from exc


@dataclass
class IngestStats:
    """Counters for metrics; updated under the handler's lock."""

    stored: int = 0
    duplicates: int = 0
    refused: dict[int, int] | None = None
    bytes: int = 0

    def __post_init__(self) -> None:
        if self.refused is None:
            self.refused = {}


class StoreHandler:
    """The C-STORE logic, independent of the network: bytes in, status out."""

    def __init__(
        self,
        spool: Spool,
        index: Index,
        on_stored: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.index = index
        self.on_stored = on_stored
        self.clock = clock
        self.stats = IngestStats()
        self._lock = threading.Lock()

    def store(
        self,
        data: io.BytesIO,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_ae_title: str = "",
    ) -> int:
        """Spool and index one data set; returns the DIMSE status (module docstring)."""
        try:
            header = read_header(data, transfer_syntax_uid)
            meta = encode_file_meta(
                sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_ae_title
            )
            payload = data.getbuffer()
            size = len(meta) + len(payload)
            rec = record_from_header(
                header,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                path=Path(),  # set once spooled
                size_bytes=size,
                calling_ae_title=calling_ae_title,
            )
            path = self.spool.store(
                rec.study_instance_uid, rec.series_instance_uid, sop_instance_uid, meta, payload
            )
            del payload
            new = self.index.add_instance(replace(rec, path=path), self.clock())
        except OutOfResourcesError as exc:
            self._count_refused(exc.dimse_status)
            log.warning("C-STORE %s refused: %s", sop_instance_uid, exc.message)
            return exc.dimse_status
        except (MalformedDicomError, DatasetMismatchError) as exc:
            self._count_refused(exc.dimse_status)
            reason = f"0x{exc.dimse_status:04X} {type(exc).__name__}: {exc.message}"
            content = _file_bytes(data, sop_class_uid, sop_instance_uid, transfer_syntax_uid)
            where = self.spool.quarantine(sop_instance_uid, content, reason)
            log.warning("C-STORE %s refused (%s), kept as %s", sop_instance_uid, reason, where)
            return exc.dimse_status
        except RadtriageError as exc:
            self._count_refused(exc.dimse_status)
            log.error("C-STORE %s failed: %s", sop_instance_uid, exc.message)
            return exc.dimse_status
        except Exception:
            self._count_refused(0xC000)
            log.exception("C-STORE %s failed unexpectedly", sop_instance_uid)
            return 0xC000
        with self._lock:
            if new:
                self.stats.stored += 1
                self.stats.bytes += size
            else:
                self.stats.duplicates += 1
        if new and self.on_stored is not None:
            self.on_stored(rec.study_instance_uid)
        return 0x0000

    def _count_refused(self, status: int) -> None:
        with self._lock:
            assert self.stats.refused is not None
            self.stats.refused[status] = self.stats.refused.get(status, 0) + 1

    def handle_store(self, event: Any) -> int:
        """pynetdicom ``EVT_C_STORE`` handler."""
        req = event.request
        return self.store(
            req.DataSet,
            sop_class_uid=str(req.AffectedSOPClassUID),
            sop_instance_uid=str(req.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae_title=str(event.assoc.requestor.ae_title),
        )


def _file_bytes(data: io.BytesIO, sop_class: str, sop_instance: str, ts: str) -> bytes:
    try:
        return encode_file_meta(sop_class, sop_instance, ts) + data.getvalue()
    except Exception:
        return data.getvalue()


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS for the SCP (DICOM TLS, PS3.15 B.1). With ``cafile`` peers must show a client
    certificate signed by it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    if tls.cafile is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(tls.cafile))
    return ctx


def client_ssl_context(tls: TlsSettings | None) -> ssl.SSLContext:
    """TLS for the sender: verify the destination against ``cafile`` (or the system store),
    present our certificate when one is configured."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.cafile) if tls and tls.cafile else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # DICOM peers are addressed by IP; trust comes from the CA
    if tls is not None:
        ctx.load_cert_chain(certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    return ctx


class StorageSCP:
    """The listening AE. `start()` returns once the port is bound; `stop()` closes it."""

    def __init__(self, settings: DicomSettings, handler: StoreHandler) -> None:
        self.settings = settings
        self.handler = handler
        self._server: Any = None
        self._ae: Any = None

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def _check_peer(self, event: Any) -> None:
        """``EVT_REQUESTED``: reject peers whose address is not allowed."""
        allowed = self.settings.allowed_hosts
        if not allowed:
            return
        address = event.assoc.requestor.address
        if address not in allowed:
            log.warning("association from %s rejected: address not allowed", address)
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)
            event.assoc.kill()  # waits until the A-ASSOCIATE-RJ has gone out

    def start(self) -> None:
        from pynetdicom import AE, _config, evt

        # Accept any storage SOP Class (also private ones) and store it unparsed; answer
        # C-STORE from our handler only; no per-message debug logging.
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        _config.LOG_HANDLER_LEVEL = "none"
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        ae.maximum_pdu_size = s.max_pdu_size
        ae.maximum_associations = s.max_associations
        ae.require_called_aet = True
        ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self.handler.handle_store),
            (evt.EVT_REQUESTED, self._check_peer),
        ]
        ssl_context = server_ssl_context(s.tls) if s.tls is not None else None
        try:
            self._server = ae.start_server(
                (s.bind_address, s.port),
                block=False,
                evt_handlers=handlers,
                ssl_context=ssl_context,
            )
        except OSError as exc:
            from core.errors import ConfigError

            raise ConfigError(
                f"cannot listen on {s.bind_address}:{s.port}: {exc}; choose a free dicom.port"
            ) from exc
        self._ae = ae
        log.info(
            "DICOM SCP %s listening on %s:%d%s",
            s.ae_title,
            s.bind_address,
            self.port,
            " (TLS)" if ssl_context else "",
        )

    def stop(self) -> None:
        """Stop accepting, let running associations finish their current message, close."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None
