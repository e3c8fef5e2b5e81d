"""ATNA out: every audit event, as a DICOM audit message (`workspace.atna`), to a syslog
receiver (the hospital's audit record repository), with nothing lost when the receiver is down.

- Framing: RFC 5424 messages (facility authpriv, MSGID ``IHE+RFC-3881``, the XML as MSG after a
  UTF-8 BOM); over TCP and TLS with RFC 5425 / RFC 6587 octet counting (``LEN SP MSG``), over UDP
  one message per datagram (RFC 5426). Each message carries the event's id, chain hash and MAC
  as structured data (``[radtriage@32473 event= hash= mac=]``; 32473 is RFC 5612's example
  enterprise number), so the syslog stream is a second copy of the audit chain's head.
- Queue: the audit table itself. ``audit_forwarding`` keeps, per destination, the id of the last
  event the receiver has; events after it are unsent. A sender thread sends them in order,
  retries with exponential backoff while the receiver is away, and drains the backlog when it
  returns. TCP and TLS give no receipt, so an event counts as delivered only once its connection
  has stayed up for `settle_s` after it was sent; events on a connection found closed before
  then are sent again (at least once: a receiver may see an event twice, with the same
  ``event`` id). UDP has no way to know: an event counts as sent when the datagram left.
- Several nodes on one index: one sender at a time holds a destination (a lease in its
  ``audit_forwarding`` row, renewed while it runs); the others wait and take over when it
  stops or its lease lapses.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, update
from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session

from workspace.atna import SUCCESS, AuditSource, audit_message, event_kind
from workspace.audit import AuditTrail
from workspace.tables import AuditEvent, AuditForwarding

log = logging.getLogger(__name__)

FACILITY_AUTHPRIV = 10
SEVERITY_WARNING, SEVERITY_NOTICE = 4, 5
MSGID = "IHE+RFC-3881"
SD_ID = "radtriage@32473"
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class SyslogTarget:
    """A parsed ``[audit] syslog`` URL."""

    transport: str  # tcp | tls | udp
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> SyslogTarget:
        scheme, sep, rest = url.partition("://")
        host, _, port = rest.rpartition(":")
        if not sep or scheme not in ("tcp", "tls", "udp") or not host or not port.isdigit():
            raise ValueError(f"not a syslog URL (tcp|tls|udp://host:port): {url!r}")
        return cls(scheme, host, int(port))

    @property
    def url(self) -> str:
        return f"{self.transport}://{self.host}:{self.port}"


def _sd_value(text: str) -> str:
    """An RFC 5424 PARAM-VALUE: escape ``"``, ``\\`` and ``]``."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(event: dict[str, Any], xml: bytes, hostname: str, app_name: str) -> bytes:
    """One RFC 5424 message for an audit event."""
    failed = event_kind(event).outcome != SUCCESS
    pri = FACILITY_AUTHPRIV * 8 + (SEVERITY_WARNING if failed else SEVERITY_NOTICE)
    stamp = datetime.fromtimestamp(float(event["at"]), UTC).isoformat(timespec="microseconds")
    stamp = stamp.replace("+00:00", "Z")
    sd = (
        f'[{SD_ID} event="{int(event["id"])}" hash="{_sd_value(event["hash"])}" '
        f'mac="{_sd_value(event.get("mac") or "")}"]'
    )
    header = f"<{pri}>1 {stamp} {hostname[:255] or '-'} {app_name[:48]} - {MSGID} {sd} "
    return header.encode("ascii", "replace") + BOM + xml


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 / RFC 6587 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


def tls_context(
    cafile: Path | None, certfile: Path | None, keyfile: Path | None, check_hostname: bool
) -> ssl.SSLContext:
    """Client context for RFC 5425: TLS 1.2+, the receiver verified against `cafile` (the
    system store when None), our certificate when the receiver asks for one."""
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if certfile is not None:
        context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
    return context


