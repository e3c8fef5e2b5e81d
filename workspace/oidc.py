"""Single sign-on with OpenID Connect: the authorization code flow with PKCE (RFC 7636, S256).

``GET /oidc/login`` sends the browser to the provider's authorization endpoint with a fresh
``state``, ``nonce`` and PKCE challenge; the three secrets wait in a short-lived HttpOnly cookie
(SameSite=Lax, so that it comes back on the provider's top-level redirect; nothing is kept in
server memory, so any node behind a load balancer can finish the sign-in). ``GET
/oidc/callback`` checks ``state`` against that cookie, exchanges the code at the token endpoint
(``client_secret_basic``, or none for a public client) with the PKCE verifier, and validates
the ID token: signature with the provider's JWKS key (asymmetric algorithms only, never
``none`` or HMAC), ``iss``, ``aud`` (and ``azp``), ``exp``/``iat`` with the configured leeway,
and ``nonce``. The role claim is mapped to a radtriage role (`OidcSettings.role_map`); a user
the mapping does not admit is refused. Then the sign-in is the same server-side session as a
password sign-in (`workspace.accounts.Accounts.open_session`).

Users who signed in this way have a row in ``users`` whose password hash is a marker naming
the issuer, so no password ever opens it, a local account of the same name is never taken
over, and ``users disable`` still locks such a user out (their role follows the provider at
each sign-in). Sign-out ends the local session and then, from the browser, the provider's
(RP-initiated logout at its ``end_session_endpoint``).

JOSE: PyJWT with `cryptography` (maintained, small, no web-framework coupling; its
``PyJWKClient`` caches the provider's key set and refetches it once for an unknown ``kid``,
which follows key rotation). Every URL of ours comes from the settings, never the Host header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import jwt
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.errors import DestinationError, SignInError
from core.settings import OidcSettings
from workspace.accounts import Principal
from workspace.auth import SESSION_COOKIE, client_address
from workspace.tables import User, UserSite

PENDING_COOKIE = "radtriage_oidc"  # state, nonce and PKCE verifier between login and callback
HINT_COOKIE = "radtriage_sso"  # the ID token, as id_token_hint for the provider's sign-out
PENDING_TTL_S = 600
SSO_HASH_PREFIX = "sso:"  # users.password_hash of a single sign-on user: no password opens it
#: ID token signatures accepted (of those the provider announces): asymmetric only
ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
#: the landing and refusal pages: no script at all, our stylesheet, a link back
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the callback URL carries the code
    "Cache-Control": "no-store",
}
MAX_HINT_COOKIE = 3500  # bytes; a larger ID token is not kept (sign-out then names the client)
#: the callback's answer: a same-site navigation to the worklist, on which the SameSite=Strict
#: session cookie is sent (it is not on a redirect chain that began at the provider's site)
_LANDING = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8">'
    '<meta http-equiv="refresh" content="0;url=/worklist"><title>Signed in · radtriage</title>'
    '<link rel="stylesheet" href="/static/style.css"></head><body><main>'
    '<p>Signed in. <a href="/worklist">Continue to the worklist</a>.</p></main></body></html>'
)


@dataclass(frozen=True)
class ProviderMetadata:
    """What radtriage uses of the provider's discovery document."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None
    algorithms: tuple[str, ...]


@dataclass(frozen=True)
class PendingLogin:
    """The secrets of one sign-in in flight (the browser holds them, in `PENDING_COOKIE`)."""

    state: str
    nonce: str
    verifier: str
    created_at: float

    def to_cookie(self) -> str:
        raw = json.dumps([self.state, self.nonce, self.verifier, self.created_at])
        return base64.urlsafe_b64encode(raw.encode()).decode()

    @classmethod
    def from_cookie(cls, value: str | None) -> PendingLogin:
        try:
            state, nonce, verifier, created = json.loads(base64.urlsafe_b64decode(value or ""))
            pending = cls(str(state), str(nonce), str(verifier), float(created))
        except (ValueError, TypeError) as exc:
            raise SignInError("no sign-in in progress in this browser", http_status=400) from exc
        if time.time() - pending.created_at > PENDING_TTL_S:
            raise SignInError("the sign-in took too long; start again", http_status=400)
        return pending


