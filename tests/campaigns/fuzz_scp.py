"""Fuzz campaign against the live Storage SCP (issue 12, item 3).

Starts a real DICOM node (``python -m dicom_node.node``, the process ``radtriage serve`` runs
for DICOM, default settings) and sends it Hypothesis-generated hostile input over TCP:

- **raw PDUs** (no association or after one): random bytes, unknown PDU types, lying length
  fields, truncated PDUs, mutated A-ASSOCIATE-RQs, P-DATA-TF PDUs beyond the negotiated
  maximum (up to 4 GiB claimed), broken PDV items. The client half-closes after sending, so a
  correct SCP answers and closes at once;
- **malformed data sets** in C-STOREs over valid associations: truncated elements, wrong VRs,
  undefined lengths, sequences nested up to 3,000 deep, values up to 8 MiB or claiming 2 GiB,
  bad pixel data, hostile UIDs (path traversal, absolute paths, 65+ characters, NULs, unicode),
  random bytes.

Checks, per case: the node and its receiver processes (``dicom.workers = 2``) are alive and
none was restarted, it answered or closed within `CASE_TIMEOUT_S`, their resident memory stays
below the bound, and every C-STORE was either acknowledged (and the
file is then in the spool) or refused with a failure status and quarantined with a reason
sidecar; 0xC000 (our own failure) fails the campaign. Every `GOOD_EVERY` cases a valid instance
is sent and must be stored. At the end every acknowledged instance must be in the index.

Run (the 10,000-case campaign recorded in docs/reliability.md)::

    flock /tmp/radtriage-heavy.lock .venv/bin/python -m tests.campaigns.fuzz_scp --cases 10000

The fast suite runs `run_campaign` with a few hundred cases (tests/dicom_node/test_fuzz_scp.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.campaigns import dicom_wire as wire
from tests.campaigns.live_process import CampaignFailure, LiveProcess
from tests.campaigns.load_ingest import process_tree

CASE_TIMEOUT_S = 15.0
GOOD_EVERY = 25
RSS_BOUND_MB = 400.0  # over the node's resident memory at start
MAX_PDU = 131072  # the default dicom.max_pdu_size, which the campaign leaves as it is

HOSTILE_UIDS = [
    b"../../x",
    b"/etc/passwd",
    b"..",
    b".",
    b"1.2.3/../../4",
    b"1.2.840.10008.5.1.4.1.1.4\x00\x00",
    b"1.2\x00.3",
    b"1." + b"2" * 70,
    b"1.2." + b"3" * 62,
    b"1.02.3",
    b"1..2",
    b".1.2",
    b"1.2.",
    "1.2.\u0663".encode(),
    "\u00e9\u00e8".encode(),
    b"1.2.3 ",
    b"1_2_3",
    b"1.2.3\n",
    b"C:\\Windows\\x",
    b"",
]


@dataclass
class Stats:
    cases: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)  # "kind status"
    aborted_or_closed: int = 0
    acknowledged: list[str] = field(default_factory=list)
    quarantined: int = 0
    good_sent: int = 0
    crashes: int = 0
    hangs: int = 0
    slowest_case_s: float = 0.0
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0


# --- the node under test ----------------------------------------------------------------------


class LiveNode(LiveProcess):
    """``python -m dicom_node.node`` on a free loopback port with its own storage root and
    `workers` receiver processes (``dicom.workers``). A receiver process that dies counts as a
    crash even though the node would start it again."""

    def __init__(self, root: Path, workers: int = 2) -> None:
        from cli.demo.pacs import free_port

        self.root = root
        self.port = free_port()
        config = root / "node.toml"
        config.write_text(
            f"""
