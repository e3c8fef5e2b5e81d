"""One peer allowlist rule (core/peers.py) for both network ways in: the DICOM SCP and the HL7
listener. Empty = loopback only; addresses or CIDR networks otherwise."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import pytest

from core.peers import parse_allowlist, peer_allowed
from core.settings import DicomSettings, Hl7Settings
from dicom_node.scp import StorageSCP, StoreHandler, peer_refusal
from ris.hl7_listener import Hl7Listener
from store.index import Index
from store.spool import Spool
from tests.conftest import free_port, require_tool

from .hl7_peers import orm_o01, segment, send

CASES = [
    ([], "127.0.0.1", True),
    ([], "127.9.8.7", True),
    ([], "::1", True),
    ([], "::ffff:127.0.0.1", True),
    ([], "192.0.2.2", False),
    ([], "fd00::2", False),
    ([], "::ffff:10.0.0.1", False),
    ([], "ris.example", False),
    (["10.1.0.0/16", "192.0.2.7"], "10.1.200.3", True),
    (["10.1.0.0/16", "192.0.2.7"], "::ffff:10.1.0.9", True),
    (["10.1.0.0/16", "192.0.2.7"], "192.0.2.7", True),
    (["10.1.0.0/16", "192.0.2.7"], "192.0.2.8", False),
    (["10.1.0.0/16"], "127.0.0.1", False),  # a list replaces loopback
    (["fd00::/8"], "fd00::2%eth0", True),
]


@pytest.mark.parametrize(("allowlist", "address", "admitted"), CASES)
def test_one_rule_for_dicom_and_hl7(allowlist: list[str], address: str, admitted: bool) -> None:
    assert peer_allowed(address, allowlist) is admitted
    dicom = DicomSettings(allowed_hosts=allowlist)
    assert (peer_refusal(dicom, address) is None) is admitted
    hl7 = Hl7Settings(allowed_hosts=allowlist)
    assert peer_allowed(address, hl7.allowed_hosts) is admitted


def test_calling_ae_titles_never_open_the_port_and_hl7_default_is_empty() -> None:
    aets = DicomSettings(allowed_calling_aets=["PACS"])
    assert not aets.open_beyond_loopback
    assert peer_refusal(aets, "203.0.113.9") is not None
    assert Hl7Settings().allowed_hosts == []
    with pytest.raises(ValueError, match="not an IP address or network"):
        parse_allowlist(["ris.example"])


def _own_address() -> str:
    """This host's non-loopback address (the peer address a connection to it comes from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            address = str(s.getsockname()[0])
        except OSError:
            address = ""
    if not address or address.startswith("127."):
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    return address


@pytest.mark.integration
def test_hl7_listener_with_empty_allowlist_refuses_a_non_loopback_peer(tmp_path: Path) -> None:
    own = _own_address()
    index = Index(f"sqlite:///{tmp_path}/index.db")
    settings = Hl7Settings(bind_address="0.0.0.0")
    with Hl7Listener(index, settings, port=0) as server:
        (ack,) = send(server.port, orm_o01("M1", "PLC1"))  # loopback: admitted
        assert segment(ack, "MSA")[1] == "AA"
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            _send_to(own, server.port, orm_o01("M2", "PLC2"))
    with Hl7Listener(index, Hl7Settings(bind_address="0.0.0.0", allowed_hosts=[own])) as opened:
        (ack,) = _send_to(own, opened.port, orm_o01("M3", "PLC3"))
        assert segment(ack, "MSA")[1] == "AA"


def _send_to(host: str, port: int, message: str) -> list[str]:
    from hl7.mllp import open_hl7_connection

    async def go() -> list[str]:
        reader, writer = await open_hl7_connection(host, port)
        try:
            writer.writemessage(message)  # type: ignore[arg-type]
            await writer.drain()
            return [str(await asyncio.wait_for(reader.readmessage(), 10))]
        finally:
            writer.close()

    return asyncio.run(go())


@pytest.mark.integration
def test_dicom_scp_with_empty_allowlist_refuses_a_non_loopback_peer(tmp_path: Path) -> None:
    own = _own_address()
    exe = require_tool("echoscu")
    settings = DicomSettings(port=free_port(), bind_address="0.0.0.0", low_water_mark_mb=0)
    index = Index(f"sqlite:///{tmp_path}/index.db")
    scp = StorageSCP(settings, StoreHandler(Spool(tmp_path / "var", 0), index))
    scp.start()
    try:

        def echo(host: str) -> subprocess.CompletedProcess[str]:
            cmd = [exe, "-aet", "PACS", "-aec", "RADTRIAGE", host, str(settings.port)]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

        assert echo("127.0.0.1").returncode == 0
        refused = echo(own)
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stderr + refused.stdout
    finally:
        scp.stop()
