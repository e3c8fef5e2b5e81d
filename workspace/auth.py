"""Authentication and role checks as FastAPI dependencies.

A request is made by a `Principal`, found by ``Authorization: Bearer <token>`` (integrators) or
by the server-side session whose id is in the ``radtriage_session`` cookie (HttpOnly,
SameSite=Strict, Secure over HTTPS). A state-changing request on a session must carry the
session's CSRF token in ``X-CSRF-Token`` (synchroniser token; bearer requests carry no ambient
credentials, so they need none). Without credentials the API answers 401 with no patient data
and pages redirect to ``/login``; a wrong role is 403.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import HTTPException, Request

from workspace.accounts import Accounts, Principal
from workspace.roles import CLINICAL, INTEGRATIONS, STAFF, UPLOADERS, Role

__all__ = ["CLINICAL", "INTEGRATIONS", "UPLOADERS"]

SESSION_COOKIE = "radtriage_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# the role names and sets, re-exported for the routes (defined once in `workspace.roles`)
RADIOLOGIST = Role.RADIOLOGIST.value
ADMIN = Role.ADMIN.value
ML_ENGINEER = Role.ML_ENGINEER.value
INTEGRATOR = Role.INTEGRATOR.value
ANY_ROLE = STAFF  # the web app's signed-in users (integrator tokens are not among them)


class LoginRequired(Exception):
    """A page was requested without a login: the app answers with a redirect to /login."""


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def find_principal(request: Request, accounts: Accounts) -> Principal | None:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return accounts.by_token(credentials.strip())
    session_id = request.cookies.get(SESSION_COOKIE)
    return accounts.by_session(session_id) if session_id else None


def require(*roles: str, page: bool = False) -> Callable[[Request], Principal]:
    """A dependency that returns the request's principal if it has one of `roles`."""
    allowed = frozenset(roles)

    def dependency(request: Request) -> Principal:
        principal = find_principal(request, request.app.state.accounts)
        if principal is None:
            if page:
                raise LoginRequired()
            raise HTTPException(
                401, "authentication required", headers={"WWW-Authenticate": "Bearer"}
            )
        if principal.role not in allowed:
            raise HTTPException(403, f"role {principal.role!r} may not do this")
        if request.method not in SAFE_METHODS and principal.via == "session":
            sent = request.headers.get(CSRF_HEADER, "")
            if not principal.csrf_secret or not hmac.compare_digest(
                sent.encode(), principal.csrf_secret.encode()
            ):
                raise HTTPException(403, "missing or wrong CSRF token")
        request.state.principal = principal
        return principal

    dependency.roles = allowed  # type: ignore[attr-defined]  # read by the role-matrix test
    return dependency
