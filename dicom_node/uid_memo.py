"""pynetdicom's UID setter, remembering the UIDs it already accepted.

Every A-ASSOCIATE-RQ names its abstract and transfer syntaxes again: storescu proposes about
120 presentation contexts, and pynetdicom checks each UID through ``utils.set_uid`` (decode,
pydicom ``UID``, the ``UI`` validator and a conformance regex) once when decoding the PDU and
again when building the primitive. That was a quarter of our Python CPU per association.

`install` replaces the name ``set_uid`` in the pynetdicom modules that parse associations and
messages by `remembered_set_uid`: a value accepted before (same text, same validation asked
for, same validator, conformance setting and codecs) returns the same ``UID`` at once.
Anything else, including every refused or non-conformant value (so its error or warning is
raised or logged each time, as before), goes through pynetdicom's own ``set_uid``. At most
`MAX_REMEMBERED` values are kept; a peer sending endless new UIDs only restarts the memo.
See ``patches/README.md``.
"""

from __future__ import annotations

import threading
from typing import Any

from pydicom.uid import UID
from pynetdicom import _config

#: How many accepted values are kept (storescu's proposals are about 200 distinct UIDs).
MAX_REMEMBERED = 4096

#: The pynetdicom modules whose ``set_uid`` name is replaced.
_MODULES = ("pdu_items", "pdu_primitives", "presentation", "dimse_primitives")

_remembered: dict[tuple[Any, ...], UID] = {}
_lock = threading.Lock()
_original: Any = None


def remembered_set_uid(
    value: Any,
    name: str,
    allow_empty: bool = True,
    allow_none: bool = True,
    validate: bool = True,
) -> UID | None:
    """pynetdicom's ``utils.set_uid`` (same arguments, result and errors), remembered."""
    if type(value) not in (str, bytes, UID):
        return _original(value, name, allow_empty, allow_none, validate)  # type: ignore[no-any-return]
    key = (
        type(value),
        value,
        validate,
        _config.VALIDATORS["UI"],
        _config.ENFORCE_UID_CONFORMANCE,
        _config.CODECS,
    )
    known = _remembered.get(key)
    if known is not None:
        return known
    uid = _original(value, name, allow_empty, allow_none, validate)
    if uid and uid.is_valid:  # empty, refused or non-conformant: asked again each time
        with _lock:
            if len(_remembered) >= MAX_REMEMBERED:
                _remembered.clear()
            _remembered[key] = uid
    return uid  # type: ignore[no-any-return]


def install() -> None:
    """Replace ``set_uid`` in pynetdicom's parsing modules (idempotent)."""
    global _original
    import importlib

    from pynetdicom import utils

    if _original is None:
        _original = utils.set_uid
    for name in _MODULES:
        module = importlib.import_module(f"pynetdicom.{name}")
        module.set_uid = remembered_set_uid  # type: ignore[attr-defined]


def uninstall() -> None:
    """Put pynetdicom's own ``set_uid`` back and forget every value (for tests)."""
    import importlib

    if _original is None:
        return
    for name in _MODULES:
        importlib.import_module(f"pynetdicom.{name}").set_uid = _original  # type: ignore[attr-defined]
    _remembered.clear()
