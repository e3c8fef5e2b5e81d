"""A structural check of an encoded data set, run on ingest before anything is stored.

`check_encoding` walks every element at every nesting level without decoding a value: each
element must fit in the bytes received, an explicit VR must be a DICOM VR, an undefined length
is allowed only where PS3.5 7.5 allows it (SQ, UN, encapsulated OB/OW pixel data, items), every
undefined-length sequence and item must be closed by its delimiter, and nesting is at most
`MAX_DEPTH` deep. For native (uncompressed) transfer syntaxes Pixel Data must be as long as
Rows x Columns x Samples per Pixel x Number of Frames x Bits Allocated needs.

It costs one pass over the element headers (values are skipped by their length), so a
truncated, mis-encoded or inconsistent instance is refused with a reason at the boundary
instead of failing later in analysis. Deflated data sets are not walked (they would have to be
inflated whole); their header is still parsed on ingest.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from core.errors import MalformedDicomError

MAX_DEPTH = 32

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)
#: explicit VRs with a 4-byte value length (PS3.5 7.1.2)
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: the value length that means "undefined" (PS3.5 7.1.1)
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQUENCE_END = (0xFFFE, 0xE0DD)
_PIXEL_DATA = (0x7FE0, 0x0010)

_PIXEL_DATA_TAG = _PIXEL_DATA[0] << 16 | _PIXEL_DATA[1]
#: 2-byte VR -> True for the VRs with a 4-byte length
_VR_KIND = {vr: vr in LONG_VRS for vr in _VRS}
# an element header read at once: group, element, VR, 2-byte length (explicit VR)
_HEADER_LE = struct.Struct("<HH2sH").unpack_from
_HEADER_BE = struct.Struct(">HH2sH").unpack_from
_U32_LE = struct.Struct("<I").unpack_from
_U32_BE = struct.Struct(">I").unpack_from

_Frame = tuple[int | None, str, bool]


def _fail(why: str, offset: int) -> MalformedDicomError:
    return MalformedDicomError(f"data set encoding is broken at byte {offset}: {why}")


class _Walker:
    def __init__(self, data: memoryview, implicit: bool, little: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.end_char = "<" if little else ">"
        self.pixel_data_length: int | None = None
        #: (group << 16 | element, offset) of each top-level element, in order
        self.top_level: list[tuple[int, int]] = []

    def _tag(self, pos: int) -> tuple[int, int]:
        if pos + 4 > len(self.data):
            raise _fail("element header is truncated", pos)
        group, element = struct.unpack_from(self.end_char + "HH", self.data, pos)
        return group, element

    def _length(self, pos: int, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if pos + size > len(self.data):
            raise _fail("element header is truncated", pos)
        (value,) = struct.unpack_from(self.end_char + fmt, self.data, pos)
        return int(value)

    def walk(self) -> None:
        """Check the whole data set; iterative, so nesting costs no Python stack."""
        # each frame: (end offset or None for undefined length, kind, implicit VR) with kind
        # "dataset", "sequence" (items until the sequence delimiter) or "fragments" (pixel
        # items); the items of an undefined-length UN are implicit VR (PS3.5 6.2.2)
        stack: list[_Frame] = [(len(self.data), "dataset", self.implicit)]
        pos = 0
        while stack:
            end, kind, implicit = stack[-1]
            if end is not None and pos == end:
                stack.pop()
                continue
            limit = len(self.data) if end is None else end
            if end is not None and pos > end:
                raise _fail("an element runs past the end of its item or sequence", pos)
            if pos >= limit:
                raise _fail(f"undefined-length {kind} has no delimiter", pos)
            if kind == "dataset":
                pos = self._simple_elements(pos, limit, implicit, len(stack) == 1)
                if pos == end or pos >= limit:
                    continue  # the frame ends here (or runs over: the checks above say so)
            tag = self._tag(pos)
            if kind in ("sequence", "fragments"):
                pos = self._sequence_entry(tag, pos, kind, implicit, stack)
                continue
            if tag == _ITEM_END:
                if end is not None or len(stack) == 1:
                    raise _fail("item delimiter outside an undefined-length item", pos)
                stack.pop()
                pos += 8
                continue
            if tag[0] == 0xFFFE:
                raise _fail(f"unexpected delimiter ({tag[0]:04X},{tag[1]:04X})", pos)
            pos = self._element(tag, pos, implicit, stack)

    def _simple_elements(self, pos: int, limit: int, implicit: bool, top: bool) -> int:
        """Skip the run of plain elements from `pos` (defined length, not a delimiter, not a
        sequence to enter, a full header before `limit`), as `_element` would, in one tight
        loop: the hot path, a few dozen elements per image. Returns where the run stops; the
        element there (anything else, or an error) is left to the general walk."""
        data, end_of_data = self.data, len(self.data)
        header = _HEADER_LE if self.end_char == "<" else _HEADER_BE
        long_length = _U32_LE if self.end_char == "<" else _U32_BE
        top_level, kinds = self.top_level, _VR_KIND
        while pos + 12 <= limit:
            group, element, vr, short_length = header(data, pos)
            if group == 0xFFFE:
                break
            if implicit:
                length, start = long_length(data, pos + 4)[0], pos + 8
            else:
                kind = kinds.get(vr)
                if kind is None:
                    break
                if kind:
                    length, start = long_length(data, pos + 8)[0], pos + 12
                else:
                    length, start = short_length, pos + 8
                if vr == b"SQ" and length:
                    break
            if length == UNDEFINED_LENGTH or start + length > end_of_data:
                break
            if top:
                tag = group << 16 | element
                top_level.append((tag, pos))
                if tag == _PIXEL_DATA_TAG:
                    self.pixel_data_length = length
            pos = start + length
        return pos

    def _sequence_entry(
        self, tag: tuple[int, int], pos: int, kind: str, implicit: bool, stack: list[_Frame]
    ) -> int:
        length = self._length(pos + 4, "I")
        if tag == _SEQUENCE_END:
            if stack[-1][0] is not None:
                raise _fail("sequence delimiter in a defined-length sequence", pos)
            stack.pop()
            return pos + 8
        if tag != _ITEM:
            raise _fail(f"({tag[0]:04X},{tag[1]:04X}) where an item was expected", pos)
        start = pos + 8
        if kind == "fragments":
            if length == UNDEFINED_LENGTH or start + length > len(self.data):
                raise _fail("pixel data fragment is truncated or has undefined length", pos)
            return start + length
        end = None if length == UNDEFINED_LENGTH else start + length
        self._push(stack, (end, "dataset", implicit), pos)
        return start

    def _push(self, stack: list[_Frame], frame: _Frame, pos: int) -> None:
        if len(stack) > MAX_DEPTH * 2:
            raise _fail(f"sequences nested deeper than {MAX_DEPTH} levels", pos)
        end = frame[0]
        if end is not None and end > len(self.data):
            raise _fail("a value runs past the end of the data set", pos)
        stack.append(frame)

    def _element(self, tag: tuple[int, int], pos: int, implicit: bool, stack: list[_Frame]) -> int:
        if len(stack) == 1:
            self.top_level.append((tag[0] << 16 | tag[1], pos))
        vr = b""
        if implicit:
            length, start = self._length(pos + 4, "I"), pos + 8
        else:
            vr = bytes(self.data[pos + 4 : pos + 6])
            if vr not in _VRS:
                raise _fail(f"{vr!r} of ({tag[0]:04X},{tag[1]:04X}) is not a DICOM VR", pos)
            if vr in LONG_VRS:
                length, start = self._length(pos + 8, "I"), pos + 12
            else:
                length, start = self._length(pos + 6, "H"), pos + 8
        if length == UNDEFINED_LENGTH:
            if tag == _PIXEL_DATA and vr != b"UN":
                self._push(stack, (None, "fragments", implicit), pos)
            elif implicit or vr in (b"SQ", b"UN"):
                self._push(stack, (None, "sequence", implicit or vr == b"UN"), pos)
            else:
                raise _fail(f"undefined length on a {vr.decode()} element", pos)
            return start
        if start + length > len(self.data):
            raise _fail(
                f"({tag[0]:04X},{tag[1]:04X}) claims {length} bytes, "
                f"{len(self.data) - start} remain",
                pos,
            )
        if tag == _PIXEL_DATA and len(stack) == 1:
            self.pixel_data_length = length
        if vr == b"SQ" and length:
            self._push(stack, (start + length, "sequence", implicit), pos)
            return start
        return start + length


def _implicit_despite_explicit(data: memoryview | bytes, ts: UID) -> bool:
    """True when an explicit VR data set's first element has no VR where one belongs."""
    return not ts.is_implicit_VR and len(data) >= 6 and bytes(data[4:6]) not in _VRS


