"""HL7 v2 orders in: an MLLP listener for ORM^O01 and OMI^O23 (v2.3 to v2.5.1).

Libraries: ``hl7apy`` parses and validates each message against the v2.x message structures
(segment grammar and groups per version) and builds the ACK; ``python-hl7``'s asyncio MLLP
streams (``hl7.mllp``) frame the bytes, over connections that stay open for many messages.

Each message is answered on its connection with an ACK (original acknowledgement mode):

- ``AA`` every order in the message was applied (one database transaction);
- ``AE`` the message is well formed but its content cannot be applied (a required field
  missing, a bad value, a change or cancel of an unknown order): nothing is applied;
- ``AR`` the message is refused as a whole (not parseable HL7, a message type, version or
  processing ID we do not accept): nothing is applied.

An ``ERR`` segment says what was wrong (v2.5+: ERR-2 location, ERR-3 HL7 table 0357 code, ERR-4
severity, ERR-8 text; v2.3/2.4: ERR-1). Refused messages are logged with their control ID and
the reason, never their content (patient data). Peers outside ``[hl7] allowed_hosts``
(loopback by default) are disconnected before anything is read.

Fields read, per order group (docs/integration.md has the full profile): ORC-1 control
(NW/XO/CA), ORC-2 (else OBR-2) placer order number, ORC-3 filler order number, ORC-7.6 / TQ1-9 /
OBR-27.6 priority (S, A, R), ORC-15 (else ORC-9, else MSH-7 on a new order) request date,
IPC-1 (else OBR-18) Accession Number, IPC-3 Study Instance UID, PID-3 Patient ID and its
assigning authority (issuer), OBR-13 clinical details, OBR-31 reason for study (code 2WW, USC or
SCP: suspected-cancer pathway), OBX with OBX-3 LOINC 2857-1 and OBX-6 ng/mL (or ug/L): PSA.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from hl7.mllp import InvalidBlockError
from hl7.mllp.streams import MLLPStreamReader, MLLPStreamWriter
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from sqlalchemy.orm import Session

from core.domain import ReferralUrgency
from core.peers import describe_allowlist, peer_allowed
from core.settings import Hl7Settings
from core.tls import server_ssl_context
from imaging.request_attributes import parse_da
from ris.hl7 import (
    _ERROR_NAMES,
    SUPPORTED_VERSIONS,
    Hl7Error,
    _repetitions,
    _segments,
    escape,
    field_component,
    read_header,
    unescape,
)
from ris.orders import (
    PSA_LOINC,
    PSA_UNITS,
    SUSPECTED_CANCER_CODES,
    FieldTooLong,
    OrderControl,
    OrderError,
    OrderUpdate,
    apply_order,
)
from store.index import Index

log = logging.getLogger(__name__)

SUPPORTED_MESSAGES = {("ORM", "O01"), ("OMI", "O23")}
MAX_MESSAGE_BYTES = 1_000_000


# --- reading fields ------------------------------------------------------------------------


def _date(text: str, segment: str, field: int) -> date | None:
    if not text:
        return None
    value = parse_da(text)
    if value is None:
        raise Hl7Error(
            "AE", 102, f"{segment}-{field} is not a date ({text[:20]!r})", segment, field
        )
    return value


@dataclass(frozen=True)
class OrderMessage:
    """A parsed, validated order message: its header and one update per order group."""

    control_id: str
    version: str
    message_type: str
    sending_application: str
    sending_facility: str
    updates: tuple[OrderUpdate, ...]


def parse_order_message(text: str, processing_ids: Collection[str] = ("P",)) -> OrderMessage:
    """Parse and validate an ORM^O01 / OMI^O23 message; raise `Hl7Error` saying what is wrong.
    Only the MSH-11 processing IDs in `processing_ids` are accepted (``[hl7] processing_ids``)."""
    control_id, version, kind, sending_app, sending_fac = read_header(text)
    if not control_id and not version:
        raise Hl7Error("AR", 100, "not an HL7 v2 message: it must start with an MSH segment", "MSH")
    if not control_id:
        raise Hl7Error("AR", 101, "MSH-10 message control ID is missing", "MSH", 10)
    if version not in SUPPORTED_VERSIONS:
        raise Hl7Error(
            "AR",
            203,
            f"version {version!r} not accepted ({', '.join(SUPPORTED_VERSIONS)})",
            "MSH",
            12,
        )
    code, _, event = kind.partition("^")
    if (code, event) not in SUPPORTED_MESSAGES:
        raise Hl7Error(
            "AR", 200, f"message type {kind!r} not accepted (ORM^O01, OMI^O23)", "MSH", 9
        )
    try:
        msg = parse_message(
            text.replace("\n", "\r"),
            validation_level=VALIDATION_LEVEL.TOLERANT,
            find_groups=True,
        )
    except (HL7apyException, ValueError, LookupError) as exc:
        raise Hl7Error("AR", 100, f"message structure not valid for {kind}", "MSH") from exc
    processing = field_component(msg.msh, 11).upper()
    if processing not in processing_ids:
        accepted = ", ".join(processing_ids)
        raise Hl7Error(
            "AR",
            202,
            f"processing ID {processing[:3]!r} refused: only {accepted} may change orders",
            "MSH",
            11,
        )
    expected = f"{code}_{event}"
    if msg.name != expected:
        raise Hl7Error("AR", 100, f"message structure is {msg.name}, expected {expected}", "MSH")
    groups = [c for c in msg.children if c.name.endswith("_ORDER")]
    patients = [c for c in msg.children if c.name.endswith("_PATIENT")]
    pid = next((s for p in patients for s in _segments(p) if s.name == "PID"), None)
    if not groups:
        raise Hl7Error("AE", 100, "the message has no ORC order group", "ORC")
    msh_date = parse_da(field_component(msg.msh, 7))
    updates = tuple(
        _order_update(list(_segments(group)), pid, i, control_id, msh_date)
        for i, group in enumerate(groups, start=1)
    )
    return OrderMessage(control_id, version, kind, sending_app, sending_fac, updates)


def _patient(pid: Any) -> tuple[str, str]:
    """Patient ID and issuer from PID-3: the MR-typed repetition, else the first."""
    if pid is None:
        return "", ""
    n = _repetitions(pid, 3)
    reps = [
        (
            field_component(pid, 3, 1, r),
            field_component(pid, 3, 4, r),
            field_component(pid, 3, 5, r),
        )
        for r in range(n)
    ]
    chosen = next((r for r in reps if r[2].upper() == "MR" and r[0]), None)
    chosen = chosen or next((r for r in reps if r[0]), None)
    return (unescape(chosen[0]), unescape(chosen[1])) if chosen else ("", "")


def _order_update(
    segments: list[Any], pid: Any, n: int, control_id: str, msh_date: date | None
) -> OrderUpdate:
    def first(name: str) -> Any:
        return next((s for s in segments if s.name == name), None)

    orc, obr, tq1, ipc = first("ORC"), first("OBR"), first("TQ1"), first("IPC")
    if orc is None:
        raise Hl7Error("AE", 100, f"order group {n} has no ORC segment", "ORC")
    raw_control = field_component(orc, 1).upper()
    try:
        control = OrderControl(raw_control)
    except ValueError as exc:
        raise Hl7Error(
            "AE", 103, f"ORC-1 order control {raw_control!r} not accepted (NW, XO, CA)", "ORC", 1
        ) from exc
    placer = field_component(orc, 2) or field_component(obr, 2)
    if not placer:
        raise Hl7Error("AE", 101, "ORC-2 (or OBR-2) placer order number is missing", "ORC", 2)
    placer_ns = field_component(orc, 2, 2) or field_component(obr, 2, 2)
    priority = field_component(tq1, 9) or field_component(orc, 7, 6) or field_component(obr, 27, 6)
    if priority and priority.upper() not in {"S", "A", "R", "P", "C", "T", "PRN"}:
        raise Hl7Error("AE", 103, f"priority {priority!r} not in HL7 table 0027", "TQ1", 9)
    request = _date(field_component(orc, 15), "ORC", 15)
    if request is None and control is OrderControl.NEW:
        request = _date(field_component(orc, 9), "ORC", 9) or msh_date
    patient_id, issuer = _patient(pid)
    reason = field_component(obr, 31).upper()
    psa = _psa([s for s in segments if s.name == "OBX"])
    try:
        return OrderUpdate(
            control=control,
            placer_order_number=unescape(placer),
            placer_namespace=unescape(placer_ns),
            filler_order_number=unescape(field_component(orc, 3) or field_component(obr, 3)),
            accession_number=unescape(field_component(ipc, 1) or field_component(obr, 18)),
            patient_id=patient_id,
            issuer_of_patient_id=issuer,
            study_instance_uid=field_component(ipc, 3),
            referral_urgency=ReferralUrgency.from_hl7(priority) if priority else None,
            request_date=request,
            suspected_cancer_pathway=(reason in SUSPECTED_CANCER_CODES) if reason else None,
            clinical_details=unescape(field_component(obr, 13)) or None,
            psa_ng_ml=psa,
            source="hl7",
            message_control_id=control_id,
        )
    except FieldTooLong as exc:
        segment, field = _FIELD_SOURCES.get(exc.name, ("", None))
        raise Hl7Error("AE", 102, f"order group {n}: {exc}", segment, field) from exc
    except ValueError as exc:
        raise Hl7Error("AE", 101, f"order group {n}: {exc}", "ORC", 2) from exc


#: where each order field is read from (the first choice), for ERR-2 of a length refusal
_FIELD_SOURCES: dict[str, tuple[str, int | None]] = {
    "placer_order_number": ("ORC", 2),
    "placer_namespace": ("ORC", 2),
    "filler_order_number": ("ORC", 3),
    "accession_number": ("IPC", 1),
    "patient_id": ("PID", 3),
    "issuer_of_patient_id": ("PID", 3),
    "study_instance_uid": ("IPC", 3),
    "message_control_id": ("MSH", 10),
}


def _psa(observations: list[Any]) -> float | None:
    for obx in observations:
        if field_component(obx, 3, 1) != PSA_LOINC:
            continue
        raw, unit = field_component(obx, 5), field_component(obx, 6).lower()
        if unit not in PSA_UNITS:
            raise Hl7Error("AE", 102, f"PSA unit {unit!r} not accepted (ng/mL)", "OBX", 6)
        try:
            value = float(raw)
        except ValueError as exc:
            raise Hl7Error("AE", 102, f"PSA value {raw[:20]!r} is not a number", "OBX", 5) from exc
        if not 0.0 <= value < 10000.0:
            raise Hl7Error("AE", 102, f"PSA value {value} out of range", "OBX", 5)
        return value
    return None


# --- acknowledgements ----------------------------------------------------------------------


def build_ack(
    ack_code: str,
    control_id: str,
    version: str,
    *,
    settings: Hl7Settings,
    receiving: tuple[str, str] = ("", ""),
    error: Hl7Error | None = None,
    event: str = "",
    now: datetime | None = None,
) -> str:
    """An ACK (ER7) in the message's version (2.5.1 when it is unknown or not accepted)."""
    version = version if version in SUPPORTED_VERSIONS else "2.5.1"
    ack = Message("ACK", version=version)
    ack.msh.msh_3 = escape(settings.sending_application)
    if settings.sending_facility:
        ack.msh.msh_4 = escape(settings.sending_facility)
    if receiving[0]:
        ack.msh.msh_5 = escape(receiving[0])
    if receiving[1]:
        ack.msh.msh_6 = escape(receiving[1])
    ack.msh.msh_7 = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    if event and version in ("2.5", "2.5.1"):
        ack.msh.msh_9 = f"ACK^{event}^ACK"
    elif event:
        ack.msh.msh_9 = f"ACK^{event}"
    else:
        ack.msh.msh_9 = "ACK"
    ack.msh.msh_10 = "ACK" + uuid.uuid4().hex[:17]
    ack.msh.msh_11 = "P"
    ack.msa.msa_1 = ack_code
    ack.msa.msa_2 = escape(control_id)[:20] if control_id else ""
    if error is not None:
        name = _ERROR_NAMES.get(error.code, "Application error")
        where = "^".join(x for x in (error.segment, "1", str(error.field or "")) if x)
        if version in ("2.5", "2.5.1"):
            ack.err.err_2 = where
            ack.err.err_3 = f"{error.code}^{name}^HL70357"
            ack.err.err_4 = "E"
            ack.err.err_8 = escape(error.text)[:250]
        else:
            ack.msa.msa_3 = escape(error.text)[:80]
            ack.err.err_1 = f"{where}^{error.code}&{name}&HL70357"
    return str(ack.to_er7())


