"""C-STORE command sets without pydicom: a direct decode of C-STORE-RQ and encode of C-STORE-RSP.

pynetdicom 3 turns every DIMSE command set into a pydicom `Dataset` and back: on receipt it
decodes the command (`dsutils.decode`), builds a message object whose constructor sets each
command keyword on a fresh `Dataset` and copies the elements onto the primitive; to answer it
builds another `Dataset`, sets and deletes elements, computes the group length and encodes it
(`dsutils.encode`). Measured in docs/scaling.md, this was about 1 ms of Python CPU per
C-STORE, more than our whole store path short of the fsyncs.

A C-STORE command set is a handful of Implicit VR Little Endian elements of group 0000
(PS3.7 9.3.1), so `attach` gives an association's DIMSE provider two shortcuts:

- `FastDimse.receive_primitive`: the P-DATA fragments of a C-STORE-RQ are assembled here, the
  command elements are read with `struct`, and the `C_STORE` primitive is built with
  pynetdicom's own setters (which validate UIDs and ranges exactly as before). The data set
  fragments are written straight into the request's `BytesIO` (no intermediate copy), which
  the C-STORE handler then reads and writes to the spool.
- `FastDimse.send_msg`: a C-STORE-RSP carrying only its usual parameters (Affected SOP
  Class/Instance UID, Message ID Being Responded To, Status) is encoded by hand into one
  P-DATA primitive.
- `FastDimse.serve` (when the SCP gives one): a complete C-STORE-RQ is stored right there, in
  the DUL thread that assembled it, and its C-STORE-RSP written to the socket as one P-DATA-TF
  PDU (what pynetdicom's DT-1 action would write). pynetdicom would instead queue the request
  to the association thread, run it through its service class and event dispatch, and queue
  the response back to the DUL thread: two thread hand-offs and a state-machine turn per
  instance. Served this way only while the association is established and not releasing,
  for a request pynetdicom would serve (`is_valid_request`, an accepted presentation context);
  an exception in `serve` answers 0xC211, as pynetdicom does for its handler.

Anything else goes to pynetdicom unchanged: other messages (C-ECHO, N-EVENT-REPORT, C-CANCEL),
a command set with an element outside the C-STORE-RQ set, a value pynetdicom would refuse
(the fragments are replayed into pynetdicom, which then answers or aborts as it always did),
responses with an Error Comment or Offending Element, handlers bound to ``EVT_DIMSE_RECV`` or
``EVT_DIMSE_SENT``, and ``_config.STORE_RECV_CHUNKED_DATASET``. patches/README.md has the
measurement and the upstream proposal.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101

# C-STORE-RQ command elements (0000,eeee) (PS3.7 table 9.3-1)
_GROUP_LENGTH = 0x0000
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_PRIORITY = 0x0700
_DATA_SET_TYPE = 0x0800
_AFFECTED_SOP_INSTANCE = 0x1000
_MOVE_ORIGINATOR_AET = 0x1030
_MOVE_ORIGINATOR_ID = 0x1031
_RQ_ELEMENTS = frozenset(
    (
        _GROUP_LENGTH,
        _AFFECTED_SOP_CLASS,
        _COMMAND_FIELD,
        _MESSAGE_ID,
        _PRIORITY,
        _DATA_SET_TYPE,
        _AFFECTED_SOP_INSTANCE,
        _MOVE_ORIGINATOR_AET,
        _MOVE_ORIGINATOR_ID,
    )
)
_US_ELEMENTS = frozenset((_COMMAND_FIELD, _MESSAGE_ID, _PRIORITY, _DATA_SET_TYPE))


#: pynetdicom's status for an exception raised by the ``EVT_C_STORE`` handler
_HANDLER_EXCEPTION = 0xC211
#: PDU type of P-DATA-TF (PS3.8 9.3.1)
P_DATA_TF = 0x04

#: Serves a complete C-STORE request under its accepted presentation context: the status.
Serve = Callable[[Any, Any], int]


class NotFast(Exception):
    """This command set is left to pynetdicom."""


def decode_store_request(command: bytes) -> dict[int, bytes]:
    """The elements of a C-STORE-RQ command set that announces a data set, by element
    number; `NotFast` for anything else (another command, an unknown element, a US that is
    not one value, a truncated element)."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos < end:
        if pos + 8 > end:
            raise NotFast("truncated element header")
        group, element, length = struct.unpack_from("<HHI", command, pos)
        start = pos + 8
        if group != 0 or element not in _RQ_ELEMENTS or element in values:
            raise NotFast("element outside the C-STORE-RQ command set")
        if start + length > end or (element in _US_ELEMENTS and length != 2):
            raise NotFast("element length")
        values[element] = command[start : start + length]
        pos = start + length
    if _us(values.get(_COMMAND_FIELD)) != _C_STORE_RQ:
        raise NotFast("not a C-STORE-RQ")
    data_set_type = _us(values.get(_DATA_SET_TYPE))
    if data_set_type is None or data_set_type == _NO_DATA_SET:
        raise NotFast("no data set")
    return values


