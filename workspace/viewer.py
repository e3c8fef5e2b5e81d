"""The "open in viewer" link: a site's viewer URL template (``[http] viewer_url``) filled with
one study's identifiers.

The template is checked when settings load (http/https only, placeholders ``{study_uid}`` and
``{accession}`` only, see `core.settings.HttpSettings`). Every value is percent-encoded here
(nothing is left safe, not even ``/``), so a hostile accession number cannot add a query
parameter, a path segment or a fragment to the viewer's URL. The pages use the link as it is.
"""

from __future__ import annotations

import string
from urllib.parse import quote


def viewer_link(template: str, study_uid: str, accession: str | None) -> str | None:
    """The viewer URL for a study; None without a template, or when the template names an
    identifier the study lacks (a PACS viewer by accession, a study without one)."""
    if not template:
        return None
    values = {"study_uid": study_uid or "", "accession": accession or ""}
    needed = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if any(not values.get(name) for name in needed):
        return None
    return template.format_map({k: quote(v, safe="") for k, v in values.items()})
