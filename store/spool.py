"""The spool: received instances on disk, written atomically and durably.

Layout under ``StorageSettings.root``::

    spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   accepted instances
    quarantine/<time>_<random>.dcm + <time>_<random>.reason.txt         refused instances
    tmp/                                                                 half-written files
    outbox/<StudyInstanceUID>/...                                        documents to send

Every folder and file name under ``spool/`` and ``outbox/`` is a UID that passed
`core.uids.require_uid`, used verbatim (no cleaning, so two UIDs never share a file and
``..`` or ``/`` can never occur); quarantine names are generated, and what the peer claimed
(escaped) is written into the reason sidecar only.

An instance is durable when `Spool.store` returns: data written to ``tmp/``, fsynced, renamed
into place and the directory fsynced. Only then may the SCP answer C-STORE with success.

The file is written from the bytes the peer sent (no decode/re-encode): 128-byte preamble,
``DICM``, a File Meta Information group we encode here, then the data set exactly as received
in the negotiated transfer syntax.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from core.errors import OutOfResourcesError
from core.uids import require_uid

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1429.1"
IMPLEMENTATION_VERSION_NAME = "RADTRIAGE_01"

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (group 0002 is always encoded this way)."""
    if vr in (b"OB",):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae_title: str = "",
) -> bytes:
    """Preamble, ``DICM`` prefix and the File Meta Information group (PS3.10 section 7.1)."""
    body = b"".join(
        (
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _ui(sop_class_uid)),
            _element(0x0002, 0x0003, b"UI", _ui(sop_instance_uid)),
            _element(0x0002, 0x0010, b"UI", _ui(transfer_syntax_uid)),
            _element(0x0002, 0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _element(0x0002, 0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
            _element(0x0002, 0x0016, b"AE", _text(source_ae_title.strip()))
            if source_ae_title.strip()
            else b"",
        )
    )
    length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return _PREAMBLE + length + body


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    target: str | Path, chunks: Sequence[bytes | memoryview], tmp_dir: str | Path
) -> None:
    """Write `chunks` to `target`: tmp file, fsync, rename, fsync of the target directory."""
    target = os.fspath(target)
    tmp = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, target)
    fsync_dir(os.path.dirname(target))


class Spool:
    """Files of received instances. Thread-safe: every write goes through its own tmp file."""

    def __init__(self, root: Path, low_water_mark_mb: int = 0) -> None:
        self.root = Path(root).resolve()  # the index stores absolute paths
        self.low_water_mark_mb = low_water_mark_mb
        self.spool_dir = self.root / "spool"
        self.quarantine_dir = self.root / "quarantine"
        self.tmp_dir = self.root / "tmp"
        self.outbox_dir = self.root / "outbox"
        for d in (self.spool_dir, self.quarantine_dir, self.tmp_dir, self.outbox_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[str] = set()

    def clean_tmp(self) -> int:
        """Remove half-written files left by a crash; returns how many."""
        n = 0
        for part in self.tmp_dir.glob("*.part"):
            part.unlink(missing_ok=True)
            n += 1
        return n

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def check_space(self, incoming_bytes: int = 0) -> None:
        """Raise `OutOfResourcesError` when storing would leave less than the low-water mark."""
        free = self.free_mb() - incoming_bytes / (1024 * 1024)
        if free < self.low_water_mark_mb:
            raise OutOfResourcesError(
                f"free disk at {self.root} is {free:.0f} MB, below the low-water mark of "
                f"{self.low_water_mark_mb} MB; free disk space or lower "
                "dicom.low_water_mark_mb, then resend"
            )

    def instance_path(
        self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
    ) -> Path:
        """Where an instance lies; `InvalidUIDError` for any UID that breaks the syntax."""
        folder, name = self._instance_file(
            study_instance_uid, series_instance_uid, sop_instance_uid
        )
        return Path(folder, name)

    def _instance_file(
        self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
    ) -> tuple[str, str]:
        """(folder, file name) of an instance as strings (pathlib is slow on the hot path)."""
        folder = os.path.join(
            self.spool_dir,
            require_uid(study_instance_uid, "StudyInstanceUID"),
            require_uid(series_instance_uid, "SeriesInstanceUID"),
        )
        return folder, f"{require_uid(sop_instance_uid, 'SOPInstanceUID')}.dcm"

    def outbox_folder(self, study_instance_uid: str) -> Path:
        """The study's folder for documents to send; `InvalidUIDError` for a bad UID."""
        return self.outbox_dir / require_uid(study_instance_uid, "StudyInstanceUID")

    def _ensure_dir(self, path: str) -> None:
        if path in self._known_dirs:
            return
        folder = Path(path)
        missing = [
            p for p in (folder, *folder.parents) if not p.exists() and self.root in p.parents
        ]
        folder.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            fsync_dir(created.parent)
        self._known_dirs.add(path)

    def store(
        self,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        file_meta: bytes,
        dataset: bytes | memoryview,
    ) -> Path:
        """Durably write one instance and return its path. Raises `OutOfResourcesError`."""
        self.check_space(len(file_meta) + len(dataset))
        folder, name = self._instance_file(
            study_instance_uid, series_instance_uid, sop_instance_uid
        )
        self._ensure_dir(folder)
        target = os.path.join(folder, name)
        try:
            write_atomic(target, (file_meta, dataset), self.tmp_dir)
        except OSError as exc:
            raise OutOfResourcesError(
                f"could not write {name} to the spool: {exc}; check the disk under "
                f"{self.root}, then resend"
            ) from exc
        return Path(target)

    def quarantine(self, claimed_sop_instance_uid: str, data: bytes, reason: str) -> Path:
        """Keep a refused instance with a reason sidecar for a person to look at.

        The file name is generated (time + random); the SOP Instance UID the peer claimed is
        recorded, escaped, in the sidecar only. Returns the path of the kept data."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        base = self.quarantine_dir / f"{stamp}_{uuid.uuid4().hex}"
        target = base.with_suffix(".dcm")
        sidecar = (
            f"reason: {reason}\n"
            f"claimed SOP Instance UID: {ascii(claimed_sop_instance_uid)[:200]}\n"
            f"bytes: {len(data)}\n"
        )
        try:
            # refused data never takes the disk below the low-water mark (a peer sending
            # malformed instances must not fill it): then only the reason is kept
            self.check_space(len(data) + len(sidecar))
        except OutOfResourcesError:
            sidecar += "data: not kept (free disk below the low-water mark)\n"
            target = base.with_suffix(".reason.txt")
            with contextlib.suppress(OSError):
                write_atomic(target, (sidecar.encode(),), self.tmp_dir)
            return target
        try:
            write_atomic(target, (data,), self.tmp_dir)
            write_atomic(base.with_suffix(".reason.txt"), (sidecar.encode(),), self.tmp_dir)
        except OSError:
            return target  # disk full: the status already tells the sender; nothing to keep
        return target
