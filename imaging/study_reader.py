"""Tolerant scan of a folder (or a list of files) into series, reading headers only.

Every file is either grouped into a series or listed in `StudyScan.skipped` with the reason, as
the `{code}: {message}` of the `core.errors` error that describes it. Per-frame geometry and
b-values are read here (classic and Enhanced MR alike), so series selection and the assembler's
completeness check need no pixel data.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from core.errors import MalformedDicomError, NotDicomError, RadtriageError

ENHANCED_MR_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)

# Vendor b-value tags: (group, private creator, element offset in its block, which value).
# Standard DiffusionBValue (0018,9087) is always tried first.
VENDOR_B_VALUE_TAGS: tuple[tuple[int, str, int, int], ...] = (
    (0x0019, "SIEMENS MR HEADER", 0x0C, 0),  # (0019,xx0C) B_value
    (0x0043, "GEMS_PARM_01", 0x39, 0),  # (0043,xx39) Slop_int_6: first value is the b-value
    (0x2001, "Philips Imaging DD 001", 0x03, 0),  # (2001,xx03) Diffusion B-Factor
)


@dataclass(frozen=True)
class FrameInfo:
    """Geometry and diffusion weighting of one frame (a classic instance has one frame)."""

    index: int  # 0-based frame number in its instance
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing), mm
    b_value: float | None = None
    temporal_position: int | None = None
    stack_id: str | None = None


@dataclass(frozen=True)
class InstanceInfo:
    """One SOP instance of a series, headers only."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str = ""
    instance_number: int | None = None
    rows: int = 0
    columns: int = 0
    number_of_frames: int = 1
    image_type: tuple[str, ...] = ()
    acquisition_time: str = ""
    frames: tuple[FrameInfo, ...] = ()

    @property
    def is_enhanced(self) -> bool:
        return self.sop_class_uid in ENHANCED_MR_SOP_CLASSES


@dataclass
class SeriesInfo:
    """One series (or, with `b_value` set, the frames of one b-value of a DWI series)."""

    series_instance_uid: str
    series_number: int | None
    series_description: str
    modality: str
    instances: list[InstanceInfo]
    headers: Dataset  # first instance, read without pixel data
    study_instance_uid: str = ""
    b_value: float | None = None  # set on a per-b-value sub-series

    @property
    def frames(self) -> list[tuple[InstanceInfo, FrameInfo]]:
        """Every (instance, frame) of this series, restricted to `b_value` when set."""
        out = []
        for inst in self.instances:
            for frame in inst.frames:
                if self.b_value is None or _same_b(frame.b_value, self.b_value):
                    out.append((inst, frame))
        return out

    @property
    def b_values(self) -> list[float]:
        """The distinct b-values of the frames, ascending (empty when none is recorded)."""
        values: list[float] = []
        for inst in self.instances:
            for frame in inst.frames:
                b = frame.b_value
                if b is not None and not any(_same_b(b, v) for v in values):
                    values.append(b)
        return sorted(values)

    @property
    def image_type(self) -> tuple[str, ...]:
        return tuple(str(v).upper() for v in (self.headers.get("ImageType") or ()))

    def with_b_value(self, b_value: float) -> SeriesInfo:
        """The sub-series of the instances/frames acquired or computed at `b_value`."""
        instances = [
            inst for inst in self.instances if any(_same_b(f.b_value, b_value) for f in inst.frames)
        ]
        return SeriesInfo(
            self.series_instance_uid,
            self.series_number,
            self.series_description,
            self.modality,
            instances,
            self.headers,
            self.study_instance_uid,
            b_value,
        )


@dataclass
class StudyScan:
    """What a folder holds: series of the (main) study and files that were skipped, with why."""

    study_instance_uid: str
    series: list[SeriesInfo] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def series_by_uid(self, uid: str) -> SeriesInfo:
        for s in self.series:
            if s.series_instance_uid == uid:
                return s
        raise KeyError(uid)


def _same_b(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) < 0.5


# --- reading one file -------------------------------------------------------------------------


