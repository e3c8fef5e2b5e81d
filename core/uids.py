"""DICOM UID syntax (PS3.5 section 9.1), checked before a UID names anything.

A UID is 1..64 characters of digits and dots: components separated by single dots, no empty
component, no leading zero in a component except the component ``0`` itself. Trailing NUL
padding (PS3.5 6.2, VR UI) is tolerated on input and removed; nothing else is cleaned, so two
different invalid values can never map to one valid UID.

Only a UID that passed `require_uid` may become a file or folder name (`store.spool`).
"""

from __future__ import annotations

import re

from core.errors import InvalidUIDError

__all__ = ["InvalidUIDError", "is_valid_uid", "require_uid"]

MAX_UID_LENGTH = 64

_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def _unpadded(value: str) -> str:
    return value[:-1] if value.endswith("\x00") else value


def is_valid_uid(value: object) -> bool:
    """True when `value` is a string with valid DICOM UID syntax (one trailing NUL allowed)."""
    if not isinstance(value, str):
        return False
    uid = _unpadded(value)
    return 0 < len(uid) <= MAX_UID_LENGTH and _UID_RE.fullmatch(uid) is not None


def require_uid(value: object, keyword: str) -> str:
    """`value` without its NUL padding, or `InvalidUIDError` naming the element `keyword`."""
    if is_valid_uid(value):
        return _unpadded(str(value))
    shown = ascii(value)[:80]  # never log raw header text: escapes control characters
    raise InvalidUIDError(
        f"{keyword} {shown} is not a valid DICOM UID (digits and dots, no leading zeros, "
        f"1..{MAX_UID_LENGTH} characters, PS3.5 9.1); fix the sender"
    )