@dataclass(frozen=True)
class SignedIn:
    """A validated sign-in: who, with which radtriage role, and the ID token (logout hint)."""

    name: str
    role: str
    id_token: str
    claims: dict[str, Any]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _is_https_or_loopback(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    loopback = parts.hostname in {"localhost", "127.0.0.1", "::1"}
    return parts.scheme == "https" or (parts.scheme == "http" and loopback)


def claim_path(claims: dict[str, Any], path: str) -> Any:
    """A claim by dotted path (``realm_access.roles``); None when any step is missing."""
    value: Any = claims
    for step in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(step)
    return value


def map_role(settings: OidcSettings, claims: dict[str, Any]) -> str | None:
    """The radtriage role of the first `role_map` entry the user holds; None if none."""
    held = claim_path(claims, settings.role_claim)
    values = {held} if isinstance(held, str) else {v for v in held or [] if isinstance(v, str)}
    for provider_role, role in settings.role_map.items():
        if provider_role in values:
            return role
    return None


class OidcClient:
    """The relying party: discovery (fetched at the first sign-in, then kept), the authorize
    URL, the code exchange and ID token validation."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._metadata: ProviderMetadata | None = None
        self._jwks: jwt.PyJWKClient | None = None

    # --- provider ---------------------------------------------------------------------

    def _fetch_json(self, request: urllib.request.Request | str) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as resp:
                body = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read(4096)).get("error", "")
            except ValueError:
                error = ""
            raise SignInError(
                f"the provider refused the request ({exc.code} {error})".strip()
            ) from None
        except (OSError, ValueError) as exc:
            raise DestinationError(f"OpenID provider unreachable or not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise DestinationError("OpenID provider answered something other than an object")
        return body

    def metadata(self) -> ProviderMetadata:
        with self._lock:
            if self._metadata is None:
                issuer = self.settings.issuer
                doc = self._fetch_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
                if doc.get("issuer") != issuer:  # OpenID Connect Discovery 1.0, section 4.3
                    raise DestinationError(
                        f"the discovery document names issuer {doc.get('issuer')!r}, not {issuer!r}"
                    )
                endpoints = {
                    k: doc.get(k) for k in ("authorization_endpoint", "token_endpoint", "jwks_uri")
                }
                end_session = doc.get("end_session_endpoint")
                for key, url in [*endpoints.items(), ("end_session_endpoint", end_session)]:
                    if url is None and key == "end_session_endpoint":
                        continue
                    if not isinstance(url, str) or not _is_https_or_loopback(url):
                        raise DestinationError(f"the provider's {key} is not an https URL")
                announced = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
                algorithms = tuple(a for a in ASYMMETRIC_ALGORITHMS if a in announced)
                if not algorithms:
                    raise DestinationError("the provider signs ID tokens with no asymmetric key")
                self._metadata = ProviderMetadata(
                    issuer=issuer,
                    end_session_endpoint=end_session,
                    algorithms=algorithms,
                    **endpoints,  # type: ignore[arg-type]  # checked to be str above
                )
                self._jwks = jwt.PyJWKClient(
                    self._metadata.jwks_uri, cache_keys=True, timeout=self.settings.timeout_s
                )
            return self._metadata

    # --- the flow ---------------------------------------------------------------------

    def begin(self) -> tuple[str, PendingLogin]:
        """The authorization URL to send the browser to, and the secrets it must bring back."""
        meta = self.metadata()
        pending = PendingLogin(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            verifier=secrets.token_urlsafe(64),  # 86 characters (RFC 7636: 43-128)
            created_at=time.time(),
        )
        challenge = _b64url(hashlib.sha256(pending.verifier.encode()).digest())
        query = urllib.parse.urlencode(
            {
                "response_type": "code",
                "client_id": self.settings.client_id,
                "redirect_uri": self.settings.redirect_url,
                "scope": " ".join(self.settings.scopes),
                "state": pending.state,
                "nonce": pending.nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        separator = "&" if "?" in meta.authorization_endpoint else "?"
        return meta.authorization_endpoint + separator + query, pending

    def exchange(self, code: str, pending: PendingLogin) -> str:
        """The ID token for an authorization code (token endpoint, with the PKCE verifier)."""
        meta = self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.settings.redirect_url,
            "code_verifier": pending.verifier,
        }
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        if self.settings.client_secret:  # client_secret_basic (RFC 6749 section 2.3.1)
            pair = ":".join(
                urllib.parse.quote(v, safe="")
                for v in (self.settings.client_id, self.settings.client_secret)
            )
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = self.settings.client_id
        request = urllib.request.Request(
            meta.token_endpoint,
            data=urllib.parse.urlencode(form).encode(),
            headers=headers,
            method="POST",
        )
        tokens = self._fetch_json(request)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise SignInError("the provider returned no ID token (is the openid scope granted?)")
        return id_token

    def validate(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims once its signature, iss, aud/azp, exp/iat and nonce hold."""
        meta = self.metadata()
        assert self._jwks is not None  # set with the metadata
        try:
            key = self._jwks.get_signing_key_from_jwt(id_token)
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key.key,
                algorithms=list(meta.algorithms),
                audience=self.settings.client_id,
                issuer=meta.issuer,
                leeway=self.settings.clock_skew_s,
                options={"require": ["iss", "sub", "aud", "exp", "iat"]},
            )
        except jwt.PyJWKClientConnectionError as exc:
            raise DestinationError(f"the provider's key set is unreachable: {exc}") from None
        except (jwt.PyJWTError, ValueError) as exc:
            raise SignInError(f"the ID token is not valid: {exc}") from None
        audience = claims["aud"]
        several = isinstance(audience, list) and len(audience) > 1
        if (several or "azp" in claims) and claims.get("azp") != self.settings.client_id:
            raise SignInError("the ID token was issued to another client (azp)")  # Core 3.1.3.7
        sent = claims.get("nonce")
        if not isinstance(sent, str) or not hmac.compare_digest(sent, nonce):
            raise SignInError("the ID token's nonce does not match this sign-in")
        return claims

    def finish(self, code: str, state: str, pending: PendingLogin) -> SignedIn:
        """Check the callback's state, exchange the code, validate, map the role."""
        if not state or not hmac.compare_digest(state.encode(), pending.state.encode()):
            raise SignInError("the sign-in's state does not match this browser's", http_status=400)
        id_token = self.exchange(code, pending)
        claims = self.validate(id_token, pending.nonce)
        name = claim_path(claims, self.settings.username_claim)
        if not isinstance(name, str) or not 0 < len(name) <= 64 or not name.isprintable():
            raise SignInError(
                f"the ID token has no usable {self.settings.username_claim} claim", http_status=403
            )
        role = map_role(self.settings, claims)
        if role is None:
            raise SignInError("this account holds no role that radtriage admits", http_status=403)
        return SignedIn(name, role, id_token, claims)

    def logout_url(self, id_token: str | None) -> str | None:
        """The provider's end-session URL (RP-initiated logout 1.0), if it has one."""
        meta = self.metadata()
        if meta.end_session_endpoint is None:
            return None
        after = self.settings.post_logout_redirect_url or (
            "{0.scheme}://{0.netloc}/login".format(
                urllib.parse.urlsplit(self.settings.redirect_url)
            )
        )
        params = {"client_id": self.settings.client_id, "post_logout_redirect_uri": after}
        if id_token:
            params["id_token_hint"] = id_token
        separator = "&" if "?" in meta.end_session_endpoint else "?"
        return meta.end_session_endpoint + separator + urllib.parse.urlencode(params)


