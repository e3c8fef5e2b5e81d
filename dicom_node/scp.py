"""The Storage SCP: C-ECHO and C-STORE over DICOM (pynetdicom), optionally over TLS.

Accepts every storage SOP Class (MR, Enhanced MR, Enhanced MR Color, and also SR, KO, PR, Raw
Data, private classes: a PACS sends whole studies) in whatever transfer syntax the peer
proposes first, because the data set is stored exactly as received and decoded only later.

Who may associate (safe by default; `peer_refusal`):

- the address, by the one peer rule shared with the HL7 listener (`core.peers`):
  ``dicom.allowed_hosts`` empty = loopback peers only (127.0.0.0/8, ::1), else only the listed
  addresses or CIDR networks;
- then, when ``dicom.allowed_calling_aets`` is set, only those calling AE titles (a title
  never opens the port to an address: anyone can send any title).

The start-up log line says which of these applies (`describe_peer_policy`).

Association negotiation (A-ASSOCIATE-RJ result/source/reason):

- calling AE title not in ``dicom.allowed_calling_aets``: rejected-permanent / service-user /
  0x03 *calling AE title not recognised*;
- called AE title is not ours (``dicom.ae_title``): rejected-permanent / service-user / 0x07
  *called AE title not recognised*;
- peer address refused by the policy above: rejected-permanent / service-user / 0x01 *no
  reason given* (DICOM has no reason code for an address);
- more than ``dicom.max_associations`` at once: rejected-transient / service-provider
  (presentation) / 0x02 *local limit exceeded*.

Limits on what a peer sends: we announce ``dicom.max_pdu_size`` as our Maximum Length
Received; a P-DATA-TF PDU longer than that, or any other PDU longer than `MAX_CONTROL_PDU`,
gets an A-ABORT (service-provider, 0x06 invalid PDU parameter value) before its body is read.
Unknown PDU types and undecodable PDUs abort the association (pynetdicom), and so does a
DIMSE request that lacks a required parameter (pynetdicom would leave it unanswered). A
connection that sends no A-ASSOCIATE-RQ is closed after 10 s (ACSE timeout), an idle
association after 60 s (network timeout).

C-STORE statuses (the handler is thin: `dicom_node.ingest.Ingest` validates, spools, fsyncs,
indexes and returns; it never runs analysis):

- ``0x0000`` Success: the instance is durably in the spool (fsynced file and directory) and in
  the index. A duplicate SOP Instance UID also gets 0x0000 (idempotent: the index is unchanged).
- ``0xA700`` Refused, out of resources (`OutOfResourcesError`): free disk is below
  ``dicom.low_water_mark_mb`` or the spool write failed. Nothing is kept; the peer must resend.
- ``0xA900`` Error, data set does not match SOP Class: a Study/Series/SOP Instance UID, SOP
  Class UID or transfer syntax UID breaks the DICOM UID syntax (`core.uids.InvalidUIDError`:
  digits and dots, no leading zeros, at most 64 characters), or the data set's SOP Class/Instance
  UID differ from the C-STORE request (`DatasetMismatchError`). Quarantined with a reason.
  0xA900 rather than 0xC000 so that a sender's bad data and our own failures stay apart.
- ``0xC210`` Error, cannot understand (`MalformedDicomError`): the data set cannot be parsed,
  its encoding is broken (`dicom_node.encoding_check`: truncated elements, unknown VRs,
  unclosed or too deeply nested sequences, short Pixel Data) or it lacks Study/Series Instance
  UID. Quarantined with a reason.
- ``0xC000`` Error, cannot understand: an unexpected failure (e.g. the index database); the
  file may be in the spool and is indexed by `dicom_node.node.reconcile` at the next start.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pydicom.config

from core import peers
from core.settings import DicomSettings, TlsSettings
from dicom_node import dimse_fastpath, reactor_wakeup, uid_memo
from dicom_node.dimse_fastpath import P_DATA_TF
from dicom_node.ingest import Ingest, IngestStats, read_header, record_from_header
from store.index import Index
from store.spool import Spool

if TYPE_CHECKING:
    from dicom_node.workers import WorkerBoard

__all__ = [
    "IngestStats",
    "StorageSCP",
    "StoreHandler",
    "client_ssl_context",
    "read_header",
    "record_from_header",
    "server_ssl_context",
]

log = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

#: Largest non-data PDU (A-ASSOCIATE-RQ with many presentation contexts, A-RELEASE, A-ABORT)
#: read from a peer, whatever ``dicom.max_pdu_size`` says.
MAX_CONTROL_PDU = 1 << 20
#: How long a receiver holding more connections than the least busy one waits before it
#: accepts (the others, woken by the same connection, take it first).
BUSY_ACCEPT_DELAY_S = 0.002
#: A-ABORT PDU (PS3.8 9.3.8): source 2 service-provider, reason 6 invalid PDU parameter value
A_ABORT_INVALID_PDU_PARAMETER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"


class StoreHandler:
    """The pynetdicom C-STORE handler: request in, `dicom_node.ingest.Ingest` status out."""

    def __init__(
        self,
        spool: Spool,
        index: Index,
        on_stored: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        max_instance_bytes: int | None = None,
    ) -> None:
        self.ingest = Ingest(spool, index, on_stored, clock)
        self.spool = spool
        self.index = index
        #: larger data sets are refused with 0xA700 (``dicom.max_instance_bytes``)
        self.max_instance_bytes = max_instance_bytes
        #: called after every C-STORE (the receiver processes publish their counters)
        self.after_store: Callable[[], None] | None = None

    @property
    def stats(self) -> IngestStats:
        return self.ingest.stats

    @property
    def on_stored(self) -> Callable[[str], None] | None:
        return self.ingest.on_stored

    @on_stored.setter
    def on_stored(self, callback: Callable[[str], None] | None) -> None:
        self.ingest.on_stored = callback

    def store(
        self,
        data: io.BytesIO,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_ae_title: str = "",
    ) -> int:
        """Spool and index one data set; returns the DIMSE status (module docstring)."""
        return self.ingest.receive(
            data,
            transfer_syntax_uid,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            calling_ae_title=calling_ae_title,
        ).status

    def handle_store(self, event: Any) -> int:
        """pynetdicom ``EVT_C_STORE`` handler."""
        return self.serve(
            event.request,
            str(event.context.transfer_syntax),
            str(event.assoc.requestor.ae_title),
        )

    def serve(self, req: Any, transfer_syntax_uid: str, calling_ae_title: str) -> int:
        """One C-STORE request (pynetdicom's ``C_STORE`` primitive, its data set in a
        `BytesIO`): the DIMSE status. Also called from the DUL thread by
        `dicom_node.dimse_fastpath` (`StorageSCP` wires it)."""
        data = req.DataSet
        limit = self.max_instance_bytes
        if limit is not None and data.getbuffer().nbytes > limit:
            status = self.ingest.refuse_too_large(
                data.getbuffer().nbytes, limit, str(req.AffectedSOPInstanceUID or "")
            )
        else:
            status = self.store(
                data,
                sop_class_uid=str(req.AffectedSOPClassUID or ""),
                sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
                transfer_syntax_uid=transfer_syntax_uid,
                calling_ae_title=calling_ae_title,
            )
        if self.after_store is not None:
            self.after_store()
        return status


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS for the SCP (DICOM TLS, PS3.15 B.1). With ``cafile`` peers must show a client
    certificate signed by it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    if tls.cafile is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(tls.cafile))
    return ctx


def client_ssl_context(tls: TlsSettings | None) -> ssl.SSLContext:
    """TLS for the sender: verify the destination against ``cafile`` (or the system store) and,
    unless ``tls.check_hostname`` is false, that its certificate names the host we dialled
    (pass the host as ``server_hostname``); present our certificate when one is configured."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.cafile) if tls and tls.cafile else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname if tls is not None else True
    if tls is not None:
        ctx.load_cert_chain(certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    return ctx


def peer_refusal(settings: DicomSettings, address: str) -> str | None:
    """Why a peer at `address` may not associate, or None when it may: the one peer rule
    (`core.peers`, empty ``allowed_hosts`` = loopback only). The calling AE title is checked
    afterwards by pynetdicom against ``allowed_calling_aets``."""
    return peers.peer_refusal(address, settings.allowed_hosts)


class _AbortingLimits:
    """Reads each PDU header and refuses a body longer than allowed: P-DATA-TF up to
    ``maximum_length`` (our ``dicom.max_pdu_size``), other PDUs up to `MAX_CONTROL_PDU`. The
    peer gets an A-ABORT (source service-provider, reason 0x06 invalid PDU parameter value)
    and the connection closes before any of the body is read.

    Also: when the connection ends before a whole A-ASSOCIATE-RQ arrived, the acceptor is
    woken at once (pynetdicom would otherwise hold the association slot for ``acse_timeout``,
    so a few garbage connections could lock out real peers)."""

    def __init__(self, max_pdu_size: int) -> None:
        self.max_pdu_size = max_pdu_size
        self.body_limit: int | None = None  # set while a body is expected
        self.requested = False  # pynetdicom decoded an A-ASSOCIATE-RQ (and queues it)

    def check_header(self, header: bytes) -> None:
        self.body_limit = None
        if len(header) != 6:
            return
        pdu_type, _, _ = struct.unpack(">BBL", header)
        if 0x01 <= pdu_type <= 0x07:
            self.body_limit = self.max_pdu_size if pdu_type == P_DATA_TF else MAX_CONTROL_PDU


def _limited_socket_class(base: type) -> type:
    class PduLimitedSocket(base):  # type: ignore[misc, valid-type]
        """pynetdicom's `AssociationSocket` with the PDU limits of `_AbortingLimits`.
        pynetdicom reads a PDU as ``recv(6)`` (type, length) then ``recv(length)``."""

        limits: _AbortingLimits

        def recv(self, nr_bytes: int) -> bytearray:
            limits = self.limits
            if limits.body_limit is None:
                data: bytearray = super().recv(nr_bytes)
                if len(data) < nr_bytes:
                    self._ended()
                limits.check_header(bytes(data))
                return data
            limit, limits.body_limit = limits.body_limit, None
            if nr_bytes > limit:
                log.warning(
                    "PDU of %d bytes from %s exceeds the limit of %d bytes; aborting",
                    nr_bytes,
                    _peer_address(self),
                    limit,
                )
                with contextlib.suppress(OSError):
                    self.socket.sendall(A_ABORT_INVALID_PDU_PARAMETER)
                self._ended()
                return bytearray()  # short read: pynetdicom closes the connection (Evt17)
            body = self._recv_body(nr_bytes)
            if len(body) < nr_bytes:
                self._ended()
            return body

        def _recv_body(self, nr_bytes: int) -> bytearray:
            """`nr_bytes` (or fewer when the peer closes) read straight into one buffer with
            as few calls as the kernel allows; pynetdicom reads 4 KiB per call (32 system
            calls, allocations and copies for a 128 KiB PDU)."""
            body = bytearray(nr_bytes)
            view, got = memoryview(body), 0
            sock = self.socket
            with view:
                while got < nr_bytes:
                    n = sock.recv_into(view[got:], nr_bytes - got)
                    if not n:
                        break
                    got += n
            if got < nr_bytes:
                del body[got:]
            return body

        def _ended(self) -> None:
            """The peer is gone or refused: wake an acceptor still waiting for its request
            (None is what pynetdicom's queue gives on an ACSE timeout: it then closes)."""
            if not self.limits.requested:
                self.limits.requested = True
                self._assoc.dul.to_user_queue.put(None)

    return PduLimitedSocket


def _abort_unanswerable(
    assoc: Any, serve: Callable[[Any, int], None]
) -> Callable[[Any, int], None]:
    """pynetdicom drops a DIMSE request that lacks a required parameter (an empty Affected SOP
    Instance UID, say) without answering, so the peer would wait for its network timeout. We
    abort the association instead: the peer learns at once that nothing was stored."""

    def serve_or_abort(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request:
            log.warning(
                "%s message from %s lacks a required parameter; aborting the association",
                msg.msg_type,
                assoc.requestor.address,
            )
            assoc.abort()
            return
        serve(msg, context_id)

    return serve_or_abort


def _freeing_slot(
    assoc: Any, run: Callable[[], None], board: WorkerBoard, row: int
) -> Callable[[], None]:
    """The association thread's body, giving its slot and its connection on the board back
    when it ends."""

    def run_and_free() -> None:
        try:
            run()
        finally:
            if getattr(assoc, "radtriage_slot", False):
                assoc.radtriage_slot = False
                board.free_slot(row)
            board.add(row, "connections", -1)

    return run_and_free


def _inline_store(assoc: Any, handler: StoreHandler) -> dimse_fastpath.Serve:
    """What the DUL thread calls for a complete C-STORE request (`dimse_fastpath.FastDimse`):
    the same `StoreHandler.serve` as the ``EVT_C_STORE`` handler."""

    def serve(request: Any, context: Any) -> int:
        return handler.serve(
            request, str(context.transfer_syntax[0]), str(assoc.requestor.ae_title)
        )

    return serve


def _noting_request(decode: Callable[[bytearray], Any], limits: _AbortingLimits) -> Any:
    """pynetdicom's ``_decode_pdu``, noting an A-ASSOCIATE-RQ it decoded (pynetdicom then
    queues the request for the acceptor), so that a connection ending later does not also
    wake the acceptor. One decode per request: it was decoded twice before."""

    def decode_and_note(bytestream: bytearray) -> Any:
        pdu, event = decode(bytestream)
        if event == "Evt6":  # A-ASSOCIATE-RQ PDU received
            limits.requested = True
        return pdu, event

    return decode_and_note


def _peer_address(sock: Any) -> str:
    try:
        return str(sock.socket.getpeername()[0])
    except (OSError, AttributeError):
        return "?"


class StorageSCP:
    """The listening AE. `start()` returns once the port is bound; `stop()` closes it."""

    def __init__(
        self,
        settings: DicomSettings,
        handler: StoreHandler,
        *,
        listen_fd: int | None = None,
        board: tuple[WorkerBoard, int] | None = None,
    ) -> None:
        """`listen_fd`: accept on this inherited, non-blocking listening socket instead of
        binding one (several receiver processes on one port); `board`: the shared association
        count and this process's row in it (`dicom_node.workers`), so ``max_associations``
        holds across processes and the least busy process accepts first."""
        self.settings = settings
        self.handler = handler
        self.listen_fd = listen_fd
        self.board = board
        self._server: Any = None
        self._ae: Any = None

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def _check_peer(self, event: Any) -> None:
        """``EVT_REQUESTED``: reject peers the address policy refuses (`peer_refusal`)."""
        address = str(event.assoc.requestor.address)
        why = peer_refusal(self.settings, address)
        if why is not None:
            log.warning("association from %s rejected: %s", address, why)
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)
            event.assoc.kill()  # waits until the A-ASSOCIATE-RJ has gone out

    def _take_slot(self, event: Any) -> None:
        """``EVT_REQUESTED`` (after `_check_peer`): count the association across the
        receiver processes; over ``max_associations`` it is rejected-transient / service
        provider (presentation) / local limit exceeded, as pynetdicom does within one."""
        assoc = event.assoc
        if self.board is None or assoc.is_rejected or assoc.is_aborted:
            return
        board, row = self.board
        if board.take_slot(row, self.settings.max_associations):
            assoc.radtriage_slot = True
            return
        log.warning(
            "association from %s rejected: %d associations open (dicom.max_associations)",
            assoc.requestor.address,
            self.settings.max_associations,
        )
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        assoc.kill()

    def start(self) -> None:
        from pynetdicom import AE, _config, evt
        from pynetdicom.transport import (
            AssociationSocket,
            RequestHandler,
            ThreadedAssociationServer,
        )

        # Accept any storage SOP Class (also private ones) and store it unparsed; answer
        # C-STORE from our handler only; no per-message debug logging.
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        uid_memo.install()  # each association's ~200 proposed UIDs are checked once
        _config.LOG_HANDLER_LEVEL = "none"
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        # pydicom's value warnings quote raw header text (patient names, control characters)
        # into the log; ingest reports what is wrong itself, escaped and without patient data
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        ae.maximum_pdu_size = s.max_pdu_size
        ae.maximum_associations = s.max_associations
        ae.require_called_aet = True
        ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.network_timeout = 60
        ae.acse_timeout = 10  # a peer that connects sends its A-ASSOCIATE-RQ at once
        ae.dimse_timeout = 60
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self.handler.handle_store),
            (evt.EVT_REQUESTED, self._check_peer),
            (evt.EVT_REQUESTED, self._take_slot),
        ]
        socket_class = _limited_socket_class(AssociationSocket)
        max_pdu_size = s.max_pdu_size
        board = self.board
        store_handler = self.handler

        class LimitedRequestHandler(RequestHandler):  # type: ignore[misc]
            def _create_association(self) -> Any:
                assoc: Any = super()._create_association()
                sock: Any = assoc.dul.socket
                sock.__class__ = socket_class  # same object, limited recv (no second Evt5)
                sock.limits = _AbortingLimits(max_pdu_size)
                assoc.dul._decode_pdu = _noting_request(assoc.dul._decode_pdu, sock.limits)
                assoc._serve_request = _abort_unanswerable(assoc, assoc._serve_request)
                reactor_wakeup.attach(assoc)
                dimse_fastpath.attach(assoc, _inline_store(assoc, store_handler))
                if board is not None:
                    assoc._target = _freeing_slot(assoc, assoc._target, *board)  # thread body
                    self.radtriage_counted = True  # the association thread uncounts it
                return assoc

            def handle(self) -> None:
                try:
                    super().handle()
                except BaseException:
                    if board is not None and not getattr(self, "radtriage_counted", False):
                        board[0].add(board[1], "connections", -1)  # accepted, never served
                    raise

        listen_fd = self.listen_fd

        class Server(ThreadedAssociationServer):  # type: ignore[misc]
            def server_bind(self) -> None:
                if listen_fd is None:
                    super().server_bind()
                    return
                if self.socket is not None:  # the one socketserver made: use the shared one
                    self.socket.close()
                self.socket = socket.socket(fileno=os.dup(listen_fd))
                self.server_address = self.socket.getsockname()

            def server_activate(self) -> None:
                if listen_fd is None:
                    super().server_activate()  # the shared socket listens already

            def server_close(self) -> None:
                if listen_fd is None:
                    super().server_close()
                elif self.socket is not None:  # our descriptor only: shutdown() would stop
                    self.socket.close()  # the socket of every worker

            def get_request(self) -> Any:
                # every worker wakes for a new connection; a busier one lets the others take
                # it (accept on the non-blocking socket then fails, and socketserver moves on)
                if board is not None and board[0].busier_than_least(board[1]):
                    time.sleep(BUSY_ACCEPT_DELAY_S)
                request = super().get_request()
                if board is not None:  # counted from accept on: the others see it at once
                    board[0].add(board[1], "connections", 1)
                return request

        ssl_context = server_ssl_context(s.tls) if s.tls is not None else None
        try:
            server = ae.make_server(
                (s.bind_address, s.port),
                ssl_context=ssl_context,
                evt_handlers=handlers,
                server_class=Server,
                request_handler=LimitedRequestHandler,
            )
        except OSError as exc:
            from core.errors import ConfigError

            raise ConfigError(
                f"cannot listen on {s.bind_address}:{s.port}: {exc}; choose a free dicom.port"
            ) from exc
        stamp = datetime.now().strftime("%Y%m%d%H%M%S")
        threading.Thread(
            target=server.serve_forever, name=f"AcceptorServer@{stamp}", daemon=True
        ).start()
        ae._servers.append(server)  # so that ae.shutdown() stops it
        self._server = server
        self._ae = ae
        log.info(
            "DICOM SCP %s listening on %s:%d%s, max PDU %d bytes, at most %d associations; %s",
            s.ae_title,
            s.bind_address,
            self.port,
            " (TLS)" if ssl_context else "",
            s.max_pdu_size,
            s.max_associations,
            describe_peer_policy(s),
        )

    def stop(self) -> None:
        """Stop accepting, let running associations finish their current message, close."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None


def describe_peer_policy(settings: DicomSettings) -> str:
    """One line for the start-up log: who may associate."""
    aets = settings.allowed_calling_aets
    titles = f"calling AE titles {', '.join(aets)}" if aets else "any calling AE title"
    return f"{peers.describe_allowlist(settings.allowed_hosts)}; {titles}"
