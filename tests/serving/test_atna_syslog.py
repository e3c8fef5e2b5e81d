"""ATNA out against a real rsyslog on loopback (its own config, started by the test): audit
events arrive as DICOM audit messages over TCP, TLS (RFC 5425, with a test CA and client
certificates) and UDP; an outage of the receiver, with our sender restarted meanwhile, loses
nothing; a receiver with a certificate we do not trust gets nothing and the events wait."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from store.index import Index
from tests.conftest import require_tool
from tests.serving.atna_checks import check_audit_message
from workspace.atna import AuditSource
from workspace.audit import AuditAnchor, AuditTrail
from workspace.syslog_sender import AuditForwarder, SyslogTarget, tls_context

pytestmark = pytest.mark.integration

SD = re.compile(rb'\[radtriage@32473 event="(\d+)" hash="([0-9a-f]{64})" mac="([0-9a-f]*)"\]')


@dataclass
class Receiver:
    """One rsyslogd with its own config, writing each message's raw text to `out`."""

    conf: Path
    out: Path
    pidfile: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        rsyslogd = require_tool("rsyslogd")
        self.pidfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [rsyslogd, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not self.pidfile.exists():  # written once the inputs listen
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rsyslogd did not start: {self.proc.stderr.read()!r}")
            time.sleep(0.05)
        time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # rsyslog flushes its queue and closes
            self.proc.wait(10)
        self.proc = None

    def messages(self) -> list[bytes]:
        if not self.out.exists():
            return []
        return [line for line in self.out.read_bytes().split(b"\n") if line.strip()]

    def event_ids(self) -> list[int]:
        return [int(m.group(1)) for line in self.messages() if (m := SD.search(line))]


def _certificates(tmp_path: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate."""
    now = dt.datetime.now(dt.UTC)

    def make(name: str, issuer_key, issuer_name, ca: bool, usage, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    files: dict[str, Path] = {}

    def write(name: str, key, cert) -> None:
        files[f"{name}_key"] = tmp_path / f"{name}.key"
        files[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files[f"{name}_cert"] = tmp_path / f"{name}.pem"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key, ca = make("radtriage test CA", None, None, True, None)
    write("ca", ca_key, ca)
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    write(
        "server",
        *make("127.0.0.1", ca_key, ca.subject, False, ExtendedKeyUsageOID.SERVER_AUTH, san),
    )
    write("client", *make("radtriage", ca_key, ca.subject, False, ExtendedKeyUsageOID.CLIENT_AUTH))
    other_key, other = make("another CA", None, None, True, None)
    write("other_ca", other_key, other)
    return files


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def make(transport: str, port: int, certs: dict[str, Path] | None = None) -> Receiver:
        work = tmp_path / f"rsyslog-{transport}-{port}"
        work.mkdir()
        out = work / "audit.log"
        if transport == "tcp":
            inputs = 'module(load="imptcp")\n'
            inputs += f'input(type="imptcp" port="{port}" address="127.0.0.1" ruleset="atna")\n'
        elif transport == "udp":
            inputs = 'module(load="imudp")\n'
            inputs += f'input(type="imudp" port="{port}" address="127.0.0.1" ruleset="atna")\n'
        else:
            assert certs is not None
            inputs = (
                'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" '
                'StreamDriver.AuthMode="x509/certvalid")\n'
                f'input(type="imtcp" port="{port}" address="127.0.0.1" ruleset="atna")\n'
            )
        tls = (
            f'DefaultNetstreamDriverCAFile="{certs["ca_cert"]}" '
            f'DefaultNetstreamDriverCertFile="{certs["server_cert"]}" '
            f'DefaultNetstreamDriverKeyFile="{certs["server_key"]}" '
            if certs
            else ""
        )
        conf = work / "rsyslog.conf"
        conf.write_text(
            f'global(workDirectory="{work}" maxMessageSize="64k" {tls})\n'
            + inputs
            + 'template(name="raw" type="string" string="%rawmsg%\\n")\n'
            + f'ruleset(name="atna") {{ action(type="omfile" file="{out}" template="raw") }}\n'
        )
        r = Receiver(conf, out, work / "rsyslogd.pid")
        r.start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


@pytest.fixture
def trail(tmp_path: Path) -> AuditTrail:
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    anchor = AuditAnchor.load(tmp_path / "audit.key", tmp_path / "head.json", create=True)
    assert anchor is not None
    return AuditTrail(index.engine, anchor)


def _forwarder(trail: AuditTrail, url: str, **kw) -> AuditForwarder:
    forwarder = AuditForwarder(
        trail,
        SyslogTarget.parse(url),
        AuditSource("RADTRIAGE", "localhost", "Test Hospital"),
        patient_of=lambda uid: "P-" + uid[-1],
        settle_s=0.5,
        poll_s=0.2,
        initial_backoff_s=0.1,
        max_backoff_s=0.5,
        **kw,
    )
    forwarder.start()
    return forwarder


def _append_some(trail: AuditTrail, n: int, start: int = 0) -> list[int]:
    actions = ["login", "view_study", "qido", "override", "login_failed", "user_added", "wado"]
    ids = []
    for i in range(start, start + n):
        action = actions[i % len(actions)]
        event = trail.append(
            action,
            user="rita",
            role="radiologist",
            study_instance_uid=None if action in ("login", "qido", "login_failed") else f"1.2.{i}",
            address="127.0.0.1",
            detail={"query": "PatientID=P1"} if action == "qido" else {"name": "ann", "i": i},
        )
        ids.append(event["id"])
    return ids


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def _check_stream(receiver: Receiver, trail: AuditTrail) -> None:
    """Every received message: RFC 5424 header, A.5 XML, the event's hash and MAC."""
    events = {e["id"]: e for e in trail.after(0, 1000)}
    for line in receiver.messages():
        header, _, xml = line.partition(b"\xef\xbb\xbf")
        assert re.match(rb"<8[45]>1 \S+Z localhost radtriage - IHE\+RFC-3881 \[", header)
        m = SD.search(header)
        event = events[int(m.group(1))]
        assert m.group(2).decode() == event["hash"] and m.group(3).decode() == event["mac"]
        check_audit_message(xml)


def test_events_arrive_over_tcp(receiver, trail: AuditTrail, port: int) -> None:
    r = receiver("tcp", port)
    forwarder = _forwarder(trail, f"tcp://127.0.0.1:{port}")
    try:
        ids = _append_some(trail, 14)
        _wait_for(lambda: sorted(set(r.event_ids())) == ids)
        _wait_for(lambda: forwarder.backlog() == 0)
    finally:
        forwarder.stop()
    _check_stream(r, trail)
    assert r.event_ids() == ids  # in order, once each while the receiver stayed up


def test_outage_and_sender_restart_lose_nothing(receiver, trail: AuditTrail, port: int) -> None:
    r = receiver("tcp", port)
    forwarder = _forwarder(trail, f"tcp://127.0.0.1:{port}")
    before = _append_some(trail, 5)
    _wait_for(lambda: set(r.event_ids()) >= set(before))
    r.stop()  # the audit repository goes away
    during = _append_some(trail, 10, start=5)
    time.sleep(1.5)
    assert forwarder.failures >= 1 and forwarder.backlog() >= 10
    forwarder.stop()  # and radtriage restarts meanwhile: the queue is the database
    forwarder = _forwarder(trail, f"tcp://127.0.0.1:{port}")
    during += _append_some(trail, 3, start=15)
    time.sleep(0.5)
    r.start()  # back, same port, same file
    try:
        _wait_for(lambda: set(r.event_ids()) == set(before + during), timeout_s=30)
        _wait_for(lambda: forwarder.backlog() == 0)
    finally:
        forwarder.stop()
    _check_stream(r, trail)
    received = r.event_ids()
    assert sorted(set(received)) == before + during  # nothing lost
    assert len(received) - len(set(received)) <= 5  # resends after the drop are few


def test_two_nodes_on_one_index_send_each_event_once(
    receiver, trail: AuditTrail, port: int
) -> None:
    """Two senders (two nodes sharing the index) for one destination: one holds it, the other
    takes over when it stops; every event arrives, none twice while the receiver stays up."""
    r = receiver("tcp", port)
    url = f"tcp://127.0.0.1:{port}"
    first = _forwarder(trail, url, lease_s=1.5)
    second = _forwarder(AuditTrail(trail.engine, trail.anchor), url, lease_s=1.5)
    try:
        ids = _append_some(trail, 6)
        _wait_for(lambda: sorted(set(r.event_ids())) == ids)
        time.sleep(1.0)
        assert sorted((first.sent, second.sent)) == [0, 6]
        holder, waiting = (first, second) if first.sent else (second, first)
        holder.stop()
        ids += _append_some(trail, 4, start=6)
        _wait_for(lambda: sorted(set(r.event_ids())) == ids)
        assert waiting.sent == 4
    finally:
        first.stop()
        second.stop()
    assert r.event_ids() == ids


def test_tls_with_client_certificate(receiver, trail: AuditTrail, port: int, tmp_path) -> None:
    certs = _certificates(tmp_path)
    r = receiver("tls", port, certs)
    context = tls_context(certs["ca_cert"], certs["client_cert"], certs["client_key"], True)
    forwarder = _forwarder(trail, f"tls://127.0.0.1:{port}", tls=context)
    try:
        ids = _append_some(trail, 8)
        _wait_for(lambda: sorted(set(r.event_ids())) == ids)
    finally:
        forwarder.stop()
    _check_stream(r, trail)


def test_tls_receiver_we_do_not_trust_gets_nothing(
    receiver, trail: AuditTrail, port: int, tmp_path
) -> None:
    certs = _certificates(tmp_path)
    r = receiver("tls", port, certs)
    wrong = tls_context(certs["other_ca_cert"], certs["client_cert"], certs["client_key"], True)
    forwarder = _forwarder(trail, f"tls://127.0.0.1:{port}", tls=wrong)
    try:
        _append_some(trail, 3)
        _wait_for(lambda: forwarder.failures >= 2)
        assert r.event_ids() == [] and forwarder.backlog() == 3
    finally:
        forwarder.stop()


def test_events_arrive_over_udp(receiver, trail: AuditTrail, port: int) -> None:
    r = receiver("udp", port)
    forwarder = _forwarder(trail, f"udp://127.0.0.1:{port}")
    try:
        ids = _append_some(trail, 6)
        _wait_for(lambda: sorted(set(r.event_ids())) == ids)
    finally:
        forwarder.stop()
    _check_stream(r, trail)


def test_serve_sends_its_audit_to_rsyslog(receiver, tmp_path: Path, port: int) -> None:
    """`radtriage serve --local` with ``[audit] syslog``: start, a sign-in and stop arrive as
    A.5 messages; the key file is private and `audit verify` passes on the anchored chain."""
    import json
    import os
    import sys
    import urllib.request

    from cli.demo import create_demo_user, wait_ready, write_config
    from cli.demo.pacs import free_port
    from cli.main import main
    from tests.conftest import REPO

    r = receiver("tcp", port)
    var = tmp_path / "var"
    var.mkdir()
    config = tmp_path / "radtriage.toml"
    http_port = free_port()
    write_config(config, var, free_port(), http_port, "PACS", free_port())
    with config.open("a") as f:
        f.write(f'\n[audit]\nsyslog = "tcp://127.0.0.1:{port}"\nenterprise_site_id = "Test"\n')
    login = create_demo_user(f"sqlite:///{var}/radtriage.db")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--config", str(config), "--local"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{http_port}"
        wait_ready(base, proc, log, timeout=180)
        request = urllib.request.Request(
            base + "/api/login",
            data=json.dumps({"name": login.name, "password": login.password}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    _wait_for(lambda: len(r.messages()) >= 3, timeout_s=10)
    kinds = []
    for line in r.messages():
        root = check_audit_message(line.partition(b"\xef\xbb\xbf")[2])
        ident = root.find("EventIdentification")
        kinds.append(
            (ident.find("EventID").get("csd-code"), ident.find("EventTypeCode").get("csd-code"))
        )
    assert kinds == [("110100", "110120"), ("110114", "110122"), ("110100", "110121")]
    assert stat_mode(var / "audit.key") == 0o600
    assert main(["audit", "verify", "--config", str(config)]) == 0


def stat_mode(path: Path) -> int:
    import stat

    return stat.S_IMODE(path.stat().st_mode)
