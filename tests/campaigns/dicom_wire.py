"""DICOM Upper Layer on a raw socket, for tests that must send what no proper SCU would send:
hand-made PDUs (PS3.8 9.3) and C-STORE requests (PS3.7 9.3.1) with arbitrary bytes as UIDs
and data sets. Only what the hostile-input tests and the fuzz campaign need."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = b"1.2.826.0.1.3680043.10.1429.99"
VERIFICATION = b"1.2.840.10008.1.1"
MR_IMAGE_STORAGE = b"1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_VR_LE = b"1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU; `length` overrides the length field (to lie about it)."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def _ae(title: bytes) -> bytes:
    return title[:16].ljust(16, b" ")


def associate_rq(
    called: bytes = b"RADTRIAGE",
    calling: bytes = b"FUZZSCU",
    contexts: tuple[tuple[bytes, tuple[bytes, ...]], ...] = (
        (MR_IMAGE_STORAGE, (EXPLICIT_VR_LE, IMPLICIT_VR_LE)),
        (VERIFICATION, (IMPLICIT_VR_LE,)),
    ),
    max_length: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU; presentation context ids 1, 3, 5... in order."""
    items = [_item(0x10, APPLICATION_CONTEXT)]
    for i, (abstract, syntaxes) in enumerate(contexts):
        sub = _item(0x30, abstract) + b"".join(_item(0x40, ts) for ts in syntaxes)
        items.append(_item(0x20, struct.pack(">BBBB", 2 * i + 1, 0, 0, 0) + sub))
    user = _item(0x51, struct.pack(">L", max_length)) + _item(0x52, IMPLEMENTATION_CLASS_UID)
    items.append(_item(0x50, user))
    fixed = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\x00" * 32
    return pdu(0x01, fixed + b"".join(items))


RELEASE_RQ = pdu(0x05, b"\x00" * 4)


def _element(group: int, element: int, value: bytes) -> bytes:
    """Implicit VR little endian (command sets are always encoded so)."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", group, element, len(value)) + value


def c_store_rq(sop_class: bytes, sop_instance: bytes, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (a data set follows)."""
    body = b"".join(
        (
            _element(0x0000, 0x0002, sop_class),
            _element(0x0000, 0x0100, struct.pack("<H", 0x0001)),
            _element(0x0000, 0x0110, struct.pack("<H", message_id & 0xFFFF)),
            _element(0x0000, 0x0700, struct.pack("<H", 0)),
            _element(0x0000, 0x0800, struct.pack("<H", 0x0000)),
            _element(0x0000, 0x1000, sop_instance),
        )
    )
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def c_echo_rq(message_id: int = 1) -> bytes:
    body = b"".join(
        (
            _element(0x0000, 0x0002, VERIFICATION),
            _element(0x0000, 0x0100, struct.pack("<H", 0x0030)),
            _element(0x0000, 0x0110, struct.pack("<H", message_id & 0xFFFF)),
            _element(0x0000, 0x0800, struct.pack("<H", 0x0101)),
        )
    )
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def p_data(context_id: int, fragment: bytes, *, command: bool, last: bool) -> bytes:
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, header) + fragment
    return pdu(0x04, pdv)


def command_status(command: bytes) -> int | None:
    """(0000,0900) Status of a response command set."""
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, pos)
        if (group, element) == (0x0000, 0x0900) and length == 2:
            return int(struct.unpack_from("<H", command, pos + 8)[0])
        pos += 8 + length
    return None


class PeerClosed(Exception):
    """The SCP closed the connection (or aborted) where an answer was expected."""