[dicom]
port = {self.port}
stable_age_s = 3600
low_water_mark_mb = 0
workers = {workers}
[storage]
root = "{root / "var"}"
database_url = "sqlite:///{root / "var" / "index.db"}"
"""
        )
        argv = [sys.executable, "-m", "dicom_node.node", "--config", str(config)]
        argv += ["--analyser", "tests.dicom_node.peers:make_recording_analyser"]
        super().__init__(argv, root / "node.log", "node")
        self.spool = root / "var" / "spool"
        self.quarantine = root / "var" / "quarantine"
        self.pids = set(process_tree(self.proc.pid))
        if len(self.pids) != 1 + (workers if workers > 1 else 0):
            self.stop()
            raise CampaignFailure(f"expected {workers} receiver processes, found {self.pids}")

    def alive(self) -> bool:
        """The node and every receiver process it started are still the same processes."""
        return self.proc.poll() is None and set(process_tree(self.proc.pid)) == self.pids

    def quarantine_count(self) -> int:
        return sum(1 for _ in self.quarantine.glob("*.reason.txt"))


# --- data sets --------------------------------------------------------------------------------


def _el(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element."""
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC"):
        return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def mr_elements(
    study: bytes, series: bytes, sop: bytes, rows: int = 8, cols: int = 8
) -> list[bytes]:
    """A small valid MR image, element by element (tags ascending)."""
    us = lambda v: struct.pack("<H", v)  # noqa: E731
    return [
        _el(0x0008, 0x0016, b"UI", wire.MR_IMAGE_STORAGE),
        _el(0x0008, 0x0018, b"UI", sop),
        _el(0x0008, 0x0020, b"DA", b"20260101"),
        _el(0x0008, 0x0060, b"CS", b"MR"),
        _el(0x0008, 0x103E, b"LO", b"fuzz"),
        _el(0x0010, 0x0010, b"PN", b"Fuzz^Case"),
        _el(0x0010, 0x0020, b"LO", b"FUZZ-1"),
        _el(0x0010, 0x0021, b"LO", b"FUZZ-ISSUER"),
        _el(0x0020, 0x000D, b"UI", study),
        _el(0x0020, 0x000E, b"UI", series),
        _el(0x0020, 0x0013, b"IS", b"1"),
        _el(0x0028, 0x0002, b"US", us(1)),
        _el(0x0028, 0x0004, b"CS", b"MONOCHROME2"),
        _el(0x0028, 0x0010, b"US", us(rows)),
        _el(0x0028, 0x0011, b"US", us(cols)),
        _el(0x0028, 0x0100, b"US", us(16)),
        _el(0x0028, 0x0101, b"US", us(12)),
        _el(0x0028, 0x0102, b"US", us(11)),
        _el(0x0028, 0x0103, b"US", us(0)),
        _el(0x7FE0, 0x0010, b"OW", b"\x01\x02" * rows * cols),
    ]


def nested_sequence(depth: int, closed: bool) -> bytes:
    """(0008,1115) with `depth` levels of undefined-length sequences and items."""
    opening = struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
    opening += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return opening * depth + (closing * depth if closed else b"")


uids = st.integers(min_value=1, max_value=2**120).map(lambda n: f"2.25.{n}".encode())
_FRESH = itertools.count(1)


@dataclass
class StoreCase:
    kind: str
    sop_class: bytes
    sop_instance: bytes
    dataset: bytes
    context_id: int = 1