def sign_in_user(
    engine: Engine, signed_in: SignedIn, issuer: str, site_id: str | None = None
) -> Principal:
    """The local user row of a single sign-on user: created at the first sign-in, its role
    following the provider's at each one. Refuses a name that belongs to a local (password)
    account or to another issuer, and a user an admin disabled. The node's provider vouches
    for its site: the user is granted `site_id` (the node's) at sign-in."""
    marker = SSO_HASH_PREFIX + issuer
    with Session(engine, expire_on_commit=False) as s, s.begin():
        user = s.scalar(select(User).where(User.name == signed_in.name))
        if user is None:
            user = User(
                name=signed_in.name,
                role=signed_in.role,
                password_hash=marker,
                disabled=False,
                created_at=time.time(),
            )
            s.add(user)
            s.flush()
        elif not hmac.compare_digest(user.password_hash.encode(), marker.encode()):
            raise SignInError(
                "a local account has this user name; ask an admin to rename one", http_status=403
            )
        elif user.disabled:
            raise SignInError("this user is disabled in radtriage", http_status=403)
        else:
            user.role = signed_in.role
        if site_id is not None and s.get(UserSite, (user.id, site_id)) is None:
            s.add(UserSite(user_fk=user.id, site_id=site_id))
    return Principal(signed_in.name, signed_in.role, "sso")


