"""HTTP API, radiologist workspace pages and operations endpoints (FastAPI).

Open: ``/healthz``, ``/readyz``, ``/metrics``, ``/login``, ``POST /api/login``, ``/static/*``,
and with single sign-on configured ``/oidc/login``, ``/oidc/callback``, ``/api/login/options``
(`workspace.oidc`).
Everything else is behind a login session or a bearer token and checked per role
(`workspace.auth`); the full list of JSON routes is FastAPI's OpenAPI schema (``/openapi.json``,
listed in docs/worklist.md). The role of each route is in `require(...)` on the route itself.

Study data comes from the index (`store.index.Index`), the worklist is one SQL query
(`workspace.worklist`), assessments and the audit chain live in the index too. Overrides never
rewrite result.json: they are assessments, and audit events.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from core.domain import ReferralUrgency, SeriesRole, StudyStatus
from core.priority import FDS_DAYS
from core.settings import HttpSettings, OidcSettings
from dicom_node.ingest import Ingest
from store.index import Index
from store.results import decision_rows, record_override
from workspace.accounts import Accounts, Principal
from workspace.assessments import Assessments, BiopsyBody, FindingBody, OverrideBody, PiradsBody
from workspace.audit import AuditTrail
from workspace.auth import (
    ADMIN,
    ANY_ROLE,
    CLINICAL,
    ML_ENGINEER,
    RADIOLOGIST,
    SESSION_COOKIE,
    LoginRequired,
    client_address,
    require,
)
from workspace.key_images import KeyImageCache, StudyImages, load_study_images
from workspace.limits import BodyLimit
from workspace.metrics import Metrics
from workspace.oidc import OidcClient, create_oidc_router, provider_logout_url
from workspace.throttle import LoginThrottle
from workspace.viewer import viewer_link
from workspace.worklist import (
    MAX_PAGE,
    SORT_KEYS,
    WorklistQuery,
    priority_display,
    query_worklist,
)

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).with_name("static")
STATIC_FILES = {
    "style.css": "text/css",
    "common.js": "text/javascript",
    "login.js": "text/javascript",
    "worklist.js": "text/javascript",
    "study.js": "text/javascript",
}
#: a 409 says what, never why in exception text (that goes to the log)
IMAGES_UNAVAILABLE = "images unavailable: the study's files cannot be read (see the server log)"
#: the STOW-RS route, whose body limit is ``[http] stow_max_bytes`` (it streams to disk)
STOW_PATH = "/dicomweb/studies"
#: pages load their scripts and styles from /static only; no inline script can run
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


# Who may call a route: a FastAPI dependency per role set (module level, so FastAPI can
# resolve the annotations).
Clinical = Annotated[Principal, Depends(require(*CLINICAL))]
ClinicalPage = Annotated[Principal, Depends(require(*CLINICAL, page=True))]
Radiologist = Annotated[Principal, Depends(require(RADIOLOGIST))]
Admin = Annotated[Principal, Depends(require(ADMIN))]
Anyone = Annotated[Principal, Depends(require(*ANY_ROLE))]
Operations = Annotated[Principal, Depends(require(ADMIN, ML_ENGINEER))]


@dataclass
class ApiContext:
    """What the HTTP layer reads; each piece is supplied by the composition root."""

    index: Index  # studies, users, sessions, audit, assessments
    metrics: Metrics
    models: Callable[[], dict[str, Any]] = dict
    # the one outbox's items in a state, every channel, file names only (no paths, no payloads)
    outbox: Callable[[str], list[dict[str, Any]]] = lambda state: []
    pending: Callable[[], list[dict[str, Any]]] = list  # `pending_row`s, any order
    ready: Callable[[], bool] = lambda: True
    node_id: str | None = None  # the worklist lists this node's studies (None: all)
    session_ttl_s: float = 8 * 3600.0
    fds_days: int = FDS_DAYS
    today: Callable[[], date] = date.today  # the site's date (`TriageSettings.current_date`)
    # decide a study again at once (a radiologist's override); None: the next tick does
    redecide: Callable[[str], object] | None = None
    key_images: KeyImageCache = field(default_factory=KeyImageCache)
    ingest: Ingest | None = None  # the node's C-STORE store path, for STOW-RS (None: off)
    oidc: OidcSettings | None = None  # single sign-on (`workspace.oidc`); None: local accounts
    viewer_url: str = ""  # the site's open-in-viewer template (`workspace.viewer`)
    audit: AuditTrail | None = None  # anchored and forwarded (composition root); None: plain
    http: HttpSettings = field(default_factory=HttpSettings)  # limits, STOW, public URL, tokens


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class WorklistPageModel(BaseModel):
    total: int
    offset: int
    limit: int
    fds_days: int
    counts: dict[str, int]
    rows: list[dict[str, Any]]


PENDING_STATUSES = (
    StudyStatus.RECEIVED,
    StudyStatus.COMPLETE,
    StudyStatus.ANALYSING,
    StudyStatus.FAILED,
)


def is_pending(row: dict[str, Any]) -> bool:
    """An index row of a study the AI has not reported on yet (not_applicable studies, which
    are not prostate MRI, never get a result and are left out)."""
    return not row.get("result") and row.get("status") in PENDING_STATUSES


def iso_utc(epoch: float | None) -> str | None:
    """An epoch time (index rows) as ISO 8601 UTC; None when unset."""
    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None


def pending_row(row: dict[str, Any]) -> dict[str, Any]:
    """What the worklist shows of a pending study: no patient identifiers."""
    error = row.get("error")
    return {
        "study_instance_uid": row["study_instance_uid"],
        "status": row["status"],
        "referral_urgency": row.get("referral_urgency") or ReferralUrgency.ROUTINE.value,
        "instances": row.get("instances"),
        "received_at": iso_utc(row.get("first_received_at")),
        "last_received_at": iso_utc(row.get("last_received_at")),
        "attempts": row.get("attempts") or 0,
        "retry_at": iso_utc(row.get("retry_at")),
        "error": error.get("message") if error else None,
        "error_code": error.get("code") if error else None,
    }


def pending_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Referrer's urgency first (the AI cannot lower it), then longest waiting."""

    def rank(row: dict[str, Any]) -> int:
        try:
            return ReferralUrgency(row["referral_urgency"]).rank
        except ValueError:
            return ReferralUrgency.ROUTINE.rank

    return sorted(rows, key=lambda r: (rank(r), r["received_at"] or ""))


