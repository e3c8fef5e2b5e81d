"""HL7 v2 building blocks shared by the order listener and the result sender: the versions we
speak, the refusal type with its table 0357 code, ST escaping and field reading (hl7apy)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_segment

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")


class Hl7Error(Exception):
    """Why a message is refused: the ACK code (AE/AR), HL7 table 0357 code, where and what."""

    def __init__(
        self, ack: str, code: int, text: str, segment: str = "", field: int | None = None
    ) -> None:
        super().__init__(text)
        self.ack, self.code, self.text, self.segment, self.field = ack, code, text, segment, field


_ERROR_NAMES = {
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    207: "Application internal error",
}


def escape(text: str) -> str:
    """`text` as an HL7 ST value: delimiters escaped, line breaks as spaces."""
    out = str(text).replace("\\", "\\E\\")
    for char, seq in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, seq)
    return " ".join(out.splitlines())


def unescape(text: str) -> str:
    out = text
    for char, seq in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(seq, char)
    return out.replace("\\E\\", "\\")


def _segments(element: Any) -> Iterator[Any]:
    for child in element.children:
        if child.classname == "Segment":
            yield child
        else:
            yield from _segments(child)


def field_component(segment: Any, field: int, component: int = 1, repetition: int = 0) -> str:
    """The text of SEG-field.component (1-based) of one repetition; "" when absent."""
    if segment is None:
        return ""
    try:
        reps = getattr(segment, f"{segment.name.lower()}_{field}")
    except (HL7apyException, AttributeError):
        return ""
    if len(reps) <= repetition:
        return ""
    value = reps[repetition]
    # components beyond the data type's (a hostile message) have no name: they are not read
    children = [c for c in value.children if c.name] if value.children else []
    parts = {c.name.rsplit("_", 1)[-1]: c for c in children}
    if not parts or all(not k.isdigit() for k in parts):
        text = value.to_er7()
        pieces = text.split("^")
        return pieces[component - 1].strip() if len(pieces) >= component else ""
    child = parts.get(str(component))
    return child.to_er7().split("&")[0].strip() if child is not None else ""


def _repetitions(segment: Any, field: int) -> int:
    try:
        return len(getattr(segment, f"{segment.name.lower()}_{field}"))
    except (HL7apyException, AttributeError):
        return 0


def read_header(text: str) -> tuple[str, str, str, str, str]:
    """MSH-10, MSH-12, MSH-9, MSH-3, MSH-4 of a message, read on their own (for the ACK)."""
    first = text.replace("\n", "\r").split("\r", 1)[0]
    if not first.startswith("MSH"):
        return "", "", "", "", ""
    try:
        msh = parse_segment(first, version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    except Exception:  # any parser error: the header stays unknown
        return "", "", "", "", ""
    return (
        field_component(msh, 10),
        field_component(msh, 12),
        "^".join(x for x in (field_component(msh, 9, 1), field_component(msh, 9, 2)) if x),
        field_component(msh, 3),
        field_component(msh, 4),
    )