def native_pixel_bytes(header: Dataset) -> int | None:
    """Bytes of native Pixel Data the image attributes call for, or None when they are not all
    there or not numbers (then nothing is checked)."""
    try:
        rows, columns = int(header.Rows), int(header.Columns)
        bits = int(header.BitsAllocated)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        frames = int(str(header.get("NumberOfFrames", 1) or 1).strip() or 1)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return None
    if min(rows, columns, bits, samples, frames) <= 0:
        return None
    photometric = str(header.get("PhotometricInterpretation", "")).strip()
    return pixel_bytes_for(rows, columns, bits, samples, frames, photometric)


def pixel_bytes_for(
    rows: int, columns: int, bits: int, samples: int, frames: int, photometric: str
) -> int | None:
    """Bytes of native Pixel Data for these image attributes; None when one is not positive."""
    if min(rows, columns, bits, samples, frames) <= 0:
        return None
    if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        samples = 2  # two chroma values shared by two pixels (PS3.3 C.7.6.3.1.2)
    pixels = rows * columns * samples * frames
    return (pixels + 7) // 8 if bits == 1 else pixels * ((bits + 7) // 8)


@dataclass(frozen=True)
class Walked:
    """What a successful walk learned: the VR encoding actually used, the top-level Pixel
    Data length and where each top-level element starts (``(tag, offset)`` in order)."""

    implicit_vr: bool
    pixel_data_length: int | None
    top_level: list[tuple[int, int]]