def _refusal(status: int, message: str) -> HTMLResponse:
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign-in refused · '
        'radtriage</title><link rel="stylesheet" href="/static/style.css"></head><body><main>'
        f'<h1>Sign-in refused</h1><p class="error">{html.escape(message)}</p>'
        '<p><a href="/login">Back to sign-in</a></p></main></body></html>'
    )
    return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)


def provider_logout_url(request: Request, response: Response) -> str | None:
    """For `POST /api/logout`: the provider's end-session URL when this browser signed in
    through it (forgets the ID token hint); None after a password sign-in."""
    client: OidcClient | None = getattr(request.app.state, "oidc", None)
    hint = request.cookies.get(HINT_COOKIE)
    if client is None or hint is None:
        return None
    response.delete_cookie(HINT_COOKIE, path="/api/logout")
    try:
        return client.logout_url(hint if hint != "-" else None)
    except (DestinationError, SignInError):
        return None  # the local session is over either way


def create_oidc_router(client: OidcClient, session_ttl_s: float) -> APIRouter:
    """``/oidc/login``, ``/oidc/callback`` and ``/api/login/options`` (the login page's button)."""
    router = APIRouter(include_in_schema=False)
    settings = client.settings
    secure = settings.redirect_url.startswith("https://")

    @router.get("/api/login/options")
    def options() -> dict[str, Any]:
        return {"oidc": {"name": settings.display_name, "url": "/oidc/login"}}

    @router.get("/oidc/login")
    def login() -> Response:
        try:
            url, pending = client.begin()
        except DestinationError as exc:
            return _refusal(502, f"the sign-in service is unavailable: {exc.message}")
        response = RedirectResponse(url, status_code=303)
        response.headers["Cache-Control"] = "no-store"
        response.set_cookie(
            PENDING_COOKIE,
            pending.to_cookie(),
            max_age=PENDING_TTL_S,
            httponly=True,
            samesite="lax",  # must come back on the provider's top-level redirect
            secure=secure,
            path="/oidc/callback",
        )
        return response

    @router.get("/oidc/callback")
    def callback(request: Request, code: str = "", state: str = "", error: str = "") -> Response:
        audit = request.app.state.audit
        address = client_address(request)
        try:
            pending = PendingLogin.from_cookie(request.cookies.get(PENDING_COOKIE))
            if error:  # e.g. access_denied: the user cancelled at the provider
                raise SignInError("the provider did not sign you in", http_status=403)
            signed_in = client.finish(code[:4096], state[:512], pending)
            accounts = request.app.state.accounts
            who = sign_in_user(accounts.engine, signed_in, settings.issuer, accounts.site_id)
        except (SignInError, DestinationError) as exc:
            audit.append(
                "login_failed", address=address, detail={"via": "oidc", "reason": exc.message}
            )
            response = _refusal(exc.http_status, exc.message)
            response.delete_cookie(PENDING_COOKIE, path="/oidc/callback")
            return response
        session_id, _ = request.app.state.accounts.open_session(who.name, address)
        audit.append(
            "login",
            user=who.name,
            role=who.role,
            address=address,
            detail={"via": "oidc", "issuer": settings.issuer, "sub": signed_in.claims.get("sub")},
        )
        response = HTMLResponse(_LANDING, headers=PAGE_HEADERS)
        response.delete_cookie(PENDING_COOKIE, path="/oidc/callback")
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            max_age=int(session_ttl_s),
            httponly=True,
            samesite="strict",
            secure=secure,
            path="/",
        )
        hint = signed_in.id_token if len(signed_in.id_token) <= MAX_HINT_COOKIE else "-"
        response.set_cookie(
            HINT_COOKIE,
            hint,
            max_age=int(session_ttl_s),
            httponly=True,
            samesite="strict",
            secure=secure,
            path="/api/logout",
        )
        return response

    return router


__all__ = [
    "OidcClient",
    "PendingLogin",
    "ProviderMetadata",
    "SignedIn",
    "create_oidc_router",
    "map_role",
    "provider_logout_url",
    "sign_in_user",
]