def read_header(path: Path, *, stop_before_pixels: bool = True) -> Dataset:
    """Read a DICOM file tolerantly (files without preamble/meta included).

    Raises `NotDicomError` when the file is not DICOM and `MalformedDicomError` when it is but
    cannot be parsed.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass  # no preamble/"DICM": try as a raw data set below
    except (OSError, MemoryError) as exc:
        raise MalformedDicomError(f"{path}: cannot be read ({exc})") from exc
    except Exception as exc:
        raise MalformedDicomError(
            f"{path}: DICOM but unreadable ({type(exc).__name__}: {exc}); re-export the file"
        ) from exc
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        # A forced read of a non-DICOM file yields garbage tags; require the basics.
        ok = "SOPClassUID" in ds and "SOPInstanceUID" in ds
    except Exception as exc:
        raise NotDicomError(f"{path}: not a DICOM file ({type(exc).__name__})") from exc
    if not ok:
        raise NotDicomError(f"{path}: not a DICOM file (no preamble and no SOP Class/Instance UID)")
    return ds


def _floats(value: Any, n: int | None = None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        seq = value if isinstance(value, list | tuple) or hasattr(value, "__iter__") else [value]
        if isinstance(value, str | bytes):
            seq = [value]
        out = tuple(float(v) for v in seq)
    except (TypeError, ValueError):
        return None
    if (n is not None and len(out) != n) or not all(math.isfinite(v) for v in out):
        return None
    return out


def _parse_private_number(value: Any, which: int) -> float | None:
    """A number from a private element that may come as IS/DS/FL/SL or raw bytes (UN/OB)."""
    if isinstance(value, bytes):
        text = value.rstrip(b"\x00 ")
        try:
            decoded = text.decode("ascii")
            parts = [p for p in decoded.replace("\\", " ").split() if p]
            return float(parts[which]) if len(parts) > which else None
        except (UnicodeDecodeError, ValueError):
            pass
        if len(value) == 4:
            return float(struct.unpack("<f", value)[0])
        if len(value) == 8:
            return float(struct.unpack("<d", value)[0])
        return None
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        items = list(value)
        return _parse_private_number(items[which], 0) if len(items) > which else None
    try:
        if isinstance(value, str):
            parts = value.replace("\\", " ").split()
            return float(parts[which]) if len(parts) > which else None
        return float(value)
    except (TypeError, ValueError):
        return None


def _private_value(ds: Dataset, group: int, creator: str, offset: int) -> Any:
    """Value of a private element, found through its Private Creator block."""
    try:
        block = ds.private_block(group, creator)
        if offset in block:
            return block[offset].value
        return None
    except (KeyError, ValueError):
        pass
    # No matching creator: accept the conventional block 0x10 only when no creator is recorded.
    if (group << 16 | 0x0010) in ds:
        return None
    elem = ds.get((group, 0x1000 | offset))
    return None if elem is None else elem.value


def b_value_of(ds: Dataset) -> float | None:
    """Diffusion b-value (s/mm2) of a classic image or of a functional-group item.

    DiffusionBValue (0018,9087) first (also inside MRDiffusionSequence), then the vendor private
    tags in `VENDOR_B_VALUE_TAGS`. GE stores b + 1e9 in some versions; that offset is removed.
    """
    candidates: list[Any] = []
    if "DiffusionBValue" in ds:
        candidates.append(ds.DiffusionBValue)
    seq = ds.get("MRDiffusionSequence")
    if seq:
        candidates.append(seq[0].get("DiffusionBValue"))
    for value in candidates:
        b = _parse_private_number(value, 0) if value is not None else None
        if b is not None and math.isfinite(b) and b >= 0:
            return b
    for group, creator, offset, which in VENDOR_B_VALUE_TAGS:
        value = _private_value(ds, group, creator, offset)
        if value is None:
            continue
        b = _parse_private_number(value, which)
        if b is None or not math.isfinite(b):
            continue
        if b >= 1e9:
            b -= 1e9
        if 0 <= b < 1e5:
            return b
    return None


def _group_item(ds: Dataset, frame_item: Dataset | None, keyword: str) -> Dataset | None:
    """A functional-group macro item, per-frame first, then shared."""
    for holder in (frame_item, _shared(ds)):
        if holder is not None and keyword in holder and len(holder[keyword].value):
            return holder[keyword].value[0]
    return None


def _shared(ds: Dataset) -> Dataset | None:
    seq = ds.get("SharedFunctionalGroupsSequence")
    return seq[0] if seq else None


def _frame_infos(ds: Dataset) -> tuple[FrameInfo, ...]:
    n_frames = int(ds.get("NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None and _shared(ds) is None:
        # Classic image (a classic multi-frame repeats one geometry for every frame).
        frame = FrameInfo(
            0,
            _floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
            _floats(ds.get("ImageOrientationPatient"), 6),
            _floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
            b_value_of(ds),
            _int(ds.get("TemporalPositionIdentifier")),
        )
        return tuple(replace(frame, index=i) for i in range(max(n_frames, 1)))
    if per_frame is not None and len(per_frame) != n_frames:
        raise MalformedDicomError(
            f"NumberOfFrames is {n_frames} but PerFrameFunctionalGroupsSequence has "
            f"{len(per_frame)} items; the multi-frame object is inconsistent"
        )
    frames = []
    for i in range(n_frames):
        item = per_frame[i] if per_frame is not None else None
        pos = _group_item(ds, item, "PlanePositionSequence")
        ori = _group_item(ds, item, "PlaneOrientationSequence")
        meas = _group_item(ds, item, "PixelMeasuresSequence")
        diff = _group_item(ds, item, "MRDiffusionSequence")
        content = _group_item(ds, item, "FrameContentSequence")
        frames.append(
            FrameInfo(
                i,
                _floats(pos.get("ImagePositionPatient"), 3) if pos else None,  # type: ignore[arg-type]
                _floats(ori.get("ImageOrientationPatient"), 6) if ori else None,
                _floats(meas.get("PixelSpacing"), 2) if meas else None,  # type: ignore[arg-type]
                b_value_of(diff) if diff is not None else None,
                _int(content.get("TemporalPositionIndex")) if content else None,
                str(content.get("StackID")) if content and "StackID" in content else None,
            )
        )
    return tuple(frames)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def instance_info(path: Path, ds: Dataset) -> InstanceInfo:
    """Header summary of one instance (raises `MalformedDicomError` on missing UIDs)."""
    sop_instance_uid = str(ds.get("SOPInstanceUID") or "")
    if not sop_instance_uid:
        raise MalformedDicomError(f"{path}: no SOPInstanceUID (0008,0018)")
    meta = getattr(ds, "file_meta", None)
    try:
        frames = _frame_infos(ds)
    except RadtriageError:
        raise
    except Exception as exc:
        raise MalformedDicomError(
            f"{path}: unreadable image geometry ({type(exc).__name__}: {exc})"
        ) from exc
    return InstanceInfo(
        path=Path(path),
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=str(ds.get("SOPClassUID") or ""),
        transfer_syntax_uid=str(meta.get("TransferSyntaxUID") or "") if meta is not None else "",
        instance_number=_int(ds.get("InstanceNumber")),
        rows=_int(ds.get("Rows")) or 0,
        columns=_int(ds.get("Columns")) or 0,
        number_of_frames=_int(ds.get("NumberOfFrames")) or 1,
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        acquisition_time=str(ds.get("AcquisitionTime") or ds.get("AcquisitionDateTime") or ""),
        frames=frames,
    )


# --- the scan ---------------------------------------------------------------------------------


def _iter_files(source: Path | Iterable[Path]) -> Iterator[Path]:
    if isinstance(source, str | Path):
        root = Path(source)
        if root.is_file():
            yield root
            return
        if not root.is_dir():
            raise NotDicomError(f"{root}: no such file or folder")
        visited: set[str] = set()
        for folder, dirs, names in os.walk(root, followlinks=True):
            real = os.path.realpath(folder)
            if real in visited:  # a symlink loop
                dirs.clear()
                continue
            visited.add(real)
            dirs.sort()
            for name in sorted(names):
                if not name.startswith("."):
                    yield Path(folder) / name
        return
    for p in source:
        yield Path(p)


def scan_study(source: Path | Iterable[Path]) -> StudyScan:
    """Group the DICOM files under `source` into series (headers only, never pixels).

    Files that are not DICOM or cannot be parsed go to `skipped`. When the files belong to several
    studies, the study with most instances is returned and the others are skipped with a reason.
    """
    groups: dict[str, list[tuple[InstanceInfo, Dataset]]] = {}
    study_of: dict[str, str] = {}
    skipped: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for path in _iter_files(source):
        try:
            ds = read_header(path)
            info = instance_info(path, ds)
        except RadtriageError as exc:
            skipped.append((path, f"{exc.reason_code}: {exc.message}"))
            continue
        if info.sop_instance_uid in seen:
            skipped.append((path, f"duplicate: SOPInstanceUID {info.sop_instance_uid} seen before"))
            continue
        seen.add(info.sop_instance_uid)
        series_uid = str(ds.get("SeriesInstanceUID") or "")
        if not series_uid:
            skipped.append((path, "malformed_dicom: no SeriesInstanceUID (0020,000E)"))
            continue
        groups.setdefault(series_uid, []).append((info, ds))
        study_of.setdefault(series_uid, str(ds.get("StudyInstanceUID") or ""))

    counts: dict[str, int] = {}
    for uid, members in groups.items():
        counts[study_of[uid]] = counts.get(study_of[uid], 0) + len(members)
    main_study = max(counts, key=lambda k: counts[k]) if counts else ""

    series: list[SeriesInfo] = []
    for uid, members in groups.items():
        if study_of[uid] != main_study:
            for info, _ in members:
                skipped.append((info.path, f"other study: StudyInstanceUID {study_of[uid]}"))
            continue
        members.sort(key=lambda m: (m[0].instance_number or 0, str(m[0].path)))
        first = members[0][1]
        series.append(
            SeriesInfo(
                series_instance_uid=uid,
                series_number=_int(first.get("SeriesNumber")),
                series_description=str(first.get("SeriesDescription") or ""),
                modality=str(first.get("Modality") or ""),
                instances=[m[0] for m in members],
                headers=first,
                study_instance_uid=main_study,
            )
        )
    series.sort(
        key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid)
    )
    return StudyScan(study_instance_uid=main_study, series=series, skipped=skipped)