@st.composite
def store_cases(draw: Any) -> StoreCase:
    # fresh UIDs per case: Hypothesis reuses small values across cases, and a series UID
    # already stored under another study is rightly refused (0xA900), even for a valid case
    study, series, sop = (draw(uids) + b".%d" % next(_FRESH) for _ in range(3))
    elements = mr_elements(study, series, sop)
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "truncated",
                "byte_flips",
                "wrong_vr",
                "undefined_length",
                "deep_sequence",
                "huge_value",
                "lying_length",
                "bad_pixel_data",
                "hostile_uid",
                "hostile_request_uid",
                "random_bytes",
                "implicit_in_explicit",
            ]
        )
    )
    sop_class = wire.MR_IMAGE_STORAGE
    data = b"".join(elements)
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "byte_flips":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        data = bytes(buf)
    elif kind == "wrong_vr":
        i = draw(st.integers(0, len(elements) - 1))
        vr = draw(st.binary(min_size=2, max_size=2))
        elements[i] = elements[i][:4] + vr + elements[i][6:]
        data = b"".join(elements)
    elif kind == "undefined_length":
        i = draw(st.integers(0, len(elements) - 2))
        el = elements[i]
        elements[i] = el[:6] + b"\xff\xff" + el[8:]
        data = b"".join(elements)
    elif kind == "deep_sequence":
        depth = draw(st.one_of(st.integers(1, 40), st.integers(40, 3000)))
        seq = nested_sequence(depth, closed=draw(st.booleans()))
        data = b"".join(elements[:4]) + seq + b"".join(elements[4:])
    elif kind == "huge_value":
        size = draw(st.sampled_from([70_000, 1 << 20, 8 << 20]))
        value = draw(st.sampled_from([b"A", b"\x00", b"\\"])) * size
        elements[4] = struct.pack("<HH2sHL", 0x0008, 0x103E, b"UT", 0, len(value)) + value
        data = b"".join(elements)
    elif kind == "lying_length":
        i = draw(st.integers(0, len(elements) - 1))
        claimed = draw(st.sampled_from([0x7FFFFFFF, 0xFFFFFFFE, 1 << 20, 65535]))
        el = elements[i]
        if el[4:6] in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC"):
            elements[i] = el[:8] + struct.pack("<L", claimed) + el[12:]
        else:
            elements[i] = el[:6] + struct.pack("<H", claimed & 0xFFFF) + el[8:]
        data = b"".join(elements)
    elif kind == "bad_pixel_data":
        variant = draw(st.sampled_from(["short", "encapsulated_open", "no_pixels", "rows"]))
        if variant == "short":
            elements[-1] = _el(0x7FE0, 0x0010, b"OW", b"\x00" * draw(st.integers(0, 126)))
        elif variant == "encapsulated_open":
            elements[-1] = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
            elements[-1] += struct.pack("<HHL", 0xFFFE, 0xE000, 0)
        elif variant == "no_pixels":
            elements[-1] = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 0)
        else:
            elements[13] = _el(0x0028, 0x0010, b"US", struct.pack("<H", 60000))
        data = b"".join(elements)
    elif kind == "hostile_uid":
        which = draw(st.sampled_from([1, 8, 9]))  # SOP Instance, Study, Series in the data set
        bad = draw(st.one_of(st.sampled_from(HOSTILE_UIDS), st.binary(max_size=80)))
        group, element = {1: (0x0008, 0x0018), 8: (0x0020, 0x000D), 9: (0x0020, 0x000E)}[which]
        elements[which] = _el(group, element, b"UI", bad)
        if which == 1:
            sop = bad  # the request carries the same hostile value
        data = b"".join(elements)
    elif kind == "hostile_request_uid":
        bad = draw(st.one_of(st.sampled_from(HOSTILE_UIDS), st.text(max_size=70).map(str.encode)))
        if draw(st.booleans()):
            sop = bad
        else:
            sop_class = bad
        data = b"".join(elements)
    elif kind == "random_bytes":
        data = draw(st.binary(max_size=4096))
    elif kind == "implicit_in_explicit":
        data = b"".join(e[:4] + struct.pack("<L", len(e) - 8) + e[8:] for e in elements[:-1])
    return StoreCase(kind, sop_class, sop, data)


@dataclass
class PduCase:
    kind: str
    data: bytes
    associate_first: bool = False


