"""Where the milliseconds of one C-STORE go: py-spy samples our node while one DCMTK storescu
association sends an MR series, and the samples are summed per stage of the store path.

    .venv/bin/python -m benchmarks.profile_ingest [--instances 300] [--rows 256] [--workers 1]

Needs ``py-spy`` (dev extra) and may need ptrace permission (root or
``kernel.yama.ptrace_scope = 0``). Prints the wall time per instance and, per stage, the
milliseconds per instance of the samples that were on CPU in it (all threads and worker
processes summed, so the stages of concurrent work add up beyond wall time).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.ingest import _send, our_node, tree_cpu_s
from cli.demo.pacs import free_port, wait_port
from tests.dicom_node.peers import make_mr_series

#: Stage of a sample: the first of these found in its stack (innermost frame first).
STAGES = (
    ("fsync", ("fsync",)),
    ("spool write", ("write_atomic", "Spool.store", "spool.py:store")),
    ("index (SQL)", ("add_instance", "add_batch", "index.py")),
    ("encoding check", ("check_encoding", "walk_encoding", "_Walker", "check_pixel_data")),
    ("header decode", ("read_header", "record_from_header", "identify")),
    ("pynetdicom DIMSE decode/encode", ("decode_msg", "dimse_messages", "dsutils", "fastpath")),
    ("pynetdicom PDU read/decode", ("_read_pdu_data", "pdu.py", "transport.py", "recv")),
    ("pynetdicom state machine/events", ("dul.py", "fsm.py", "events.py", "association.py")),
    ("node loops (assembler, jobs, sender)", ("_Loop.run",)),
)


def stage_of(stack: str) -> str:
    frames = stack.split(";")[::-1]  # innermost first
    for frame in frames:
        for name, needles in STAGES:
            if any(n in frame for n in needles):
                return name
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="0: the node default")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=0, help="also list the N busiest frames")
    parser.add_argument("--raw", type=Path, default=None, help="keep py-spy's raw samples here")
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if pyspy is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    root = Path(tempfile.mkdtemp(prefix="radtriage-profile-"))
    try:
        files = make_mr_series(root / "series", args.instances, rows=args.rows, columns=args.rows)
        port = free_port()
        raw = root / "samples.txt"
        with our_node(root / "node", port, workers=args.workers or None) as proc:
            wait_port(port)
            _send(files[:5], port, "RADTRIAGE", 1)  # warm up (imports, first SQL)
            spy = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "-s",
                    "--gil",  # only samples holding the GIL: Python CPU time
                    "-r",
                    str(args.rate),
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--nonblocking",
                    "-p",
                    str(proc.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
            cpu0 = tree_cpu_s(proc.pid)
            seconds = _send(files[5:], port, "RADTRIAGE", 1)
            cpu = tree_cpu_s(proc.pid) - cpu0
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        n = len(files) - 5
        per_stage: collections.Counter[str] = collections.Counter()
        leaves: collections.Counter[str] = collections.Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if "wait" in stack.rsplit(";", 1)[-1] or "select" in stack.rsplit(";", 1)[-1]:
                continue  # idle: blocked in a wait/select
            per_stage[stage_of(stack)] += int(count)
            for frame in stack.split(";")[-1:]:  # self time: the innermost frame
                leaves[frame] += int(count)
        ms = {k: round(v / args.rate * 1000 / n, 3) for k, v in per_stage.most_common()}
        out = {
            "instances": n,
            "workers": args.workers,
            "wall_ms_per_instance": round(seconds * 1000 / n, 3),
            "instances_per_s": round(n / seconds, 1),
            "cpu_ms_per_instance": round(cpu * 1000 / n, 3),
            "sampled_ms_per_instance": ms,
        }
        if args.top:
            out["busiest_frames_ms_per_instance"] = {
                k: round(v / args.rate * 1000 / n, 3) for k, v in leaves.most_common(args.top)
            }
        print(json.dumps(out, indent=2))
        if args.raw is not None:
            shutil.copyfile(raw, args.raw)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