def _us(raw: bytes | None) -> int | None:
    return None if not raw else int(struct.unpack("<H", raw)[0])


def _text(raw: bytes | None) -> str | None:
    """A UI or AE value as pydicom gives it: ASCII without its padding; None when empty."""
    if not raw:
        return None
    value = raw.decode("ascii").rstrip("\x00")
    if "\\" in value:
        raise NotFast("multi-valued text")
    return value or None


def store_request_primitive(values: dict[int, bytes], context_id: int) -> Any:
    """The `C_STORE` request primitive for decoded command `values`, set through pynetdicom's
    own setters (they raise where pynetdicom's decode would fail)."""
    primitive = C_STORE()
    primitive.MessageID = _us(values.get(_MESSAGE_ID))
    primitive.AffectedSOPClassUID = _text(values.get(_AFFECTED_SOP_CLASS))
    primitive.AffectedSOPInstanceUID = _text(values.get(_AFFECTED_SOP_INSTANCE))
    if _PRIORITY in values:
        primitive.Priority = _us(values[_PRIORITY]) or 0
    if _MOVE_ORIGINATOR_AET in values:
        aet = _text(values[_MOVE_ORIGINATOR_AET])
        primitive.MoveOriginatorApplicationEntityTitle = aet.strip() if aet else None
    if _MOVE_ORIGINATOR_ID in values:
        primitive.MoveOriginatorMessageID = _us(values[_MOVE_ORIGINATOR_ID])
    primitive._context_id = context_id
    return primitive


#: the usual C-STORE-RQ command set besides its (optional) group length: no Move Originator
_PLAIN_ELEMENTS = _RQ_ELEMENTS - {_GROUP_LENGTH, _MOVE_ORIGINATOR_AET, _MOVE_ORIGINATOR_ID}
_UID_CHARACTERS = b"0123456789."
_PRIORITIES = frozenset(struct.pack("<H", priority) for priority in (0, 1, 2))


class StoreRequest:
    """A C-STORE-RQ whose command set is the usual one with plain values, held as pynetdicom's
    `C_STORE` would hold it but without its setters (their UID checks cost more than the rest
    of the command's handling); `primitive` gives the real one when pynetdicom serves it."""

    __slots__ = (
        "AffectedSOPClassUID",
        "AffectedSOPInstanceUID",
        "DataSet",
        "MessageID",
        "Priority",
        "_context_id",
        "values",
    )
    is_valid_request = True

    def __init__(self, values: dict[int, bytes], context_id: int, sop_class: str, sop: str):
        self.values = values
        self._context_id = context_id
        self.MessageID = _us(values[_MESSAGE_ID])
        self.Priority = _us(values[_PRIORITY])
        self.AffectedSOPClassUID = sop_class
        self.AffectedSOPInstanceUID = sop
        self.DataSet: BytesIO | None = None

    def primitive(self) -> Any:
        """The same request as pynetdicom's `C_STORE` primitive."""
        primitive = store_request_primitive(self.values, self._context_id)
        primitive.DataSet = self.DataSet
        return primitive


