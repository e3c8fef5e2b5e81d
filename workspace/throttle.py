"""Sign-in throttling: per client address with exponential backoff, per user only across many
addresses, counted safely under concurrency, with a bounded number of password checks at once.

- **Per address.** The first `free_failures` failed sign-ins from an address within `window_s`
  cost nothing; after that each attempt must wait ``base_delay_s * 2**(extra failures)``
  (capped at `max_delay_s`) since the last failure, else 429 with ``Retry-After``. Attempts in
  flight count as failures until they end, so 40 concurrent guesses cannot pass a limit of 5.
  A success clears the address. Failures from one address never refuse another address: a
  guessing attacker cannot keep a radiologist from signing in elsewhere.
- **Per user, only across many addresses.** When one user name collects `user_failures`
  failures from at least `user_addresses` distinct addresses within the window (a distributed
  guess), sign-ins for that name are refused for `user_lock_s` and an alert is logged once
  (event ``login_user_locked``).
- **Bounded cost.** At most `max_concurrent_checks` argon2 checks run at once (each uses
  64 MiB); unknown names are checked against one precomputed dummy hash (`workspace.accounts`).
- **No audit flood.** `should_audit` says whether a failure is worth an audit row: the first
  `free_failures` per address and window, then only the 2nd, 4th, 8th... (the row carries the
  count).

State is in this process's memory (one HTTP process per node), pruned as it ages and capped in
size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class _Address:
    failures: int = 0
    in_flight: int = 0
    last_failure: float = 0.0
    first_failure: float = 0.0


@dataclass
class _User:
    failures: list[tuple[float, str]] = field(default_factory=list)  # (time, address)
    locked_until: float = 0.0


@dataclass(frozen=True)
class Refusal:
    """Why a sign-in is refused now, and after how many seconds to try again."""

    reason: str
    retry_after_s: float


class LoginThrottle:
    """Thread-safe sign-in throttle (see the module docstring)."""

    def __init__(
        self,
        *,
        free_failures: int = 5,
        base_delay_s: float = 1.0,
        max_delay_s: float = 900.0,
        window_s: float = 900.0,
        user_failures: int = 50,
        user_addresses: int = 5,
        user_lock_s: float = 900.0,
        max_concurrent_checks: int = 4,
        max_tracked: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free_failures = free_failures
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.window_s = window_s
        self.user_failures = user_failures
        self.user_addresses = user_addresses
        self.user_lock_s = user_lock_s
        self.max_tracked = max_tracked
        self.clock = clock
        self._lock = threading.Lock()
        self._addresses: dict[str, _Address] = {}
        self._users: dict[str, _User] = {}
        self._checks = threading.BoundedSemaphore(max_concurrent_checks)

    def _delay(self, entry: _Address) -> float:
        extra = entry.failures + entry.in_flight - self.free_failures
        if extra < 0:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * 2.0 ** min(extra, 30))

    def _prune(self, now: float) -> None:
        if len(self._addresses) + len(self._users) < self.max_tracked:
            return
        old = now - self.window_s
        self._addresses = {
            a: e for a, e in self._addresses.items() if e.in_flight or e.last_failure >= old
        }
        self._users = {
            u: e
            for u, e in self._users.items()
            if e.locked_until > now or any(t >= old for t, _ in e.failures)
        }
        if len(self._addresses) + len(self._users) >= self.max_tracked:  # a flood: forget
            self._addresses = {a: e for a, e in self._addresses.items() if e.in_flight}
            self._users = {u: e for u, e in self._users.items() if e.locked_until > now}

    def begin(self, address: str, user: str) -> Refusal | None:
        """Reserve a sign-in attempt, or say why not. Call `end` after an attempt began."""
        now = self.clock()
        with self._lock:
            self._prune(now)
            entry = self._addresses.get(address)
            if entry is not None and entry.last_failure < now - self.window_s:
                entry.failures = 0  # the window passed
            if entry is not None and entry.failures + entry.in_flight >= self.free_failures:
                if entry.in_flight:
                    return Refusal("another sign-in from this address is in progress", 1.0)
                wait = entry.last_failure + self._delay(entry) - now
                if wait > 0:
                    return Refusal("too many failed sign-ins from this address", wait)
            user_entry = self._users.get(user)
            if user_entry is not None and user_entry.locked_until > now:
                return Refusal(
                    "too many failed sign-ins for this user from many addresses",
                    user_entry.locked_until - now,
                )
            entry = self._addresses.setdefault(address, _Address())
            entry.in_flight += 1
            return None

    def end(self, address: str, user: str, ok: bool) -> int:
        """Record the outcome of a begun attempt; returns the address's failure count."""
        now = self.clock()
        with self._lock:
            entry = self._addresses.setdefault(address, _Address())
            entry.in_flight = max(0, entry.in_flight - 1)
            if ok:
                del self._addresses[address]
                return 0
            if not entry.failures:
                entry.first_failure = now
            entry.failures += 1
            entry.last_failure = now
            self._user_failure(user, address, now)
            return entry.failures

    def _user_failure(self, user: str, address: str, now: float) -> None:
        entry = self._users.setdefault(user, _User())
        old = now - self.window_s
        entry.failures = [(t, a) for t, a in entry.failures if t >= old][-self.user_failures :]
        entry.failures.append((now, address))
        addresses = {a for _, a in entry.failures}
        if (
            len(entry.failures) >= self.user_failures
            and len(addresses) >= self.user_addresses
            and entry.locked_until <= now
        ):
            entry.locked_until = now + self.user_lock_s
            log.warning(
                "ALERT login_user_locked: %d failed sign-ins for user %r from %d addresses in "
                "%.0f s; sign-ins for this user refused for %.0f s",
                len(entry.failures),
                user[:64],
                len(addresses),
                self.window_s,
                self.user_lock_s,
                extra={"event": "login_user_locked", "user": user[:64]},
            )

    def should_audit(self, failures: int) -> bool:
        """Whether the `failures`-th failure from an address gets its own audit row."""
        return failures <= self.free_failures or failures & (failures - 1) == 0

    @contextmanager
    def password_check(self) -> Iterator[None]:
        """Hold one of the bounded password-check slots (argon2 costs 64 MiB each)."""
        with self._checks:
            yield
