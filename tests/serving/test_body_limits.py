"""Request-body limits (issue 23, finding 4): enforced before authentication and before the
body is read, by Content-Length and by counting a chunked body. The memory test runs the
production app in a real uvicorn process while an anonymous client sends a 1 GB body."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.index import Index
from tests.conftest import free_port
from tests.serving.workspace_helpers import add_users, client

GIB = 1 << 30


def test_content_length_above_the_limit_is_413_before_authentication(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    c = client(index)
    big = b"x" * ((1 << 20) + 1)
    for path in ("/api/login", "/api/studies/1.2.3/override", "/api/logout"):
        r = c.post(path, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, (path, r.status_code)
        assert "request body above" in r.json()["detail"]
    # under the limit the route's own checks answer (401 without credentials, 422 bad body)
    r = c.post("/api/studies/1.2.3/override", content=b"{}")
    assert r.status_code == 401


def test_chunked_body_is_counted_and_refused(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    c = client(index)

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"y" * 65536  # 2.5 MiB in all, no Content-Length

    r = c.post("/api/login", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    tokens = add_users(index)
    r = c.post(
        "/api/studies/1.2.3/override",
        content=chunks(),
        headers={"authorization": f"Bearer {tokens['radiologist']}"},
    )
    assert r.status_code == 413


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def start_server(tmp_path: Path, **config: object) -> tuple[subprocess.Popen[bytes], int]:
    """The production app in its own uvicorn process; waits for /readyz."""
    port = free_port()
    cfg = {"database_url": f"sqlite:///{tmp_path}/index.db", "port": port, **config}
    (tmp_path / "server.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.serving.http_server", str(tmp_path / "server.json")],
        cwd=Path(__file__).parents[2],
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if readyz(port) == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


def readyz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status
    finally:
        conn.close()


class RssSampler(threading.Thread):
    """Samples a process's RSS (and /readyz) every 50 ms until stopped."""

    def __init__(self, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.port = pid, port
        self.base_kb = _rss_kb(pid)
        self.peak_kb = self.base_kb
        self.ready: list[tuple[int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, _rss_kb(self.pid))
            n += 1
            if n % 4 == 0:  # /readyz five times a second, with its latency
                t = time.monotonic()
                self.ready.append((readyz(self.port), time.monotonic() - t))

    @property
    def growth_mb(self) -> float:
        return (self.peak_kb - self.base_kb) / 1024


def send_raw(port: int, head: bytes, body_bytes: int, chunked: bool) -> tuple[int, bytes]:
    """Send `head` then up to `body_bytes` of body (chunked or plain) until the server answers
    or closes; returns (bytes of body sent, what the server answered)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head)
    block = b"z" * (1 << 20)
    frame = (b"%x\r\n" % len(block)) + block + b"\r\n" if chunked else block
    sent = 0
    answer = b""
    sock.setblocking(False)
    try:
        while sent < body_bytes:
            try:
                answer += sock.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                pass
            try:
                sock.sendall(frame)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            except OSError:
                break
            sent += len(block)
        sock.setblocking(True)
        sock.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        except OSError:
            pass
    finally:
        sock.close()
    return sent, answer


@pytest.mark.integration
def test_anonymous_1_gb_body_keeps_the_server_within_100_mb(tmp_path: Path) -> None:
    proc, port = start_server(tmp_path)
    try:
        sampler = RssSampler(proc.pid, port)
        sampler.start()
        chunked = b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        chunked += b"Transfer-Encoding: chunked\r\n\r\n"
        sent_chunked, answer = send_raw(port, chunked, GIB, chunked=True)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        declared = b"POST /api/studies/1.2.3/override HTTP/1.1\r\nHost: x\r\n"
        declared += b"Content-Length: %d\r\n\r\n" % GIB
        sent_declared, answer = send_raw(port, declared, GIB, chunked=False)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        while len(sampler.ready) < 3:
            time.sleep(0.1)
        sampler.stop.set()
        sampler.join()
        print(
            f"RSS growth {sampler.growth_mb:.1f} MB; body sent before the answer: chunked "
            f"{sent_chunked >> 20} MiB, declared {sent_declared >> 20} MiB; /readyz "
            f"{[s for s, _ in sampler.ready]}, max {max(t for _, t in sampler.ready):.3f} s"
        )
        assert sampler.growth_mb < 100
        assert sampler.ready and all(status == 200 for status, _ in sampler.ready)
        assert sent_declared < GIB and sent_chunked < GIB
    finally:
        proc.terminate()
        proc.wait(10)


STOW_PART = 8 * 1024**2  # 2048 x 2048 x 16 bit


def _big_instance(tmp_path: Path) -> bytes:
    from tests.dicom_node.peers import make_mr_series

    (path,) = make_mr_series(tmp_path / "src", 1, rows=2048, columns=2048)
    return path.read_bytes()


def _stow(port: int, token: str, instance: bytes, total: int) -> tuple[int, bytes]:
    """One STOW-RS request of `total` bytes (the same instance, part after part), streamed
    from a constant buffer; returns (bytes sent, the answer)."""
    boundary = b"stowmemorytest"
    part = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + instance + b"\r\n"
    n = total // len(part)
    end = b"--" + boundary + b"--\r\n"
    head = (
        b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n"
        b'Content-Type: multipart/related; type="application/dicom"; boundary=' + boundary + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % (n * len(part) + len(end))
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    try:
        sock.sendall(head)
        for _ in range(n):
            sock.sendall(part)
        sock.sendall(end)
        answer = b""
        while True:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
            if b"\r\n\r\n" in answer:
                head_, _, rest = answer.partition(b"\r\n\r\n")
                length = next(
                    (int(h.split(b":")[1]) for h in head_.split(b"\r\n")
                     if h.lower().startswith(b"content-length")), 0,
                )  # fmt: skip
                if len(rest) >= length:
                    break
    finally:
        sock.close()
    return n * len(part), answer


@pytest.mark.integration
def test_two_concurrent_1_gb_stow_requests_keep_the_server_within_100_mb(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path}/index.db")
    tokens = add_users(index)
    index.close()
    instance = _big_instance(tmp_path)
    proc, port = start_server(tmp_path, spool=str(tmp_path / "var"), http={"stow": True})
    try:
        sampler = RssSampler(proc.pid, port)
        sampler.start()
        started = time.monotonic()
        results: list[tuple[int, bytes]] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(_stow(port, tokens["integrator"], instance, GIB))
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        seconds = time.monotonic() - started
        sampler.stop.set()
        sampler.join()
        assert len(results) == 2
        for sent, answer in results:
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
            assert sent > 0.99 * GIB
        worst = max(t for _, t in sampler.ready)
        print(
            f"2 x 1 GiB STOW-RS in {seconds:.0f} s; RSS growth {sampler.growth_mb:.1f} MB "
            f"(base {sampler.base_kb / 1024:.0f} MB); /readyz {len(sampler.ready)} checks, "
            f"all {set(s for s, _ in sampler.ready)}, slowest {worst:.3f} s"
        )
        assert sampler.growth_mb < 100
        assert sampler.ready and all(status == 200 for status, _ in sampler.ready)
        assert worst < 2.0  # the event loop kept answering
    finally:
        proc.terminate()
        proc.wait(10)