def plain_store_request(values: dict[int, bytes], context_id: int) -> StoreRequest | None:
    """A `StoreRequest` when the command holds exactly the usual elements (Command Group
    Length optional), Priority is 0, 1 or 2 and both UIDs are 1 to 64 digits and dots (NUL
    padded): values pynetdicom's setters take unchanged. None for anything else."""
    if len(values) - (_GROUP_LENGTH in values) != len(_PLAIN_ELEMENTS) or not all(
        element in values for element in _PLAIN_ELEMENTS
    ):
        return None
    if values[_PRIORITY] not in _PRIORITIES:
        return None
    uids = []
    for element in (_AFFECTED_SOP_CLASS, _AFFECTED_SOP_INSTANCE):
        raw = values[element].rstrip(b"\x00")
        if not 0 < len(raw) <= 64 or raw.translate(None, _UID_CHARACTERS):
            return None
        uids.append(raw.decode("ascii"))
    return StoreRequest(values, context_id, uids[0], uids[1])


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_store_response(
    sop_class_uid: str | None, message_id: int, status: int, sop_instance_uid: str | None
) -> bytes:
    """A C-STORE-RSP command set (Implicit VR Little Endian, elements in tag order), as
    pynetdicom encodes it: an absent UID is left out."""
    body = b"".join(
        (
            _implicit(_AFFECTED_SOP_CLASS, _ui(sop_class_uid)) if sop_class_uid else b"",
            _implicit(_COMMAND_FIELD, struct.pack("<H", _C_STORE_RSP)),
            _implicit(0x0120, struct.pack("<H", message_id)),  # Message ID Being Responded To
            _implicit(_DATA_SET_TYPE, struct.pack("<H", _NO_DATA_SET)),
            _implicit(0x0900, struct.pack("<H", status)),  # Status
            _implicit(_AFFECTED_SOP_INSTANCE, _ui(sop_instance_uid)) if sop_instance_uid else b"",
        )
    )
    return _implicit(_GROUP_LENGTH, struct.pack("<I", len(body))) + body


