"""Open in viewer: the site's URL template ([http] viewer_url) is checked when settings load,
filled with percent-encoded identifiers, and served by the API on worklist rows and the study."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import HttpSettings, OidcSettings
from store.index import Index
from tests.serving.workspace_helpers import add_study, add_users, client
from workspace.viewer import viewer_link

OHIF = "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}"
UID = "1.2.826.0.1.3680043.8.498.7"


@pytest.mark.parametrize(
    "template",
    [
        "javascript:alert(1)//{study_uid}",
        "data:text/html,{study_uid}",
        "//ohif.example.org/{study_uid}",
        "https://ohif.example.org/viewer",  # names no study
        "https://ohif.example.org/{patient_id}",
        "https://ohif.example.org/{study_uid.__class__}",
        "https://ohif.example.org/{study_uid!r}",
        "https://ohif.example.org/{study_uid:>99}",
        "https://ohif.example.org/{0}",
        "https://ohif.example.org/{study_uid",
    ],
)
def test_only_http_templates_with_known_placeholders_load(template: str) -> None:
    with pytest.raises(ValueError, match="viewer_url"):
        HttpSettings(viewer_url=template)


def test_values_are_percent_encoded() -> None:
    assert viewer_link(OHIF, UID, None) == OHIF.replace("{study_uid}", UID)
    hostile = 'A1&StudyInstanceUIDs=9.9/../#"><script>'
    link = viewer_link("https://pacs.example.org/view?acc={accession}&mode=ro", UID, hostile)
    assert link == (
        "https://pacs.example.org/view?acc=A1%26StudyInstanceUIDs%3D9.9%2F..%2F%23%22%3E%3Cscript%3E"
        "&mode=ro"
    )
    # a template by accession has no link for a study without one; no template, no link
    assert viewer_link("https://pacs.example.org/view?acc={accession}", UID, "") is None
    assert viewer_link("", UID, "A1") is None


def test_oidc_urls_must_be_https_off_loopback() -> None:
    base: dict[str, Any] = {
        "issuer": "https://idp.example.org/realms/h",
        "client_id": "radtriage",
        "client_secret": "s3cret-value",
        "redirect_url": "https://rt.example.org/oidc/callback",
        "role_map": {"r": "radiologist"},
    }
    with pytest.raises(ValueError, match="https"):
        OidcSettings.model_validate(base | {"issuer": "http://idp.example.org/realms/h"})
    with pytest.raises(ValueError, match="role_map"):
        OidcSettings.model_validate(base | {"role_map": {}})
    with pytest.raises(ValueError, match="openid"):
        OidcSettings.model_validate(base | {"scopes": ["profile"]})
    assert "s3cret-value" not in repr(OidcSettings.model_validate(base))


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index(f"sqlite:///{tmp_path / 'index.db'}")
    yield idx
    idx.close()


def test_worklist_and_study_serve_the_link(index: Index) -> None:
    add_study(index, UID, accession="ACC 7")
    token = add_users(index)["radiologist"]
    auth = {"Authorization": f"Bearer {token}"}
    template = "https://pacs.example.org/view?acc={accession}&uid={study_uid}"
    c = client(index, viewer_url=template)
    want = f"https://pacs.example.org/view?acc=ACC%207&uid={UID}"
    assert c.get("/api/worklist", headers=auth).json()["rows"][0]["viewer_url"] == want
    assert c.get(f"/api/studies/{UID}", headers=auth).json()["viewer_url"] == want
    plain = client(index)  # no template configured: no link
    assert plain.get("/api/worklist", headers=auth).json()["rows"][0]["viewer_url"] is None
    assert plain.get("/api/login/options").status_code == 404  # no single sign-on either
