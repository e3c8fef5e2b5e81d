"""Fuzz campaign against the live HL7 listener (issue 23: 10,000 messages, 0 crashes, 0 hangs,
every message ACKed AA/AE/AR, memory bounded under 100 parallel connections).

Starts the node's order listener (`ris.hl7_listener.Hl7Listener`, default settings but a
connection cap of 128) in a process of its own over a fresh SQLite index, and sends it
Hypothesis-generated messages over MLLP on loopback:

- **valid** ORM^O01 / OMI^O23 with hostile field values (delimiters, escapes, unicode, NULs,
  values over the columns' 64 characters, SQL and path fragments, bad dates and numbers);
- **mutations** of those: segments deleted, duplicated, swapped or renamed, fields replaced
  by random text, encoding characters changed, random insertions, truncation, repetitions and
  components by the thousand, MSH-9/11/12 changed;
- **random structure**: random segment names and fields, random text.

The MLLP framing bytes (0x0B, 0x1C) are removed from messages (framing is the transport's
business, not the message's). Checks, per message: the listener process is alive, an answer
came back on the connection within `CASE_TIMEOUT_S`, and it is an ACK whose MSA-1 is AA, AE
or AR. Then 100 connections at once each send `PARALLEL_MESSAGES` large (about 200 KB)
messages while the listener's resident memory is sampled.

Run (the 10,000-message campaign recorded in docs/reliability.md)::

    .venv/bin/python -m tests.campaigns.fuzz_hl7 --cases 10000

The fast suite runs `run_campaign` with a few hundred (tests/dicom_node/test_fuzz_hl7.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.campaigns.live_process import CampaignFailure, LiveProcess
from tests.dicom_node.hl7_peers import omi_o23, orm_o01

CASE_TIMEOUT_S = 15.0
RSS_BOUND_MB = 150.0  # growth over the listener's resident memory at start
PARALLEL_CONNECTIONS = 100
PARALLEL_MESSAGES = 2
VB, FS, CR = b"\x0b", b"\x1c", b"\r"


@dataclass
class Stats:
    cases: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    acks: Counter[str] = field(default_factory=Counter)  # MSA-1
    errors: Counter[str] = field(default_factory=Counter)  # ERR code of AE/AR
    crashes: int = 0
    hangs: int = 0
    reconnects: int = 0
    max_answer_s: float = 0.0
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    parallel_acks: int = 0
    parallel_rss_peak_mb: float = 0.0


# --- the listener under test -------------------------------------------------------------------


def serve(database_url: str) -> None:
    """The listener process: prints ``READY <port>`` and serves until SIGTERM."""
    from core.settings import Hl7Settings
    from ris.hl7_listener import Hl7Listener
    from store.index import Index

    settings = Hl7Settings(max_connections=128)
    listener = Hl7Listener(Index(database_url), settings, port=0)
    listener.start()
    print(f"READY {listener.port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    listener.stop()


class LiveListener(LiveProcess):
    """The HL7 listener (`serve` above) in a process of its own."""

    def __init__(self, root: Path) -> None:
        url = f"sqlite:///{root / 'index.db'}"
        argv = [sys.executable, "-m", "tests.campaigns.fuzz_hl7", "--serve", url]
        super().__init__(argv, root / "listener.log", "listener")
        self.port = int(self.ready.split()[1])


# --- messages ----------------------------------------------------------------------------------

HOSTILE = [
    "A" * 65,
    "9" * 400,
    "X" * 5000,
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "'; DROP TABLE orders;--",
    "\\E\\\\F\\\\S\\\\X0D\\\\H\\",
    "\\X00\\",
    "\x00\x01\x7f",
    "%s%n%x",
    "20261399",
    "99999999999999999999",
    "-1e309",
    "nan",
    "\u202e\u0645\u0631\u062d\u0628\u0627",
    "\U0001f600" * 40,
    "~" * 3000,
    "^" * 3000,
    "&" * 3000,
    "",
]
text_values = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="ascii"), max_size=80),
    st.sampled_from(HOSTILE),
)
safe_values = st.text(st.characters(codec="ascii", exclude_characters="|^~\\&\r\n"), max_size=20)


def _value(draw: Any, default: str, *choices: str) -> str:
    """Mostly `default` (or one of `choices`), one time in four a hostile value."""
    if draw(st.integers(0, 3)) == 0:
        return str(draw(text_values))
    return str(draw(st.sampled_from([default, *choices])))


@st.composite
def valid_messages(draw: Any) -> str:
    n = draw(st.integers(0, 10**9))
    values = {
        "control": _value(draw, "NW", "NW", "XO", "CA"),
        "patient_id": _value(draw, f"PAT{n % 1000}"),
        "issuer": _value(draw, "HOSP", ""),
        "accession": _value(draw, f"ACC{n}"),
        "priority": _value(draw, "R", "S", "A", "P", "C", "T", ""),
        "request_date": _value(draw, "20261120", "20261201", ""),
    }
    psa = None if draw(st.booleans()) else _value(draw, "7.2", "0", "9999.9")
    control_id, placer = _value(draw, f"F{n}"), _value(draw, f"PLC{n}")
    if draw(st.booleans()):
        return orm_o01(
            control_id,
            placer,
            reason=_value(draw, "", "2WW", "USC"),
            version=_value(draw, "2.3", "2.3.1", "2.4", "2.5", "2.5.1"),
            psa=psa,
            **values,
        )
    uid = _value(draw, "", f"2.25.{n}")
    return omi_o23(control_id, placer, study_uid=uid, psa=psa, **values)


@st.composite
def mutated_messages(draw: Any) -> str:
    segments = draw(valid_messages()).rstrip("\r").split("\r")
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(
            ["delete", "duplicate", "swap", "rename", "field", "encoding", "insert", "truncate",
             "repeat", "msh", "newlines"]
        ))  # fmt: skip
        if not segments:
            segments = ["MSH"]
        i = draw(st.integers(0, len(segments) - 1))
        seg = segments[i]
        if op == "delete":
            segments.pop(i)
        elif op == "duplicate":
            segments.insert(i, seg)
        elif op == "swap":
            j = draw(st.integers(0, len(segments) - 1))
            segments[i], segments[j] = segments[j], segments[i]
        elif op == "rename":
            segments[i] = (
                draw(st.sampled_from(["ZZZ", "MSH", "ORC", "OBR", "PID", "", "M"])) + seg[3:]
            )
        elif op == "field":
            parts = seg.split("|")
            k = draw(st.integers(0, len(parts)))
            value = draw(text_values)
            if k < len(parts):
                parts[k] = value
            else:
                parts.extend([""] * draw(st.integers(0, 30)) + [value])
            segments[i] = "|".join(parts)
        elif op == "encoding" and segments[0].startswith("MSH"):
            chars = draw(st.text(min_size=0, max_size=6))
            segments[0] = "MSH" + chars + segments[0][8:]
        elif op == "insert":
            k = draw(st.integers(0, len(seg)))
            segments[i] = seg[:k] + draw(text_values) + seg[k:]
        elif op == "truncate":
            segments[i] = seg[: draw(st.integers(0, len(seg)))]
        elif op == "repeat":
            unit = draw(st.sampled_from(["~", "^", "&", "|", "~A^B&C"]))
            segments[i] = seg + unit * draw(st.integers(100, 20000))
        elif op == "msh" and segments[0].startswith("MSH"):
            parts = segments[0].split("|")
            k = draw(st.sampled_from([8, 9, 10, 11]))
            if k < len(parts):
                parts[k] = draw(st.one_of(text_values, st.sampled_from(
                    ["ADT^A01", "ORM^O01", "OMI^O23^OMI_O23", "T", "D", "2.2", "2.8", "ACK"]
                )))  # fmt: skip
            segments[0] = "|".join(parts)
        elif op == "newlines":
            segments[i] = seg.replace("|", "\n|", draw(st.integers(1, 3)))
    return "\r".join(segments) + "\r"


@st.composite
def random_messages(draw: Any) -> str:
    if draw(st.booleans()):
        return draw(st.text(max_size=2000))
    names = st.one_of(
        st.sampled_from(["MSH", "PID", "PV1", "ORC", "OBR", "TQ1", "OBX", "IPC", "NTE", "EVN"]),
        st.text(st.characters(codec="ascii"), min_size=0, max_size=4),
    )
    segments = []
    for _ in range(draw(st.integers(1, 30))):
        fields_ = draw(st.lists(text_values, max_size=30))
        segments.append("|".join([draw(names), *fields_]))
    if draw(st.booleans()):
        segments.insert(0, "MSH|^~\\&|RIS|HOSP|RADTRIAGE|HOSP|20261201||ORM^O01|F1|P|2.3")
    return "\r".join(segments) + "\r"


cases = st.one_of(
    valid_messages().map(lambda m: ("valid", m)),
    mutated_messages().map(lambda m: ("mutated", m)),
    random_messages().map(lambda m: ("random", m)),
)


def _frame(message: str) -> bytes:
    data = message.encode("utf-8", errors="surrogatepass")
    data = data.replace(VB, b"").replace(FS, b"")[:900_000]
    return VB + data + FS + CR


# --- sending -----------------------------------------------------------------------------------


class Client:
    """One MLLP connection, reopened when the listener closes it."""

    def __init__(self, port: int, stats: Stats) -> None:
        self.port, self.stats = port, stats
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=CASE_TIMEOUT_S)
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(self, frame: bytes) -> bytes | None:
        """Send one framed message; the answer's payload, or None when the connection closed
        without one. A timeout raises `CampaignFailure` (a hang)."""
        sock = self._connect()
        started = time.monotonic()
        try:
            sock.sendall(frame)
            buffer = b""
            while FS not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    self.close()
                    return None
                buffer += chunk
        except TimeoutError as exc:
            self.stats.hangs += 1
            raise CampaignFailure(f"no answer within {CASE_TIMEOUT_S} s") from exc
        except ConnectionError:
            self.close()
            return None
        self.stats.max_answer_s = max(self.stats.max_answer_s, time.monotonic() - started)
        return buffer[buffer.index(VB) + 1 : buffer.index(FS)]


def check_ack(payload: bytes, stats: Stats) -> None:
    text = payload.decode("utf-8", errors="replace")
    lines = [line for line in text.replace("\n", "\r").split("\r") if line]
    msa = next((line.split("|") for line in lines if line.startswith("MSA|")), None)
    if not lines or not lines[0].startswith("MSH|") or msa is None:
        raise CampaignFailure(f"answer is not an ACK: {text[:200]!r}")
    if msa[1] not in ("AA", "AE", "AR"):
        raise CampaignFailure(f"MSA-1 {msa[1]!r} is not AA, AE or AR")
    stats.acks[msa[1]] += 1
    err = next((line for line in lines if line.startswith("ERR|")), "")
    code = re.search(r"(?:^|[|^])(\d{3})[&^]", err[4:])
    if code:
        stats.errors[code.group(1)] += 1
    for leak in ("Traceback", "Error:", "Exception"):
        if leak in text:
            raise CampaignFailure(f"exception text in the ACK: {text[:300]!r}")


def run_case(listener: LiveListener, client: Client, kind: str, message: str, stats: Stats) -> None:
    stats.cases += 1
    stats.kinds[kind] += 1
    payload = client.exchange(_frame(message))
    if payload is None:  # closed without an answer: allowed once, then the message must pass
        stats.reconnects += 1
        payload = client.exchange(_frame(message))
    if not listener.alive():
        stats.crashes += 1
        raise CampaignFailure("the listener process died")
    if payload is None:
        raise CampaignFailure(f"connection closed without an ACK ({kind}): {message[:200]!r}")
    check_ack(payload, stats)
    if stats.cases % 50 == 0:
        stats.rss_peak_mb = max(stats.rss_peak_mb, listener.rss_mb())


# --- 100 parallel connections ------------------------------------------------------------------


def big_message(n: int, i: int) -> str:
    """A valid ORM^O01 of about 200 KB (a long clinical history in OBR-13)."""
    message = orm_o01(f"PAR{n}-{i}", f"PAR{n}-{i}", accession=f"PA{n}-{i}")
    return message.replace("Raised PSA \\T\\ LUTS", "history " * 25_000)


async def _parallel(port: int) -> int:
    async def one(n: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        acked = 0
        try:
            for i in range(PARALLEL_MESSAGES):
                writer.write(_frame(big_message(n, i)))
                await writer.drain()
                answer = await asyncio.wait_for(reader.readuntil(FS), CASE_TIMEOUT_S * 4)
                acked += b"MSA|AA|" in answer
        finally:
            writer.close()
        return acked

    return sum(await asyncio.gather(*(one(n) for n in range(PARALLEL_CONNECTIONS))))


def run_parallel(listener: LiveListener, stats: Stats) -> None:
    import threading

    done = threading.Event()
    peak = [listener.rss_mb()]

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], listener.rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stats.parallel_acks = asyncio.run(_parallel(listener.port))
    finally:
        done.set()
        sampler.join()
    stats.parallel_rss_peak_mb = peak[0]
    expected = PARALLEL_CONNECTIONS * PARALLEL_MESSAGES
    if stats.parallel_acks != expected:
        raise CampaignFailure(f"{stats.parallel_acks} of {expected} parallel messages got AA")


def run_campaign(n_cases: int, work: Path, seed_value: int = 23) -> Stats:
    """`n_cases` generated messages, then 100 parallel connections, against a fresh live
    listener under `work`; raises `CampaignFailure` on the first broken property."""
    work.mkdir(parents=True, exist_ok=True)
    listener = LiveListener(work)
    stats = Stats()
    stats.rss_start_mb = stats.rss_peak_mb = listener.rss_mb()
    client = Client(listener.port, stats)
    try:

        @seed(seed_value)
        @settings(
            max_examples=n_cases,
            database=None,
            deadline=None,
            phases=[Phase.generate],  # a campaign reports, it does not shrink
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases)
        def campaign(case: tuple[str, str]) -> None:
            run_case(listener, client, case[0], case[1], stats)

        campaign()
        client.close()
        run_parallel(listener, stats)
        if stats.parallel_rss_peak_mb > stats.rss_start_mb + RSS_BOUND_MB:
            raise CampaignFailure(f"RSS {stats.parallel_rss_peak_mb:.0f} MB under 100 connections")
        stats.rss_end_mb = listener.rss_mb()
        if not listener.alive():
            stats.crashes += 1
            raise CampaignFailure("the listener process died")
    finally:
        client.close()
        listener.stop()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.campaigns.fuzz_hl7", description=__doc__)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the listener process itself
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="radtriage-fuzz-hl7-") as tmp:
        try:
            stats: Stats | None = run_campaign(args.cases, Path(tmp), args.seed)
            failure = None
        except Exception as exc:  # report, then fail
            stats, failure = None, f"{type(exc).__name__}: {exc}"
    result: dict[str, Any] = {
        "command": "python -m tests.campaigns.fuzz_hl7 " + " ".join(argv or sys.argv[1:]),
        "seconds": round(time.monotonic() - started, 1),
        "failure": failure,
    }
    if stats is not None:
        result.update({f.name: getattr(stats, f.name) for f in fields(stats)})
    print(json.dumps(result, indent=None if args.json else 2, default=str))
    return 1 if failure else 0


if __name__ == "__main__":
    raise SystemExit(main())