def p_data_tf(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU carrying `command` as the last (only) command fragment (PS3.8 9.3.5)."""
    item = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item


class FastDimse:
    """Stands in for two methods of one association's `DIMSEServiceProvider`."""

    def __init__(self, assoc: Any, serve: Serve | None = None) -> None:
        self.assoc = assoc
        self.serve = serve
        self.dimse = assoc.dimse
        self.pynetdicom_receive = assoc.dimse.receive_primitive
        self.pynetdicom_send = assoc.dimse.send_msg
        self.command = bytearray()  # command fragments of the message being received
        self.request: Any = None  # the C-STORE-RQ whose data set is arriving
        self.data: BytesIO | None = None

    def _usable(self, event: Any) -> bool:
        chunked = _config.STORE_RECV_CHUNKED_DATASET
        return not chunked and not self.assoc.get_handlers(event)

    def receive_primitive(self, primitive: Any) -> None:
        """The DUL hands over one P-DATA primitive (its fragments, in order)."""
        if self.dimse.message is not None or not (
            self.request is not None or self.command or self._usable(evt.EVT_DIMSE_RECV)
        ):
            self.pynetdicom_receive(primitive)  # pynetdicom is decoding a message
            return
        pdvs = primitive.presentation_data_value_list
        for i, (context_id, data) in enumerate(pdvs):
            if not data:
                self._abort("a presentation data value without its message control header")
                return
            control = data[0]
            if control & 1:  # a command fragment
                if self.request is not None:
                    self._abort("a command fragment inside a data set")
                    return
                self.command += memoryview(data)[1:]
                if not control & 2:
                    continue
                command = bytes(self.command)
                self.command.clear()
                try:
                    values = decode_store_request(command)
                    self.request = plain_store_request(
                        values, context_id
                    ) or store_request_primitive(values, context_id)
                except Exception:  # NotFast, or a value pynetdicom's setters refuse
                    self._replay(context_id, command, pdvs[i + 1 :])
                    return
                self.data = BytesIO()
            elif self.request is None or self.data is None:
                self._abort("a data set fragment without a command")
                return
            else:
                self.data.write(memoryview(data)[1:])
                if control & 2:  # the last fragment
                    request, self.request = self.request, None
                    request.DataSet, self.data = self.data, None
                    context = self._inline_context(request)
                    if context is None:
                        if isinstance(request, StoreRequest):
                            request = request.primitive()
                        self.dimse.msg_queue.put((request._context_id, request))
                    else:
                        self._serve_inline(request, context)

    def _inline_context(self, request: Any) -> Any:
        """The accepted presentation context to serve `request` under here, or None when it
        goes to pynetdicom (no `serve`, not established, releasing, a request pynetdicom
        would not serve, or a handler bound to ``EVT_DIMSE_SENT``)."""
        assoc = self.assoc
        if (
            self.serve is None
            or not assoc.is_established
            or assoc._sent_release
            or not request.is_valid_request
            or not self._usable(evt.EVT_DIMSE_SENT)
        ):
            return None
        return assoc._accepted_cx.get(request._context_id)

    def _serve_inline(self, request: Any, context: Any) -> None:
        """Store `request` and write its C-STORE-RSP, in this (the DUL) thread."""
        assert self.serve is not None
        try:
            status = self.serve(request, context)
        except Exception:
            log.exception("C-STORE from %s failed in its handler", self.assoc.requestor.address)
            status = _HANDLER_EXCEPTION
        command = self._response_command(
            request.AffectedSOPClassUID,
            request.MessageID,
            status,
            request.AffectedSOPInstanceUID,
        )
        if command is not None:
            self.dimse.dul.socket.send(p_data_tf(request._context_id, command))
            return
        response = C_STORE()  # what pynetdicom's storage service class would send
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        response.Status = status
        self.pynetdicom_send(response, request._context_id)

    def _replay(self, context_id: int, command: bytes, rest: list[tuple[int, bytes]]) -> None:
        """Give pynetdicom the whole command set and the `rest` of the primitive: it decodes,
        answers or aborts as it always did."""
        pdata = P_DATA()  # its setter wants [id, bytes] lists; its decoder makes tuples
        pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]  # type: ignore[list-item]
        pdata.presentation_data_value_list.extend(rest)
        self.pynetdicom_receive(pdata)

    def _abort(self, why: str) -> None:
        """A fragment out of order: A-ABORT, as pynetdicom does for an invalid message."""
        log.warning("%s from %s; aborting the association", why, self.assoc.requestor.address)
        self.request, self.data = None, None
        self.command.clear()
        self.dimse.dul.event_queue.put("Evt19")

    def _response_command(
        self, sop_class_uid: str | None, message_id: int, status: int, sop_instance_uid: str | None
    ) -> bytes | None:
        """The C-STORE-RSP command set, when it encodes and fits one P-DATA PDU of the
        peer's maximum length; else None (pynetdicom encodes it)."""
        try:
            command = encode_store_response(sop_class_uid, message_id, status, sop_instance_uid)
        except (UnicodeEncodeError, struct.error):
            return None
        limit = self.dimse.maximum_pdu_size
        return command if limit == 0 or len(command) + 1 <= limit - 6 else None

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """A plain C-STORE-RSP goes out as one P-DATA primitive; anything else via pynetdicom."""
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and self._usable(evt.EVT_DIMSE_SENT)
        ):
            command = self._response_command(
                primitive.AffectedSOPClassUID,
                primitive.MessageIDBeingRespondedTo,
                primitive.Status,
                primitive.AffectedSOPInstanceUID,
            )
            if command is not None:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dimse.dul.send_pdu(pdata)
                return
        self.pynetdicom_send(primitive, context_id)


