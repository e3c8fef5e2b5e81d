"""The remembered UID setter answers as pynetdicom's own, and asks it again for anything that
is not a plain accepted UID."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import UID
from pynetdicom import _config, utils
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation

from dicom_node import uid_memo

VALUES: list[Any] = [
    "1.2.840.10008.5.1.4.1.1.4",
    b"1.2.840.10008.1.2.1\x00",
    UID("1.2.840.10008.1.2"),
    "",
    b"",
    None,
    "1.02.3",  # valid characters, not conformant (leading zero)
    "1.2.abc",
    "1." + "2" * 70,
    b"1.2.\xff",
    42,
]


@pytest.fixture
def memo() -> Iterator[None]:
    uid_memo.install()
    uid_memo._remembered.clear()
    yield
    uid_memo.uninstall()


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except Exception as exc:  # the same type and message are expected from both
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("value", VALUES, ids=repr)
@pytest.mark.parametrize("enforce", [False, True])
def test_same_answer_as_pynetdicom_every_time(
    memo: None, value: Any, enforce: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "ENFORCE_UID_CONFORMANCE", enforce)
    for flags in [(), (False,), (True, False), (True, True, False)]:
        expected = _outcome(utils.set_uid, value, "Name", *flags)
        for _ in range(2):  # the second answer may come from the memo
            got = _outcome(uid_memo.remembered_set_uid, value, "Name", *flags)
            assert got == expected
            if got[0] == "ok" and got[1] is not None:
                assert type(got[1]) is UID


def test_accepted_values_are_remembered_refused_ones_are_not(
    memo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "ENFORCE_UID_CONFORMANCE", True)  # "1.2.abc" refused
    calls: list[Any] = []
    original = uid_memo._original

    def counting(value: Any, *args: Any) -> Any:
        calls.append(value)
        return original(value, *args)

    monkeypatch.setattr(uid_memo, "_original", counting)
    for _ in range(3):
        uid_memo.remembered_set_uid("1.2.840.10008.1.2.1", "Transfer Syntax Name")
        with pytest.raises(ValueError):
            uid_memo.remembered_set_uid("1.2.abc", "Transfer Syntax Name")
    assert calls.count("1.2.840.10008.1.2.1") == 1
    assert calls.count("1.2.abc") == 3


def test_non_conformant_values_are_still_logged_each_time(
    memo: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    for _ in range(2):
        uid_memo.remembered_set_uid("1.02.3", "Abstract Syntax Name")
    warnings = [r for r in caplog.records if "Non-conformant" in r.getMessage()]
    assert len(warnings) == 2


def test_a_changed_validator_is_asked(memo: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert uid_memo.remembered_set_uid("1.2.3", "SOP Class UID") == "1.2.3"
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (False, "refused by site"))
    with pytest.raises(ValueError, match="refused by site"):
        uid_memo.remembered_set_uid("1.2.3", "SOP Class UID")


def test_the_memo_is_bounded(memo: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uid_memo, "MAX_REMEMBERED", 50)
    for i in range(175):
        assert uid_memo.remembered_set_uid(f"1.2.826.0.1.{i}", "UID") == f"1.2.826.0.1.{i}"
        assert len(uid_memo._remembered) <= 50
    assert uid_memo._remembered  # still remembering after a restart


def _request_pdu() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "STORESCU"
    primitive.called_ae_title = "RADTRIAGE"
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 11112)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 104)
    contexts = []
    for i, sop_class in enumerate(["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2"]):
        context = build_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        context.context_id = 2 * i + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    primitive.maximum_length_received = 16382
    primitive.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2.0.0"
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _decoded(raw: bytes) -> list[tuple[str, list[str]]]:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(raw)
    primitive = pdu.to_primitive()
    return [
        (str(c.abstract_syntax), [str(t) for t in c.transfer_syntax])
        for c in primitive.presentation_context_definition_list
    ]


def test_an_association_request_decodes_the_same_with_the_memo() -> None:
    raw = _request_pdu()
    plain = _decoded(raw)
    uid_memo.install()
    try:
        assert _decoded(raw) == plain == _decoded(raw)
        assert uid_memo._remembered  # the memo served the second decode
    finally:
        uid_memo.uninstall()
    assert len(plain) == 2 and plain[0][1] == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