@dataclass
class RawAssociation:
    """One TCP connection to the SCP, driven by hand."""

    host: str
    port: int
    timeout: float = 10.0
    source: str | None = None  # local address to connect from
    sock: socket.socket = field(init=False)
    accepted: dict[int, bytes] = field(default_factory=dict)  # context id -> transfer syntax
    peer_max_length: int = 0
    last_answer: bytes = b""

    def __post_init__(self) -> None:
        source = (self.source, 0) if self.source else None
        self.sock = socket.create_connection(
            (self.host, self.port), timeout=self.timeout, source_address=source
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 65536))
            if not chunk:
                raise PeerClosed(f"connection closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._recv_exact(6)
        pdu_type, _, length = struct.unpack(">BBL", header)
        if length > 1 << 24:
            raise PeerClosed(f"peer PDU length {length} is absurd")
        return pdu_type, self._recv_exact(length)

    def associate(self, rq: bytes | None = None) -> int:
        """Send an A-ASSOCIATE-RQ; returns the answer's PDU type (0x02 AC, 0x03 RJ, 0x07)."""
        self.send(rq or associate_rq())
        pdu_type, body = self.read_pdu()
        if pdu_type == 0x02:
            self._parse_ac(body)
        self.last_answer = body
        return pdu_type

    def _parse_ac(self, body: bytes) -> None:
        pos = 68
        while pos + 4 <= len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, pos)
            value = body[pos + 4 : pos + 4 + length]
            if item_type == 0x21 and len(value) >= 4 and value[2] == 0:
                ctx_id = value[0]
                ts = b""
                if len(value) >= 8:
                    (ts_len,) = struct.unpack_from(">H", value, 6)
                    ts = value[8 : 8 + ts_len]
                self.accepted[ctx_id] = ts
            elif item_type == 0x50:
                sub = 0
                while sub + 4 <= len(value):
                    s_type, _, s_len = struct.unpack_from(">BBH", value, sub)
                    if s_type == 0x51 and s_len == 4:
                        (self.peer_max_length,) = struct.unpack_from(">L", value, sub + 4)
                    sub += 4 + s_len
            pos += 4 + length

    def _send_message(self, context_id: int, command: bytes, dataset: bytes | None) -> None:
        self.send(p_data(context_id, command, command=True, last=True))
        if dataset is None:
            return
        size = max(1024, (self.peer_max_length or 16384) - 6)
        chunks = [dataset[i : i + size] for i in range(0, len(dataset), size)] or [b""]
        for i, chunk in enumerate(chunks):
            self.send(p_data(context_id, chunk, command=False, last=i == len(chunks) - 1))

    def _read_response_status(self) -> int | None:
        command = b""
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type != 0x04:
                raise PeerClosed(f"PDU type 0x{pdu_type:02X} instead of P-DATA-TF")
            pos = 0
            while pos + 6 <= len(body):
                (length,) = struct.unpack_from(">L", body, pos)
                header = body[pos + 5]
                command += body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if header & 0x01 and header & 0x02:
                    return command_status(command)

    def c_store(
        self, sop_class: bytes, sop_instance: bytes, dataset: bytes, context_id: int = 1
    ) -> int | None:
        """Send one C-STORE; the response status (None when the response had none)."""
        self._send_message(context_id, c_store_rq(sop_class, sop_instance), dataset)
        return self._read_response_status()

    def c_echo(self, context_id: int = 3) -> int | None:
        self._send_message(context_id, c_echo_rq(), None)
        return self._read_response_status()

    def release(self) -> bool:
        self.send(RELEASE_RQ)
        try:
            pdu_type, _ = self.read_pdu()
        except (PeerClosed, OSError):
            return False
        return pdu_type == 0x06


def send_and_wait_close(host: str, port: int, data: bytes, timeout: float) -> tuple[bytes, float]:
    """Connect, send `data`, half-close, and read until the SCP closes. Returns what it sent
    back and how long it took to close; raises TimeoutError when it did not close in time."""
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the SCP may already have aborted and closed: that is an answer too
        received = bytearray()
        while True:
            remaining = timeout - (time.monotonic() - start)
            if remaining <= 0:
                raise TimeoutError(f"SCP did not close within {timeout} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise TimeoutError(f"SCP did not close within {timeout} s") from None
            if not chunk:
                break
            received += chunk
    return bytes(received), time.monotonic() - start