def _document(row: dict[str, Any], kind: str) -> Path | None:
    """The SR or SEG the index says went to PACS (a path from the index, never the request)."""
    import pydicom

    want = {"sr": "SR", "seg": "SEG"}[kind]
    for doc in reversed(row.get("documents") or []):  # the newest: a superseding SR is last
        path = Path(doc)
        try:
            modality = str(pydicom.dcmread(path, stop_before_pixels=True).Modality)
        except Exception:
            continue
        if modality == want:
            return path
    return None


#: What a radiologist reads when a study's images cannot be shown (never exception text).
IMAGES_UNAVAILABLE = (
    "The images of this study cannot be shown here: its series could not be read from the "
    "node's store. Open the study in the PACS viewer; the AI result above is unchanged."
)
_STUDY_OUTBOX_KEYS = (
    "channel",
    "kind",
    "destination",
    "sop_class_uid",
    "state",
    "attempts",
    "sent_at",
)


def _study_view(row: dict[str, Any], viewer_url: str = "") -> dict[str, Any]:
    """`GET /api/studies/{uid}`: the index row without file paths, with the viewer link."""
    out = {k: v for k, v in row.items() if k not in ("documents", "outbox")}
    out["viewer_url"] = viewer_link(
        viewer_url, row["study_instance_uid"], row.get("accession_number")
    )
    docs = []
    for kind in ("sr", "seg"):
        if _document(row, kind) is not None:
            docs.append({"kind": kind, "url": f"/api/studies/{row['study_instance_uid']}/{kind}"})
    out["documents"] = docs
    out["outbox"] = [{k: o.get(k) for k in _STUDY_OUTBOX_KEYS} for o in row.get("outbox") or []]
    return out


_ABSOLUTE_PATH = re.compile(r"(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\":]+[/\\])+[^\s/\\'\":]*")


def outbox_view(row: dict[str, Any]) -> dict[str, Any]:
    """An outbox row for the API: no file path, and none inside its last error."""
    out = {k: v for k, v in row.items() if k != "path"}
    if isinstance(out.get("last_error"), str):
        out["last_error"] = _ABSOLUTE_PATH.sub("<path>", out["last_error"])
    return out


