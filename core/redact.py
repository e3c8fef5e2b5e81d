"""Secrets out of text: passwords in database URLs and connection strings never reach a log
line, an error message or a ``repr``.

`redact` rewrites ``scheme://user:PASSWORD@host`` to ``scheme://user:***@host`` and
``password=PASSWORD`` (libpq key/value form) to ``password=***`` anywhere in a text, so it can
be applied to an exception's message as well as to a URL.
"""

from __future__ import annotations

import re

MASK = "***"

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*:)[^\s'\"]*@")
_KEYVALUE_PASSWORD = re.compile(
    r"(?P<head>\bpassword\s*=\s*)(?:'[^']*'|\"[^\"]*\"|[^\s'\",;]+)", re.I
)


def redact(text: str) -> str:
    """`text` with every URL password and ``password=`` value replaced by ``***``."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)
    return _KEYVALUE_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)