@functools.lru_cache(maxsize=64)
def walked_encoding(transfer_syntax_uid: str) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a transfer syntax that is walked; None for one that is
    not (deflated, unknown)."""
    ts = UID(transfer_syntax_uid)
    if ts == DeflatedExplicitVRLittleEndian or not ts.is_transfer_syntax:
        return None
    return bool(ts.is_implicit_VR), bool(ts.is_little_endian)


def walk_encoding(data: memoryview | bytes, transfer_syntax_uid: str) -> Walked | None:
    """Walk the whole encoding (module docstring); `MalformedDicomError` with the reason when
    it is broken, None for a transfer syntax that is not walked (deflated, unknown)."""
    encoding = walked_encoding(transfer_syntax_uid)
    if encoding is None:
        return None
    implicit, little = encoding
    walker = _Walker(memoryview(data), implicit, little)
    try:
        walker.walk()
    except MalformedDicomError:
        if not _implicit_despite_explicit(data, UID(transfer_syntax_uid)):
            raise
        # read tolerantly, like pydicom: an implicit VR data set sent as explicit VR
        walker = _Walker(memoryview(data), True, little)
        walker.walk()
    return Walked(walker.implicit, walker.pixel_data_length, walker.top_level)


def check_pixel_data_length(
    walked: Walked, transfer_syntax_uid: str, needed_bytes: Callable[[], int | None]
) -> None:
    """`MalformedDicomError` when native Pixel Data is shorter than the image attributes need
    (`needed_bytes`, asked only when there is native Pixel Data to check)."""
    if walked.pixel_data_length is None or _is_compressed(transfer_syntax_uid):
        return
    needed = needed_bytes()
    if needed is not None and walked.pixel_data_length < needed:
        raise MalformedDicomError(
            f"Pixel Data is {walked.pixel_data_length} bytes but Rows, Columns, Samples per "
            f"Pixel, Number of Frames and Bits Allocated need {needed}; fix the sender"
        )


def check_encoding(data: memoryview | bytes, transfer_syntax_uid: str, header: Dataset) -> None:
    """Raise `MalformedDicomError` with the reason when the encoding is broken (module
    docstring). `header` is the parsed header (for the pixel data size check)."""
    walked = walk_encoding(data, transfer_syntax_uid)
    if walked is not None:
        check_pixel_data_length(walked, transfer_syntax_uid, lambda: native_pixel_bytes(header))


@functools.lru_cache(maxsize=64)
def _is_compressed(transfer_syntax_uid: str) -> bool:
    return bool(UID(transfer_syntax_uid).is_compressed)
