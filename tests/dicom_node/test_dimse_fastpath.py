"""The C-STORE command-set shortcuts give exactly what pynetdicom's own decode/encode give."""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from dicom_node.dimse_fastpath import (
    NotFast,
    decode_store_request,
    encode_store_response,
    p_data_tf,
    plain_store_request,
    presentation_data_values,
    store_request_primitive,
)

MR = "1.2.840.10008.5.1.4.1.1.4"


def _pynetdicom_command(primitive: C_STORE | C_ECHO, message: type) -> bytes:
    msg = message()
    msg.primitive_to_message(primitive)
    [pdata, *_] = list(msg.encode_msg(1, 0))
    [(_, pdv)] = pdata.presentation_data_value_list
    assert pdv[0] == 0x03  # the last (only) command fragment
    return bytes(pdv[1:])


def _request(sop: str, *, move_aet: str | None = None) -> C_STORE:
    rq = C_STORE()
    rq.MessageID = 7
    rq.AffectedSOPClassUID = MR
    rq.AffectedSOPInstanceUID = sop
    rq.Priority = 1
    if move_aet is not None:
        rq.MoveOriginatorApplicationEntityTitle = move_aet
        rq.MoveOriginatorMessageID = 3
    rq.DataSet = BytesIO(b"\x08\x00\x18\x00")
    return rq


def _assert_decodes_like_pynetdicom(command: bytes) -> None:
    from pynetdicom.pdu_primitives import P_DATA

    ours = store_request_primitive(decode_store_request(command), 5)
    theirs = C_STORE_RQ()
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[5, b"\x03" + command]]  # type: ignore[list-item]
    pdata.presentation_data_value_list.append((5, b"\x02" + b"\x08\x00\x18\x00"))
    assert theirs.decode_msg(pdata)
    expected: Any = theirs.message_to_primitive()
    for name in (
        "MessageID",
        "AffectedSOPClassUID",
        "AffectedSOPInstanceUID",
        "Priority",
        "MoveOriginatorApplicationEntityTitle",
        "MoveOriginatorMessageID",
        "_context_id",
    ):
        assert getattr(ours, name) == getattr(expected, name), name
    ours.DataSet = BytesIO(b"\x08\x00\x18\x00")
    assert ours.is_valid_request == expected.is_valid_request


@pytest.mark.parametrize(
    ("sop", "move_aet"), [("1.2.3.4", None), ("1.2.3.45", None), ("1.2.3", "PACS")]
)
def test_request_decodes_like_pynetdicom(sop: str, move_aet: str | None) -> None:
    _assert_decodes_like_pynetdicom(
        _pynetdicom_command(_request(sop, move_aet=move_aet), C_STORE_RQ)
    )


def test_other_commands_are_left_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    with pytest.raises(NotFast):
        decode_store_request(_pynetdicom_command(echo, C_ECHO_RQ))
    command = _pynetdicom_command(_request("1.2.3.4"), C_STORE_RQ)
    with pytest.raises(NotFast):  # truncated
        decode_store_request(command[:-3])
    with pytest.raises(NotFast):  # an element that is not part of a C-STORE-RQ
        decode_store_request(command + b"\x00\x00\x02\x09\x02\x00\x00\x00\x01\x00")


def test_nonconformant_uid_passes_as_in_pynetdicom() -> None:
    """pynetdicom takes a non-conformant UID with a warning; ingest refuses it (0xA900)."""
    command = _pynetdicom_command(_request("1.2.3.4"), C_STORE_RQ)
    _assert_decodes_like_pynetdicom(command.replace(b"1.2.3.4\x00", b"1.2.x.4\x00"))


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC210, 0xC000])
@pytest.mark.parametrize("sop", ["1.2.3.4", "1.2.3.45"])
def test_response_encodes_like_pynetdicom(status: int, sop: str) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = MR
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    assert encode_store_response(MR, 7, status, sop) == _pynetdicom_command(rsp, C_STORE_RSP)
    rsp.AffectedSOPInstanceUID = None
    assert encode_store_response(MR, 7, status, None) == _pynetdicom_command(rsp, C_STORE_RSP)


def test_response_pdu_encodes_like_pynetdicom() -> None:
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    command = encode_store_response(MR, 7, 0x0000, "1.2.3.4")
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((5, b"\x03" + command))
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    assert p_data_tf(5, command) == pdu.encode()


@pytest.mark.parametrize("sop", ["1.2.3.4", "1.2.3.45"])
def test_plain_request_holds_what_pynetdicom_would(sop: str) -> None:
    values = decode_store_request(_pynetdicom_command(_request(sop), C_STORE_RQ))
    plain = plain_store_request(values, 5)
    assert plain is not None
    expected = store_request_primitive(values, 5)
    for name in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority"):
        assert getattr(plain, name) == getattr(expected, name), name
    plain.DataSet = BytesIO(b"\x08\x00\x18\x00")
    real = plain.primitive()  # what goes to pynetdicom when it serves the request
    assert type(real) is C_STORE and real.is_valid_request
    assert real.AffectedSOPInstanceUID == sop and real.DataSet is plain.DataSet


def test_unusual_requests_are_not_plain() -> None:
    """Anything but the usual elements with plain values takes pynetdicom's setters."""
    moved = decode_store_request(
        _pynetdicom_command(_request("1.2.3", move_aet="PACS"), C_STORE_RQ)
    )
    assert plain_store_request(moved, 5) is None
    values = decode_store_request(_pynetdicom_command(_request("1.2.3.4"), C_STORE_RQ))
    for element, value in (
        (0x1000, b"1.2.x.4\x00"),  # not digits and dots: pynetdicom warns, ingest refuses
        (0x1000, b"1." + b"2" * 70),  # longer than 64: pynetdicom's setter refuses
        (0x1000, b"\x00\x00"),  # empty once unpadded
        (0x0700, b"\x03\x00"),  # Priority 3
    ):
        assert plain_store_request({**values, element: value}, 5) is None, (element, value)
    assert plain_store_request({k: v for k, v in values.items() if k != 0x0700}, 5) is None


@pytest.mark.parametrize(
    "items",
    [
        [(1, b"\x03" + b"\x00" * 10)],
        [(1, b"\x00" + b"x" * 5), (3, b"\x02" + b"y" * 1000)],
        [(1, b"\x02")],  # a control header only
        [],
    ],
)
def test_pdu_items_split_as_pynetdicom_splits_them(items: list[tuple[int, bytes]]) -> None:
    from pynetdicom.pdu import P_DATA_TF

    body = b"".join((len(data) + 1).to_bytes(4, "big") + bytes([cid]) + data for cid, data in items)
    pdu = bytes([0x04, 0]) + len(body).to_bytes(4, "big") + body
    theirs = P_DATA_TF()
    theirs.decode(pdu)
    expected = theirs.to_primitive().presentation_data_value_list
    assert presentation_data_values(body) == [(cid, bytes(data)) for cid, data in expected]


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00\x00\x01",  # an item of length 0
        b"\x00\x00\x00\x09\x01\x02ab",  # an item longer than the PDU
        b"\x00\x00\x00",  # a truncated item length
    ],
)
def test_broken_pdu_items_are_refused_as_pynetdicom_refuses_them(body: bytes) -> None:
    from pynetdicom.pdu import P_DATA_TF

    with pytest.raises((AssertionError, struct.error)):
        P_DATA_TF().decode(bytes([0x04, 0]) + len(body).to_bytes(4, "big") + body)
    assert presentation_data_values(body) is None