class DirectPData:
    """Stands in for the DUL's ``_read_pdu_data``: a P-DATA-TF PDU that arrives while the
    association is established (Sta6) with no other event pending goes straight to the DIMSE
    provider's ``receive_primitive``, which is what pynetdicom's state machine does for it
    (Evt10 -> DT-2, staying in Sta6), without the PDU object, the event queue and the state
    machine turn. Any other PDU, state or a bound ``EVT_DATA_RECV``, ``EVT_PDU_RECV`` or
    ``EVT_FSM_TRANSITION`` handler goes through pynetdicom exactly as before."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.pynetdicom_read = assoc.dul._read_pdu_data

    def _direct(self) -> bool:
        dul, assoc = self.dul, self.assoc
        return (
            dul.state_machine.current_state == "Sta6"
            and dul.event_queue.empty()
            and not assoc.get_handlers(evt.EVT_DATA_RECV)
            and not assoc.get_handlers(evt.EVT_PDU_RECV)
            and not assoc.get_handlers(evt.EVT_FSM_TRANSITION)
        )

    def read_pdu(self) -> None:
        """Read one PDU from the socket (pynetdicom's reads, limits and events)."""
        if not self._direct():
            self.pynetdicom_read()
            return
        dul = self.dul
        try:
            header = dul.socket.recv(6)
            pdu_type, _, length = struct.unpack(">BBL", header)
        except (OSError, TimeoutError, struct.error):
            dul.event_queue.put("Evt17")  # closed before a whole PDU header arrived
            return
        if pdu_type not in range(0x01, 0x08):
            log.error("Unknown PDU type received '0x%02X'", pdu_type)
            dul.event_queue.put("Evt19")
            return
        try:
            body = dul.socket.recv(length)
        except (OSError, TimeoutError):
            dul.event_queue.put("Evt17")
            return
        if len(body) != length:
            dul.event_queue.put("Evt17")  # the peer closed mid-PDU (or a limit refused it)
            return
        if pdu_type != P_DATA_TF:
            self._decode(header + body)
            return
        pdvs = presentation_data_values(body)
        if pdvs is None:
            dul.event_queue.put("Evt19")  # as pynetdicom's decode of a broken item
            return
        primitive = P_DATA()
        primitive.presentation_data_value_list.extend(pdvs)
        self.assoc.dimse.receive_primitive(primitive)

    def _decode(self, pdu: bytes) -> None:
        """Any other PDU: pynetdicom decodes it and its state machine acts on it."""
        dul = self.dul
        try:
            decoded, event = dul._decode_pdu(bytearray(pdu))
        except Exception:
            log.exception("Unable to decode the received PDU data")
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(decoded)


def presentation_data_values(body: bytes | bytearray) -> list[tuple[int, bytes]] | None:
    """The (context ID, message control header + fragment) items of a P-DATA-TF PDU body
    (PS3.8 9.3.5.1), as pynetdicom decodes them; None when an item is truncated or empty."""
    pdvs: list[tuple[int, bytes]] = []
    offset, end = 0, len(body)
    view = memoryview(body)
    with view:
        while offset < end:
            if offset + 5 > end:
                return None
            (item_length,) = struct.unpack_from(">L", body, offset)
            start, stop = offset + 5, offset + 4 + item_length
            if item_length < 1 or stop > end:
                return None
            pdvs.append((body[offset + 4], bytes(view[start:stop])))
            offset = stop
    return pdvs


def attach(assoc: Any, serve: Serve | None = None) -> FastDimse:
    """Route one association's C-STORE command sets through `FastDimse` (before it starts);
    with `serve`, complete C-STORE requests are served in the DUL thread, and P-DATA-TF PDUs
    are read by `DirectPData`."""
    fast = FastDimse(assoc, serve)
    assoc.dimse.receive_primitive = fast.receive_primitive
    assoc.dimse.send_msg = fast.send_msg
    if serve is not None:
        assoc.dul._read_pdu_data = DirectPData(assoc).read_pdu
    return fast