def _html(name: str) -> HTMLResponse:
    response = HTMLResponse((WEB_DIR / name).read_text(encoding="utf-8"))
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def create_app(ctx: ApiContext) -> FastAPI:
    # no anonymous API docs and no CDN: the schema is served behind login, the docs pages off
    app = FastAPI(
        title="radtriage", version="0.2.0", openapi_url=None, docs_url=None, redoc_url=None
    )
    app.state.ctx = ctx
    stow_bytes = ctx.http.stow_max_bytes if ctx.http.stow else ctx.http.max_body_bytes
    app.add_middleware(
        BodyLimit,
        default_bytes=ctx.http.max_body_bytes,
        per_path={STOW_PATH: stow_bytes},
    )
    engine = ctx.index.engine
    # sites: the app serves its index's site; users, sessions, tokens, studies (every
    # /api/studies/{uid} route goes through `study_row`) and audit are that site's
    site = ctx.index.site_id
    accounts = Accounts(engine, ctx.session_ttl_s, ctx.http.token_ttl_days * 86400.0, site)
    audit = ctx.audit if ctx.audit is not None else AuditTrail(engine, site_id=site)
    if audit.site_id != site:
        raise ValueError(f"the audit trail's site {audit.site_id!r} is not the app's {site!r}")
    assessments = Assessments(engine)
    app.state.accounts = accounts
    app.state.throttle = LoginThrottle()
    app.state.audit = audit

    if ctx.oidc is not None:  # single sign-on beside the local accounts
        app.state.oidc = OidcClient(ctx.oidc)
        app.include_router(create_oidc_router(app.state.oidc, ctx.session_ttl_s))

    @app.exception_handler(LoginRequired)
    def _to_login(request: Request, exc: LoginRequired) -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    def record(
        request: Request,
        who: Principal | None,
        action: str,
        uid: str | None = None,
        change: Callable[[Session], Any] | None = None,
        **detail: Any,
    ) -> dict[str, Any]:
        """Append an audit event; `change` (a state change) commits in the same transaction."""
        return audit.append(
            action,
            user=who.name if who else "",
            role=who.role if who else "",
            study_instance_uid=uid,
            address=client_address(request),
            detail=detail,
            change=change,
        )

    def study_row(uid: str) -> dict[str, Any]:
        """The study of this site, or 404 (another site's study is not revealed to exist)."""
        row = ctx.index.get_study(uid)
        if row is None:
            raise HTTPException(404, "no such study")
        return row  # type: ignore[no-any-return]

    # --- open -----------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = ctx.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(ctx.metrics.exposition(), media_type=ctx.metrics.content_type)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        if name not in STATIC_FILES:  # a fixed list: no path is built from the request
            raise HTTPException(404, "not found")
        return FileResponse(WEB_DIR / name, media_type=STATIC_FILES[name])

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page() -> HTMLResponse:
        return _html("login.html")

    @app.post("/api/login")
    def login(body: Login, request: Request, response: Response) -> dict[str, str]:
        """Start a session: sets the HttpOnly session cookie, returns the CSRF token. Failed
        sign-ins are throttled per client address with exponential backoff, and per user only
        across many addresses (`workspace.throttle`): 429 with Retry-After."""
        address, name = client_address(request), body.name[:64]
        throttle: LoginThrottle = app.state.throttle
        refusal = throttle.begin(address, name)
        if refusal is not None:
            raise HTTPException(
                429,
                f"{refusal.reason}; try again later",
                headers={"Retry-After": str(max(1, math.ceil(refusal.retry_after_s)))},
            )
        who = None
        try:
            with throttle.password_check():
                who = accounts.check_password(body.name, body.password)
        finally:
            failures = throttle.end(address, name, ok=who is not None)
        if who is None:
            if throttle.should_audit(failures):
                audit.append(
                    "login_failed", user=name, address=address, detail={"failures": failures}
                )
            raise HTTPException(401, "wrong user name or password, or the user is disabled")
        session_id, csrf = accounts.open_session(who.name, client_address(request))
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            max_age=int(ctx.session_ttl_s),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        record(request, who, "login")
        return {"name": who.name, "role": who.role, "csrf_token": csrf}

    # --- any signed-in user ---------------------------------------------------------------

    @app.get("/api/priorities")
    def priorities(who: Anyone) -> list[dict[str, Any]]:
        """The flags in worklist order with their labels: the pages never re-spell them."""
        return priority_display()

    @app.get("/api/studies/{study_instance_uid}/decisions")
    def decisions(study_instance_uid: str, who: Clinical, request: Request) -> list[dict]:
        """Every decision of the study's flag, oldest first: inputs, drivers, cause, who."""
        study_row(study_instance_uid)
        record(request, who, "view_decisions", study_instance_uid)
        with ctx.index.read() as s:
            return decision_rows(s, study_instance_uid)

    @app.get("/api/session")
    def session(who: Anyone) -> dict[str, Any]:
        """Who is signed in, and the CSRF token state-changing requests must send."""
        return {"name": who.name, "role": who.role, "csrf_token": who.csrf_secret}

    @app.post("/api/logout")
    def logout(who: Anyone, request: Request, response: Response) -> dict[str, str | None]:
        """End the session; after a single sign-on, `end_session_url` is where the browser
        goes next to end the provider's session too (RP-initiated logout)."""
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            accounts.close_session(session_id)
        response.delete_cookie(SESSION_COOKIE, path="/")
        record(request, who, "logout")
        return {"status": "signed out", "end_session_url": provider_logout_url(request, response)}

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(who: Anyone) -> JSONResponse:
        """The OpenAPI schema of every route (signed-in users only)."""
        return JSONResponse(app.openapi())

    @app.get("/api/models")
    def models(who: Anyone) -> dict[str, Any]:
        return ctx.models()

    @app.get("/api/studies/{study_instance_uid}/assessment")
    def assessment(study_instance_uid: str, who: Anyone, request: Request) -> dict[str, Any]:
        """The radiologist's read, findings decisions, PI-RADS and biopsy outcome."""
        study_row(study_instance_uid)
        record(request, who, "assessment", study_instance_uid)
        return assessments.get(study_instance_uid)

    # --- operations -----------------------------------------------------------------------

    @app.get("/api/outbox")
    def outbox(
        who: Operations, state: Literal["dead", "pending", "sent", "withdrawn"] = "dead"
    ) -> list[dict[str, Any]]:
        """Outbox items of every channel (DICOM, HL7, FHIR) in `state`, the dead letters by
        default, oldest first; a DICOM document by its file name only."""
        return [outbox_view(row) for row in ctx.outbox(state)]

    @app.get("/api/audit")
    def audit_log(
        who: Admin,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        study: str | None = None,
    ) -> dict[str, Any]:
        """Audit events, newest first, paginated (admins only)."""
        total, events = audit.events(offset, limit, study)
        return {"total": total, "offset": offset, "limit": limit, "events": events}

    # --- clinical reads -------------------------------------------------------------------

    @app.get("/api/worklist", response_model=WorklistPageModel)
    def worklist(
        who: Clinical,
        request: Request,
        priority: Annotated[list[str], Query()] = [],  # noqa: B006 - FastAPI query list
        status: Annotated[list[str], Query()] = [],  # noqa: B006
        date_from: Annotated[str | None, Query(pattern=r"^\d{8}$")] = None,
        date_to: Annotated[str | None, Query(pattern=r"^\d{8}$")] = None,
        q: Annotated[str | None, Query(max_length=128)] = None,
        sort: Annotated[str, Query(pattern="^(" + "|".join(SORT_KEYS) + ")$")] = "priority",
        order: Literal["asc", "desc"] = "asc",
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    ) -> dict[str, Any]:
        """Every study in the index, ordered and filtered in SQL, one page at a time."""
        query = WorklistQuery(
            priority=tuple(priority),
            status=tuple(status),
            study_date_from=date_from,
            study_date_to=date_to,
            text=q,
            sort=sort,  # type: ignore[arg-type]  # checked by the pattern above
            descending=order == "desc",
            offset=offset,
            limit=limit,
            node_id=ctx.node_id,
            site_id=ctx.index.site_id,
        )
        with ctx.index.read() as s:
            page = query_worklist(s, query, ctx.today())
        for row in page.rows:
            row["viewer_url"] = viewer_link(
                ctx.viewer_url, row["study_instance_uid"], row.get("accession_number")
            )
        record(request, who, "worklist", query=request.url.query[:1024])
        return {
            "total": page.total,
            "offset": page.offset,
            "limit": page.limit,
            "fds_days": ctx.fds_days,
            "counts": page.counts,
            "rows": page.rows,
        }

    @app.get("/api/worklist/pending")
    def pending(who: Clinical) -> list[dict[str, Any]]:
        """Studies received but not reported yet, by referral urgency then waiting time."""
        return pending_order(ctx.pending())

    @app.get("/api/studies/{study_instance_uid}")
    def study(study_instance_uid: str, who: Clinical, request: Request) -> dict[str, Any]:
        """One study: patient, result, series, documents sent to PACS (audited as a view)."""
        row = study_row(study_instance_uid)
        record(request, who, "view_study", study_instance_uid)
        return _study_view(row, ctx.viewer_url)

    def images_of(row: dict[str, Any]) -> tuple[str, Callable[[], StudyImages]]:
        uid = row["study_instance_uid"]
        key = f"{uid}@{row.get('reported_at')}"

        def load() -> StudyImages:
            seg = _document(row, "seg")
            return load_study_images(ctx.index.instance_paths(uid), seg)

        return key, load

    @app.get("/api/studies/{study_instance_uid}/images")
    def images(study_instance_uid: str, who: Clinical, request: Request) -> dict[str, Any]:
        """Slice count, the key slice of each AI lesion and the default slice (audited: the
        slices themselves, fetched one by one after it, are not each an event)."""
        row = study_row(study_instance_uid)
        record(request, who, "images", study_instance_uid)
        key, load = images_of(row)
        try:
            imgs = ctx.key_images.study(key, load)
        except Exception as exc:  # a study that cannot be read still has a page
            log.warning("images of %s unavailable", study_instance_uid, exc_info=True)
            raise HTTPException(409, IMAGES_UNAVAILABLE) from exc
        return {
            "slices": imgs.slices,
            "roles": [r.value for r in (SeriesRole.T2W, SeriesRole.ADC, SeriesRole.HBV)],
            "key_slices": imgs.key_slices(),
            "default_slice": imgs.default_slice(),
            "has_gland": imgs.gland is not None,
        }

    @app.get(
        "/api/studies/{study_instance_uid}/images/{role}/{z}.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def image(
        study_instance_uid: str,
        role: Literal["t2w", "adc", "hbv"],
        z: int,
        who: Clinical,
        lesion: Annotated[int | None, Query(ge=0, le=999)] = None,
    ) -> Response:
        """One slice as PNG with the gland contour and lesion outlines."""
        row = study_row(study_instance_uid)
        key, load = images_of(row)
        try:
            data = ctx.key_images.png(key, load, SeriesRole(role), z, lesion)
        except IndexError as exc:
            raise HTTPException(404, "no such slice or lesion") from exc
        except Exception as exc:
            log.warning("images of %s unavailable", study_instance_uid, exc_info=True)
            raise HTTPException(409, IMAGES_UNAVAILABLE) from exc
        return Response(data, media_type="image/png", headers={"Cache-Control": "private"})

    def document(request: Request, who: Principal, uid: str, kind: str) -> FileResponse:
        path = _document(study_row(uid), kind)
        if path is None:
            raise HTTPException(404, f"no {kind.upper()} for this study")
        record(request, who, kind, uid)
        return FileResponse(path, media_type="application/dicom", filename=f"{kind}.dcm")

    @app.get("/api/studies/{study_instance_uid}/sr", response_class=FileResponse)
    def sr(study_instance_uid: str, who: Clinical, request: Request) -> FileResponse:
        """The SR as it went to PACS (application/dicom)."""
        return document(request, who, study_instance_uid, "sr")

    @app.get("/api/studies/{study_instance_uid}/seg", response_class=FileResponse)
    def seg(study_instance_uid: str, who: Clinical, request: Request) -> FileResponse:
        """The SEG as it went to PACS (application/dicom)."""
        return document(request, who, study_instance_uid, "seg")

    # --- the radiologist's read (state-changing: CSRF-checked on sessions) -------------------

    def act(
        request: Request,
        who: Principal,
        uid: str,
        action: str,
        change: Callable[[Session], Any],
        **detail: Any,
    ) -> dict:
        """The change and its audit event, in one transaction: neither without the other."""
        event = record(request, who, action, uid, change, **detail)
        return {"assessment": assessments.get(uid), "audit_id": event["id"]}

    @app.post("/api/studies/{study_instance_uid}/acknowledge")
    def acknowledge(study_instance_uid: str, who: Radiologist, request: Request) -> dict:
        study_row(study_instance_uid)
        return act(
            request,
            who,
            study_instance_uid,
            "acknowledge",
            lambda s: assessments.acknowledge(study_instance_uid, who.name, s),
        )

    @app.post("/api/studies/{study_instance_uid}/reported")
    def reported(study_instance_uid: str, who: Radiologist, request: Request) -> dict:
        study_row(study_instance_uid)
        return act(
            request,
            who,
            study_instance_uid,
            "reported",
            lambda s: assessments.reported(study_instance_uid, who.name, s),
        )

    @app.post("/api/studies/{study_instance_uid}/override")
    def override(
        study_instance_uid: str, body: OverrideBody, who: Radiologist, request: Request
    ) -> dict:
        """Override the priority; the reason is required and audited. The override is a
        decision: the waiting list sends it to PACS (a verified SR), the RIS and FHIR."""
        row = study_row(study_instance_uid)

        def _override(s: Session) -> None:
            assessments.override(study_instance_uid, who.name, body, s)
            override = {"priority": body.priority.value, "by": who.name, "reason": body.reason}
            record_override(s, study_instance_uid, override, time.time())

        out = act(
            request,
            who,
            study_instance_uid,
            "override",
            lambda s: _override(s),
            priority=body.priority.value,
            ai_priority=row.get("priority"),
            reason=body.reason,
        )
        if ctx.redecide is not None:  # the decision, its SR, ORU and FHIR result, at once
            ctx.redecide(study_instance_uid)
        return out

    @app.post("/api/studies/{study_instance_uid}/findings/{finding_index}")
    def finding(
        study_instance_uid: str,
        finding_index: int,
        body: FindingBody,
        who: Radiologist,
        request: Request,
    ) -> dict:
        """Accept, reject or edit one AI finding (0-based, result.json lesion order)."""
        row = study_row(study_instance_uid)
        lesions = (row.get("result") or {}).get("lesions") or []
        if not 0 <= finding_index < len(lesions):
            raise HTTPException(404, f"the AI reported {len(lesions)} findings")
        return act(
            request,
            who,
            study_instance_uid,
            "finding",
            lambda s: assessments.finding(study_instance_uid, finding_index, who.name, body, s),
            finding_index=finding_index,
            **body.model_dump(exclude_none=True),
        )

    @app.post("/api/studies/{study_instance_uid}/pirads")
    def pirads(
        study_instance_uid: str, body: PiradsBody, who: Radiologist, request: Request
    ) -> dict:
        """The radiologist's overall PI-RADS v2.1 category."""
        study_row(study_instance_uid)
        return act(
            request,
            who,
            study_instance_uid,
            "pirads",
            lambda s: assessments.pirads(study_instance_uid, who.name, body, s),
            pirads=body.pirads,
        )

    @app.post("/api/studies/{study_instance_uid}/biopsy")
    def biopsy(
        study_instance_uid: str, body: BiopsyBody, who: Radiologist, request: Request
    ) -> dict:
        """The biopsy outcome: ISUP grade group (0 = benign) and date."""
        study_row(study_instance_uid)
        return act(
            request,
            who,
            study_instance_uid,
            "biopsy",
            lambda s: assessments.biopsy(study_instance_uid, body, s),
            **body.model_dump(),
        )

    # --- pages ----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/worklist", status_code=303)

    @app.get("/worklist", response_class=HTMLResponse, include_in_schema=False)
    def worklist_page(who: ClinicalPage) -> HTMLResponse:
        return _html("worklist.html")

    @app.get("/studies/{study_instance_uid}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(study_instance_uid: str, who: ClinicalPage, request: Request) -> HTMLResponse:
        study_row(study_instance_uid)
        record(request, who, "view_study_page", study_instance_uid)
        return _html("study.html")

    app.state.started = time.time()
    return app
