"""Users, login sessions and API tokens, stored in the index (`workspace.tables`).

Passwords are hashed with argon2id (argon2-cffi, its default parameters; hashes are rehashed
on login when those change). Session ids and bearer tokens are 32 random bytes from `secrets`;
the database keeps only their sha256, so a copy of the index cannot be replayed as a login.
A plain sha256 is enough there: unlike passwords, those secrets carry 256 bits of entropy.

Sites: a user is granted one or several sites (``user_sites``). `Accounts` opened for a site
(the node's) finds, lists, manages and signs in only users granted it; a session or token of a
user not granted the site is no credential there.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, exists, select, true, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.errors import InputError
from workspace.roles import ROLES
from workspace.tables import ApiToken, User, UserSession, UserSite

TOKEN_PREFIX = "rt_"
SITE_ID = re.compile(r"[A-Za-z0-9._-]+")
_hasher = PasswordHasher()
# verifying against this keeps a login for an unknown user as slow as one for a known user
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class Principal:
    """Who makes a request: a user, by login session or bearer token."""

    name: str
    role: str
    via: str  # "session" | "token"
    csrf_secret: str | None = None  # sessions only


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Accounts:
    """User administration and credential checks over the index's engine."""

    def __init__(
        self,
        engine: Engine,
        session_ttl_s: float = 8 * 3600.0,
        token_ttl_s: float = 90 * 86400.0,
        site_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.session_ttl_s = session_ttl_s
        self.token_ttl_s = token_ttl_s
        #: the site these accounts serve: only users granted it are listed, managed or signed
        #: in, and their sessions and tokens act only here. None: every user (tools, tests).
        self.site_id = site_id

    def _granted(self, user_id: Any) -> Any:
        """WHERE clause: the user is granted this site (always true without a site)."""
        if self.site_id is None:
            return true()
        return exists().where(UserSite.user_fk == user_id, UserSite.site_id == self.site_id)

    def _user(self, s: Session, name: str) -> User | None:
        """The user called `name` if granted this site; None otherwise (an unknown name and a
        user of another site look the same)."""
        return s.scalar(select(User).where(User.name == name, self._granted(User.id)))

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # --- administration -------------------------------------------------------------------

    def add_user(self, name: str, role: str, password: str, sites: Sequence[str] = ()) -> None:
        """Add a user granted `sites` (default: this accounts' site; at least one)."""
        if not name or len(name) > 64 or not name.isprintable():
            raise InputError("user name must be 1-64 printable characters")
        if role not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if len(password) < 8:
            raise InputError("password must have at least 8 characters")
        grants = list(dict.fromkeys(sites)) or ([self.site_id] if self.site_id else [])
        for site in grants:
            if not site or len(site) > 64 or not SITE_ID.fullmatch(site):
                raise InputError("a site id is 1-64 letters, digits, '.', '_' or '-'")
        with self._session() as s, s.begin():
            if s.scalar(select(User.id).where(User.name == name)) is not None:
                raise InputError(f"user {name!r} exists already")
            user = User(
                name=name,
                role=role,
                password_hash=_hasher.hash(password),
                disabled=False,
                created_at=time.time(),
            )
            s.add(user)
            s.flush()
            s.add_all(UserSite(user_fk=user.id, site_id=site) for site in grants)

    def list_users(self) -> list[dict[str, object]]:
        """The users granted this site (every user without a site), with their sites."""
        with self._session() as s:
            users = s.scalars(select(User).where(self._granted(User.id)).order_by(User.name))
            out: list[dict[str, object]] = []
            for u in users:
                sites = sorted(s.scalars(select(UserSite.site_id).where(UserSite.user_fk == u.id)))
                if self.site_id is not None:
                    sites = [self.site_id]  # an admin never learns another site's name
                out.append(
                    {
                        "name": u.name,
                        "role": u.role,
                        "disabled": u.disabled,
                        "created_at": u.created_at,
                        "sites": sites,
                    }
                )
            return out

    def disable(self, name: str) -> None:
        """Disable a user: their sessions end and their tokens stop working at once."""
        with self._session() as s, s.begin():
            user = self._user(s, name)
            if user is None:
                raise InputError(f"no user {name!r}")
            user.disabled = True
            s.execute(delete(UserSession).where(UserSession.user_fk == user.id))
            s.execute(update(ApiToken).where(ApiToken.user_fk == user.id).values(revoked=True))

    def new_token(self, name: str) -> str:
        """A new bearer token for `name` (shown once; only its hash is kept). Rotation: the
        user's older tokens are revoked in the same transaction. Tokens expire `token_ttl_s`
        after they were issued."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._session() as s, s.begin():
            user = self._user(s, name)
            if user is None or user.disabled:
                raise InputError(f"no enabled user {name!r}")
            s.execute(update(ApiToken).where(ApiToken.user_fk == user.id).values(revoked=True))
            s.add(ApiToken(token_hash=_sha256(token), user_fk=user.id, created_at=time.time()))
        return token

    # --- credentials ----------------------------------------------------------------------

    def check_password(self, name: str, password: str) -> Principal | None:
        with self._session() as s, s.begin():
            user = self._user(s, name)
            try:
                _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
            except (VerificationError, InvalidHashError):
                return None
            if user is None or user.disabled:
                return None
            if _hasher.check_needs_rehash(user.password_hash):
                user.password_hash = _hasher.hash(password)
            return Principal(user.name, user.role, "password")

    def open_session(self, name: str, address: str) -> tuple[str, str]:
        """Start a session for `name`; returns (session id for the cookie, CSRF token)."""
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = time.time()
        with self._session() as s, s.begin():
            user_id = s.scalar(select(User.id).where(User.name == name, self._granted(User.id)))
            if user_id is None:
                raise InputError(f"no user {name!r}")
            s.execute(delete(UserSession).where(UserSession.expires_at < now))
            s.add(
                UserSession(
                    session_hash=_sha256(session_id),
                    user_fk=user_id,
                    csrf_secret=csrf,
                    created_at=now,
                    expires_at=now + self.session_ttl_s,
                    address=address[:64],
                )
            )
        return session_id, csrf

    def by_session(self, session_id: str) -> Principal | None:
        with self._session() as s:
            row = s.execute(
                select(User, UserSession)
                .join(UserSession, UserSession.user_fk == User.id)
                .where(UserSession.session_hash == _sha256(session_id), self._granted(User.id))
            ).first()
        if row is None:
            return None
        user, sess = row
        if user.disabled or sess.expires_at < time.time():
            return None
        return Principal(user.name, user.role, "session", sess.csrf_secret)

    def close_session(self, session_id: str) -> None:
        with self._session() as s, s.begin():
            s.execute(delete(UserSession).where(UserSession.session_hash == _sha256(session_id)))

    def by_token(self, token: str) -> Principal | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        with self._session() as s:
            row = s.execute(
                select(User, ApiToken)
                .join(ApiToken, ApiToken.user_fk == User.id)
                .where(ApiToken.token_hash == _sha256(token), self._granted(User.id))
            ).first()
        if row is None:
            return None
        user, tok = row
        if user.disabled or tok.revoked or tok.created_at + self.token_ttl_s < time.time():
            return None
        return Principal(user.name, user.role, "token")