class SyslogConnection:
    """One transport to the receiver; `send` raises OSError when the receiver is away."""

    def __init__(
        self, target: SyslogTarget, tls: ssl.SSLContext | None, timeout_s: float = 10.0
    ) -> None:
        self.target = target
        self.tls = tls
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self.opened_at = 0.0

    def _open(self) -> socket.socket:
        t = self.target
        if t.transport == "udp":
            family = socket.getaddrinfo(t.host, t.port, type=socket.SOCK_DGRAM)[0][0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect((t.host, t.port))
            return sock
        sock = socket.create_connection((t.host, t.port), timeout=self.timeout_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if t.transport == "tls":
            if self.tls is None:
                raise OSError("tls:// needs a TLS context")
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=t.host)
            except Exception:
                sock.close()
                raise
        return sock

    def alive(self) -> bool:
        """False when the receiver has closed the stream (TCP/TLS); True for UDP."""
        sock = self._sock
        if sock is None:
            return False
        if self.target.transport == "udp":
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return True
            if isinstance(sock, ssl.SSLSocket):
                # a TLS 1.3 session ticket also makes the socket readable: read without
                # blocking; syslog receivers send no data, so data or EOF means closing
                sock.setblocking(False)
                try:
                    return bool(sock.recv(1))
                except ssl.SSLWantReadError:
                    return True
                finally:
                    sock.settimeout(self.timeout_s)
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return True
        except (OSError, ssl.SSLError):
            return False

    def send(self, message: bytes) -> None:
        if self._sock is None:
            self._sock = self._open()
            self.opened_at = time.monotonic()
        if self.target.transport == "udp":
            self._sock.send(message)
        else:
            self._sock.sendall(octet_counted(message))

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class AuditForwarder:
    """The sender thread: audit events after the destination's cursor, to syslog, in order."""

    def __init__(
        self,
        trail: AuditTrail,
        target: SyslogTarget,
        source: AuditSource,
        *,
        tls: ssl.SSLContext | None = None,
        patient_of: Callable[[str], str | None] = lambda uid: None,
        app_name: str = "radtriage",
        batch: int = 100,
        settle_s: float = 2.0,
        poll_s: float = 1.0,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        lease_s: float = 15.0,
    ) -> None:
        self.trail = trail
        self.target = target
        self.source = source
        self.patient_of = patient_of
        self.app_name = app_name
        self.batch = batch
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.connection = SyslogConnection(target, tls)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder = f"{socket.gethostname()[:64]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease_s = lease_s
        self.sent = 0  # messages written to the transport (resends included)
        self.failures = 0  # connection or send failures

    # --- the durable cursor ----------------------------------------------------------------

    def cursor(self) -> int:
        """The id of the last event the destination has; created at the chain's head on the
        first start (a new destination receives events from then on)."""
        key = self.target.url
        with Session(self.trail.engine) as s, s.begin():
            row = s.get(AuditForwarding, key)
            if row is None:
                head = s.scalar(sql_select(func.max(AuditEvent.id))) or 0
                row = AuditForwarding(destination=key, last_event_id=head, updated_at=time.time())
                s.add(row)
            return int(row.last_event_id)

    def _confirm(self, event_id: int) -> None:
        with Session(self.trail.engine) as s, s.begin():
            s.execute(
                update(AuditForwarding)
                .where(
                    AuditForwarding.destination == self.target.url,
                    AuditForwarding.last_event_id < event_id,
                    AuditForwarding.holder == self.holder,
                )
                .values(last_event_id=event_id, updated_at=time.time())
            )

    def _lease(self, release: bool = False) -> bool:
        """Take or renew the destination for this sender (one sender per destination among
        the nodes sharing the index); True while this sender holds it."""
        now = time.time()
        with Session(self.trail.engine) as s, s.begin():
            result = s.execute(
                update(AuditForwarding)
                .where(
                    AuditForwarding.destination == self.target.url,
                    or_(
                        AuditForwarding.holder == self.holder,
                        AuditForwarding.lease_until < now,
                    ),
                )
                .values(holder=self.holder, lease_until=0.0 if release else now + self.lease_s)
            )
            return bool(getattr(result, "rowcount", 0))

    # --- the thread ------------------------------------------------------------------------

    def start(self) -> None:
        self.cursor()
        self.trail.listeners.append(self._on_event)
        self._thread = threading.Thread(target=self._run, name="radtriage-atna", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send what can be sent within `timeout_s`, then stop (the rest stays queued)."""
        if self._on_event in self.trail.listeners:
            self.trail.listeners.remove(self._on_event)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.connection.close()
        try:
            self._lease(release=True)  # the next sender need not wait for the lease to lapse
        except Exception:
            log.exception("could not release the ATNA destination lease")

    def _on_event(self, event: dict[str, Any]) -> None:
        self._wake.set()

    def _message(self, event: dict[str, Any]) -> bytes:
        uid = event.get("study_instance_uid")
        try:
            patient = self.patient_of(uid) if uid else None
        except Exception:  # the message goes without the patient rather than not at all
            log.exception("patient lookup for the audit message failed")
            patient = None
        try:
            xml = audit_message(event, self.source, patient)
        except Exception:  # never let one event block the queue: send its bare record
            log.exception(
                "audit message for event %s failed; sending it without details", event["id"]
            )
            xml = audit_message({**event, "detail": {}, "study_instance_uid": None}, self.source)
        return syslog_message(event, xml, self.source.host, self.app_name)

    def _run(self) -> None:
        position: int | None = None  # last event written to the transport; None: not holder
        unconfirmed: list[tuple[int, float]] = []  # (event id, sent at) on this connection
        backoff = self.initial_backoff_s
        stopping_deadline: float | None = None
        renewed = 0.0
        while True:
            if self._stop.is_set():
                stopping_deadline = stopping_deadline or time.monotonic() + self.settle_s
            try:
                if time.monotonic() - renewed > self.lease_s / 3:
                    if not self._lease():  # another node sends to this destination
                        position, unconfirmed = None, []
                        self.connection.close()
                        if self._stop.wait(self.lease_s / 3):
                            return
                        continue
                    renewed = time.monotonic()
                if position is None:
                    position = self.cursor()
                if unconfirmed and not self.connection.alive():
                    raise ConnectionError("the receiver closed the connection")
                now = time.monotonic()
                settled = [e for e, at in unconfirmed if now - at >= self.settle_s]
                if self.target.transport == "udp":
                    settled = [e for e, _ in unconfirmed]
                if settled:
                    self._confirm(max(settled))
                    unconfirmed = [(e, at) for e, at in unconfirmed if e > max(settled)]
                events = self.trail.after(position, self.batch)
                for event in events:
                    self.connection.send(self._message(event))
                    self.sent += 1
                    position = int(event["id"])
                    unconfirmed.append((position, time.monotonic()))
                backoff = self.initial_backoff_s
                if stopping_deadline is not None and (
                    (not events and not unconfirmed) or time.monotonic() >= stopping_deadline
                ):
                    if unconfirmed and self.connection.alive():
                        self._confirm(unconfirmed[-1][0])  # stopping: the stream is still up
                    return
                if not events:
                    wait = self.settle_s / 2 if unconfirmed else self.poll_s
                    self._wake.wait(wait)
                    self._wake.clear()
            except (OSError, ConnectionError, ssl.SSLError) as exc:
                self.failures += 1
                self.connection.close()
                # rewind to the last confirmed event: what went out on the broken
                # connection is sent again
                position = self.cursor()
                unconfirmed = []
                renewed = 0.0
                if self.failures == 1 or self.failures % 20 == 0:
                    log.warning(
                        "ATNA syslog receiver %s unavailable (%s); retrying, events are kept",
                        self.target.url,
                        exc,
                    )
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)
            except Exception:
                log.exception("ATNA sender error; retrying")
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)

    def backlog(self) -> int:
        """Events not yet confirmed delivered."""
        last = self.cursor()
        with Session(self.trail.engine) as s:
            return int(s.scalar(sql_select(func.count()).where(AuditEvent.id > last)) or 0)