@st.composite
def pdu_cases(draw: Any) -> PduCase:
    kind = draw(
        st.sampled_from(
            [
                "random_bytes",
                "unknown_type",
                "lying_length",
                "truncated_rq",
                "mutated_rq",
                "oversized_p_data",
                "broken_pdv",
                "wrong_called_ae",
                "odd_calling_ae",
                "garbage_after_association",
            ]
        )
    )
    rq = wire.associate_rq()
    if kind == "random_bytes":
        return PduCase(kind, draw(st.binary(max_size=2048)))
    if kind == "unknown_type":
        pdu_type = draw(st.integers(0, 255).filter(lambda t: t not in range(1, 8)))
        body = draw(st.binary(max_size=256))
        return PduCase(kind, wire.pdu(pdu_type, body), draw(st.booleans()))
    if kind == "lying_length":
        claimed = draw(st.sampled_from([0, 1, 5, 68, 1 << 16, MAX_PDU + 1, 0xFFFFFFFF]))
        return PduCase(kind, wire.pdu(0x01, rq[6:], length=claimed))
    if kind == "truncated_rq":
        return PduCase(kind, rq[: draw(st.integers(0, len(rq) - 1))])
    if kind == "mutated_rq":
        buf = bytearray(rq)
        for _ in range(draw(st.integers(1, 10))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        return PduCase(kind, bytes(buf))
    if kind == "oversized_p_data":
        claimed = draw(st.sampled_from([MAX_PDU + 1, 1 << 20, 1 << 28, 0xFFFFFFFF]))
        body = draw(st.binary(max_size=1024))
        return PduCase(kind, wire.pdu(0x04, body, length=claimed), associate_first=True)
    if kind == "broken_pdv":
        pdv_len = draw(st.sampled_from([0, 1, 2, 0xFFFFFFFF, 1 << 20]))
        body = struct.pack(">LBB", pdv_len, draw(st.integers(0, 255)), draw(st.integers(0, 255)))
        body += draw(st.binary(max_size=64))
        return PduCase(kind, wire.pdu(0x04, body), associate_first=True)
    if kind == "wrong_called_ae":
        return PduCase(kind, wire.associate_rq(called=draw(st.binary(max_size=16))))
    if kind == "odd_calling_ae":
        return PduCase(kind, wire.associate_rq(calling=draw(st.binary(max_size=16))))
    garbage = draw(st.binary(min_size=1, max_size=512))
    return PduCase(kind, garbage, associate_first=True)


cases = st.one_of(store_cases(), pdu_cases())


# --- running cases ----------------------------------------------------------------------------


def _good_instance(n: int) -> StoreCase:
    base = f"2.25.{10**30 + n}".encode()
    return StoreCase(
        "good",
        wire.MR_IMAGE_STORAGE,
        base + b".3",
        b"".join(mr_elements(b"2.25.424242", b"2.25.424243", base + b".3")),
    )


def _spooled(node: LiveNode, sop: bytes) -> bool:
    return any(node.spool.glob(f"*/*/{sop.decode()}.dcm"))


def run_store(node: LiveNode, case: StoreCase, stats: Stats) -> None:
    before = node.quarantine_count()
    with wire.RawAssociation("127.0.0.1", node.port, timeout=CASE_TIMEOUT_S) as assoc:
        answer = assoc.associate()
        if answer != 0x02 or 1 not in assoc.accepted:
            raise CampaignFailure(
                f"valid association refused: PDU 0x{answer:02X} {assoc.last_answer.hex()}"
            )
        try:
            status = assoc.c_store(case.sop_class, case.sop_instance, case.dataset)
        except wire.PeerClosed:
            status = None
        if status is not None:
            assoc.release()
    if status is None:
        # the SCP may abort an association whose request it cannot decode at all (e.g. a NUL
        # in a request UID pynetdicom refuses): nothing was acknowledged, nothing stored
        stats.aborted_or_closed += 1
        stats.statuses["aborted"] += 1
        stats.outcomes[f"{case.kind} aborted"] += 1
        if case.kind in ("valid", "good"):
            raise CampaignFailure(f"{case.kind} instance got no C-STORE response")
        return
    stats.statuses[f"0x{status:04X}"] += 1
    stats.outcomes[f"{case.kind} 0x{status:04X}"] += 1
    if status == 0x0000:
        sop = case.sop_instance.rstrip(b"\x00 ")  # UI padding is not part of the UID
        stats.acknowledged.append(sop.decode())
        if not _spooled(node, sop):
            raise CampaignFailure(f"acknowledged {case.sop_instance!r} is not in the spool")
        return
    if case.kind in ("valid", "good"):
        raise CampaignFailure(f"{case.kind} instance refused with 0x{status:04X}")
    if status == 0xC000:
        raise CampaignFailure(f"{case.kind}: 0xC000 (our own failure); see node.log")
    if status not in (0xA900, 0xC210):
        raise CampaignFailure(f"{case.kind}: undocumented status 0x{status:04X}")
    after = node.quarantine_count()
    if after != before + 1:
        raise CampaignFailure(f"{case.kind}: refused 0x{status:04X} but not quarantined")
    stats.quarantined += 1


def run_pdu(node: LiveNode, case: PduCase, stats: Stats) -> None:
    if case.associate_first:
        with wire.RawAssociation("127.0.0.1", node.port, timeout=CASE_TIMEOUT_S) as assoc:
            answer = assoc.associate()
            if answer != 0x02:
                raise CampaignFailure(
                    f"valid association refused: PDU 0x{answer:02X} {assoc.last_answer.hex()}"
                )
            try:
                assoc.send(case.data)
                assoc.sock.shutdown(socket.SHUT_WR)  # nothing more from us
                while assoc.sock.recv(65536):
                    pass
            except (OSError, wire.PeerClosed):
                pass
    else:
        wire.send_and_wait_close("127.0.0.1", node.port, case.data, CASE_TIMEOUT_S)
    stats.aborted_or_closed += 1


def run_case(node: LiveNode, case: StoreCase | PduCase, stats: Stats) -> None:
    start = time.monotonic()
    stats.cases += 1
    stats.kinds[case.kind if isinstance(case, StoreCase) else f"pdu_{case.kind}"] += 1
    try:
        if isinstance(case, StoreCase):
            run_store(node, case, stats)
        else:
            run_pdu(node, case, stats)
    except TimeoutError as exc:
        stats.hangs += 1
        raise CampaignFailure(f"SCP did not answer or close on {case.kind}: {exc}") from exc
    except (OSError, wire.PeerClosed) as exc:
        if not node.alive():
            stats.crashes += 1
            raise CampaignFailure(f"SCP died during {case.kind}: {exc}") from exc
        # a reset connection is a way of closing; the SCP must still be alive (checked next)
    elapsed = time.monotonic() - start
    stats.slowest_case_s = max(stats.slowest_case_s, elapsed)
    if elapsed > CASE_TIMEOUT_S:
        stats.hangs += 1
        raise CampaignFailure(f"{case.kind} took {elapsed:.1f} s")
    if not node.alive():
        stats.crashes += 1
        raise CampaignFailure(f"SCP process died after {case.kind}")
    rss = node.rss_mb()
    stats.rss_peak_mb = max(stats.rss_peak_mb, rss)
    if rss > stats.rss_start_mb + RSS_BOUND_MB:
        raise CampaignFailure(f"SCP resident memory {rss:.0f} MB after {case.kind}")
    if stats.cases % GOOD_EVERY == 0:
        stats.good_sent += 1
        run_store(node, _good_instance(stats.good_sent), stats)


def check_acknowledged_indexed(node: LiveNode, stats: Stats) -> None:
    """Every acknowledged SOP Instance UID is in the node's index (nothing acknowledged lost)."""
    import sqlite3

    db = sqlite3.connect(node.root / "var" / "index.db")
    try:
        indexed = {row[0] for row in db.execute("SELECT sop_instance_uid FROM instances")}
    finally:
        db.close()
    missing = [uid for uid in stats.acknowledged if uid not in indexed]
    if missing:
        raise CampaignFailure(f"{len(missing)} acknowledged instances not indexed: {missing[:3]}")


def check_nothing_outside(root: Path, before: set[Path]) -> None:
    """The node wrote nothing outside its storage root ``root/var`` (``../../x`` from a spool
    folder would land in `root` or above it)."""
    var = root / "var"
    allowed = {root / "node.toml", root / "node.log", var, *var.rglob("*")}
    extra = set(root.parent.rglob("*")) - before - allowed
    if extra:
        raise CampaignFailure(f"files written outside the storage root: {sorted(extra)[:5]}")


def run_campaign(n_cases: int, work: Path, seed_value: int = 12, workers: int = 2) -> Stats:
    """Run `n_cases` generated cases against a fresh live node under `work`; raises
    `CampaignFailure` (or Hypothesis' falsifying example) on the first broken property."""
    work.mkdir(parents=True, exist_ok=True)
    root = work / "node"
    root.mkdir()
    before = set(work.rglob("*"))
    node = LiveNode(root, workers)
    stats = Stats()
    stats.rss_start_mb = stats.rss_peak_mb = node.rss_mb()
    try:

        @seed(seed_value)
        @settings(
            max_examples=n_cases,
            database=None,
            deadline=None,
            phases=[Phase.generate],  # a campaign reports, it does not shrink
            suppress_health_check=list(HealthCheck),
            derandomize=False,
        )
        @given(case=cases)
        def campaign(case: StoreCase | PduCase) -> None:
            run_case(node, case, stats)

        campaign()
        run_store(node, _good_instance(10**6), stats)  # still serving after everything
        check_acknowledged_indexed(node, stats)
        check_nothing_outside(root, before)
        stats.rss_end_mb = node.rss_mb()
    finally:
        node.stop()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.campaigns.fuzz_scp", description=__doc__)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2, help="dicom.workers of the node")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="radtriage-fuzz-") as tmp:
        work = args.keep or Path(tmp)
        try:
            stats = run_campaign(args.cases, work, args.seed, args.workers)
            failure = None
        except Exception as exc:  # report, then fail
            stats, failure = None, f"{type(exc).__name__}: {exc}"
    result: dict[str, Any] = {
        "command": "python -m tests.campaigns.fuzz_scp " + " ".join(argv or sys.argv[1:]),
        "seconds": round(time.monotonic() - started, 1),
        "failure": failure,
    }
    if stats is not None:
        summary = {f.name: getattr(stats, f.name) for f in fields(stats)}
        summary["kinds"] = dict(sorted(stats.kinds.items()))
        summary["statuses"] = dict(sorted(stats.statuses.items()))
        summary["outcomes"] = dict(sorted(stats.outcomes.items()))
        summary["acknowledged"] = len(stats.acknowledged)
        result.update(summary)
    print(json.dumps(result, indent=None if args.json else 2, default=str))
    return 1 if failure else 0


if __name__ == "__main__":
    raise SystemExit(main())