#: structural bounds checked before any parsing: hl7apy's cost grows steeply with repetitions
#: and subcomponents (20,000 "~A^B&C" took 26 s to parse, 100,000 "^A" 35 s), far beyond any
#: real order message
MAX_SEGMENTS = 500
MAX_REPETITIONS = 500
MAX_SUBCOMPONENTS = 500
MAX_FIELDS = 1000
MAX_COMPONENTS = 2000


def structure_refusal(text: str) -> str | None:
    """Why a message is too complex to parse (None when it is within the bounds)."""
    segments = text.count("\r") + text.count("\n")
    if segments > MAX_SEGMENTS:
        return f"more than {MAX_SEGMENTS} segments"
    if not text.startswith("MSH") or len(text) < 8:
        return None  # not HL7: the parser refuses it cheaply
    field, component, repetition, _escape, subcomponent = tuple(text[3:8])
    for char, limit, what in (
        (field, MAX_FIELDS, "fields"),
        (component, MAX_COMPONENTS, "components"),
        (repetition, MAX_REPETITIONS, "repetitions"),
        (subcomponent, MAX_SUBCOMPONENTS, "subcomponents"),
    ):
        if text.count(char) > limit:
            return f"more than {limit} {what}"
    return None


def _raw_header(text: str) -> tuple[str, str]:
    """MSH-10 and MSH-12.1 by splitting the first line (no parser): for the ACK of a message
    too complex to parse."""
    first = text.replace("\n", "\r").split("\r", 1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return "", ""
    fields_ = first.split(first[3])
    control_id = fields_[9] if len(fields_) > 9 else ""
    version = fields_[11].split(first[4:5] or "^")[0] if len(fields_) > 11 else ""
    return control_id[:64], version[:8]


def handle_message(
    index: Index, text: str, settings: Hl7Settings, now: float, audit: Any = None
) -> str:
    """Apply one order message in one transaction and return its ACK (never raises). With
    `audit` (the audit trail: ``append(..., change=)``), the orders commit together with an
    ``hl7_order`` event naming the sending application and the orders."""
    too_complex = structure_refusal(text)
    if too_complex is not None:
        control_id, version = _raw_header(text)
        log.warning("HL7 message %r refused (AR 100): %s", control_id[:20], too_complex)
        error = Hl7Error("AR", 100, f"message refused: {too_complex}", "MSH")
        return build_ack("AR", control_id, version, settings=settings, error=error)
    control_id, version, kind, app, facility = read_header(text)
    event = kind.partition("^")[2] if kind.partition("^")[2] in ("O01", "O23") else ""
    try:
        message = parse_order_message(text, settings.processing_ids)

        def apply_all(s: Session) -> None:
            for update_ in message.updates:  # an order is of the listener's site
                apply_order(s, dataclasses.replace(update_, site_id=index.site), now)

        if audit is None:
            with index.write() as s:
                apply_all(s)
        else:
            audit.append(
                "hl7_order",
                user=f"{app}^{facility}"[:64],
                role="hl7",
                detail={
                    "message_control_id": control_id[:64],
                    "orders": [
                        f"{u.placer_namespace}-{u.placer_order_number}"[:80]
                        for u in message.updates[:20]
                    ],
                },
                change=apply_all,
            )
    except Hl7Error as exc:
        log.warning(
            "HL7 message %r refused (%s %d): %s", control_id[:20], exc.ack, exc.code, exc.text
        )
        return build_ack(
            exc.ack,
            control_id,
            version,
            settings=settings,
            receiving=(app, facility),
            event=event,
            error=exc,
        )
    except OrderError as exc:
        err = Hl7Error("AE", 204, str(exc), "ORC", 2)
        log.warning("HL7 message %r refused (AE 204): %s", control_id[:20], exc)
        return build_ack(
            "AE",
            control_id,
            version,
            settings=settings,
            receiving=(app, facility),
            event=event,
            error=err,
        )
    except Exception:  # the database or a bug: the sender retries later; no details sent
        log.exception("HL7 message %r could not be applied", control_id[:20])
        err = Hl7Error("AE", 207, "internal error; the message was not applied, send it again")
        return build_ack(
            "AE",
            control_id,
            version,
            settings=settings,
            receiving=(app, facility),
            event=event,
            error=err,
        )
    log.info(
        "HL7 %s %r applied: %d order(s)",
        message.message_type,
        control_id[:20],
        len(message.updates),
    )
    return build_ack(
        "AA", control_id, version, settings=settings, receiving=(app, facility), event=event
    )


# --- the MLLP server -----------------------------------------------------------------------


class MllpServer:
    """An MLLP server in a thread of its own (asyncio loop): each message on a connection is
    passed to `handler` (run in a worker thread), whose answer goes back on that connection.
    Peers outside `allowed_hosts` are disconnected (`core.peers`: empty = loopback only), so
    are connections beyond `max_connections` and those idle for `idle_timeout_s`. With
    `ssl_context` the listener speaks MLLP over TLS."""

    def __init__(
        self,
        handler: Callable[[str], str],
        *,
        bind_address: str = "127.0.0.1",
        port: int = 0,
        allowed_hosts: list[str] | None = None,
        name: str = "mllp",
        max_connections: int = 16,
        idle_timeout_s: float = 300.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.bind_address = bind_address
        self._port = port
        self.allowed_hosts = list(allowed_hosts or [])
        self.name = name
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.ssl_context = ssl_context
        self.connections = 0  # open now (the loop's thread only)
        self.refused_connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return self._port

    async def _connection(self, reader: MLLPStreamReader, writer: MLLPStreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        if not peer_allowed(str(peer[0]), self.allowed_hosts):
            log.warning("%s: connection from %s refused (not an allowed host)", self.name, peer[0])
            writer.close()
            return
        if self.connections >= self.max_connections:
            self.refused_connections += 1
            log.warning(
                "%s: connection from %s refused (%d open, the limit)",
                self.name,
                peer[0],
                self.connections,
            )
            writer.close()
            return
        self.connections += 1
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), self.idle_timeout_s)
                except TimeoutError:
                    log.info("%s: connection from %s idle, closed", self.name, peer[0])
                    break
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    break
                except (InvalidBlockError, ValueError, asyncio.LimitOverrunError) as exc:
                    log.warning("%s: bad MLLP framing from %s (%s)", self.name, peer[0], exc)
                    break
                text = bytes(block).decode("utf-8", errors="replace")
                answer = await loop.run_in_executor(None, self.handler, text)
                writer.writeblock(answer.encode("utf-8"))
                await asyncio.wait_for(writer.drain(), self.idle_timeout_s)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass  # a peer that stopped reading its ACKs, or went away
        finally:
            self.connections -= 1
            writer.close()

    def _connected(self, reader: MLLPStreamReader, writer: Any) -> Any:
        return self._connection(reader, writer)

    def _run(self) -> None:
        from hl7.mllp.streams import HL7StreamProtocol

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        def factory() -> asyncio.Protocol:
            reader = MLLPStreamReader(limit=MAX_MESSAGE_BYTES, loop=loop)
            return HL7StreamProtocol(reader, self._connected, loop=loop)

        try:
            self._server = loop.run_until_complete(
                loop.create_server(
                    factory,
                    self.bind_address,
                    self._port,
                    ssl=self.ssl_context,
                    ssl_handshake_timeout=self.idle_timeout_s if self.ssl_context else None,
                )
            )
            self._port = self._server.sockets[0].getsockname()[1]
        except OSError as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        self._server.close()
        loop.run_until_complete(self._server.wait_closed())
        loop.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        if self._error is not None:
            raise OSError(f"{self.name}: cannot listen on port {self._port}: {self._error}")
        log.info("%s listening on %s:%d", self.name, self.bind_address, self._port)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
        self._thread = None

    def __enter__(self) -> MllpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Hl7Listener(MllpServer):
    """The node's order listener (``[hl7] listen_port``, ``bind_address``, ``allowed_hosts``)."""

    def __init__(
        self,
        index: Index,
        settings: Hl7Settings,
        *,
        port: int | None = None,
        clock: Callable[[], float] = time.time,
        audit: Any = None,
    ) -> None:
        self.index = index
        self.settings = settings
        self.clock = clock
        self.audit = audit
        super().__init__(
            self._handle,
            bind_address=settings.bind_address,
            port=port if port is not None else (settings.listen_port or 0),
            allowed_hosts=settings.allowed_hosts,
            name="hl7-listener",
            max_connections=settings.max_connections,
            idle_timeout_s=settings.idle_timeout_s,
            ssl_context=(
                server_ssl_context(settings.tls.certfile, settings.tls.keyfile, settings.tls.cafile)
                if settings.tls is not None
                else None
            ),
        )

    def start(self) -> None:
        super().start()
        s = self.settings
        log.info("hl7-listener peers: %s", describe_allowlist(s.allowed_hosts))
        if s.allowed_hosts and s.tls is None:
            log.warning(
                "HL7 listener on port %d is open beyond loopback (%s) over plain TCP: orders and "
                "patient identifiers travel unencrypted; set [hl7] tls",
                self.port,
                ", ".join(s.allowed_hosts),
            )

    def _handle(self, text: str) -> str:
        return handle_message(self.index, text, self.settings, self.clock(), self.audit)
