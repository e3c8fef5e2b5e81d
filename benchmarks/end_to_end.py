"""End-to-end latency under load: the real `radtriage serve` (Ray Serve backend, bundled
models) fed a stream of phantom studies at increasing arrival rates, with the memory of its
whole process tree sampled every 0.2 s.

For each level (one study every `interval` s, `n` studies) every study is C-STOREd by its own
sender at its scheduled time, so pushes overlap when the server falls behind. Two clocks:
- latency: last instance received by the node (index ``last_received_at``) -> SR accepted by
  the PACS (an in-process C-STORE SCP stamps it when it stores the SR), as the issue asks;
- turnaround: the sender's first byte -> SR at the PACS, what the hospital sees (ingest
  included: under load the C-STOREs slow down as much as the analysis does).
The index's ``wait_complete``/``queue``/``analysis``/``send`` timings show where the time goes.
A level's queue grows when the late studies' turnaround exceeds the early ones' by more than
max(2 s, 25 %), or SRs leave at under 90 % of the arrival rate; the sustainable rate is that of
the last level before the first that grew, and the capacity is the highest departure rate of
an overloaded level (studies/hour with the server never idle; other load on a shared machine
can only lower it). Levels are separated by a full drain.

    .venv/bin/python -m benchmarks.end_to_end [--levels 20:3,10:3,5:6,3:8,2:10] [--backend ray]
        [--sender storescu|pynetdicom]

Writes ``benchmarks/results/end_to_end.json``. Timings are wall-clock on a shared machine: read
them as orders of magnitude and as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.memory import TreeSampler, process_name
from cli.demo import DemoStudy, push_direct, wait_ready, write_config
from cli.demo.pacs import LocalPacs, free_ports, stop_process
from core.errors import DestinationError, RadtriageError

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "end_to_end.json"
#: (seconds between arrivals, studies) per level, slowest first.
DEFAULT_LEVELS: tuple[tuple[float, int], ...] = (
    (20.0, 2),
    (10.0, 3),
    (5.0, 6),
    (3.0, 8),
    (2.0, 10),
)
#: (seed, vendor, csPCa) of the base phantoms; each pushed study is a copy with fresh UIDs.
BASE_CASES: tuple[tuple[int, str, bool], ...] = (
    (930001, "siemens", True),
    (930002, "ge", False),
    (930003, "siemens", False),
    (930004, "ge", True),
)


def _say(message: str) -> None:
    print(message, flush=True)


class TimedPacs(LocalPacs):
    """LocalPacs that stamps (time.time()) the first SR it stores for each study."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.sr_at: dict[str, float] = {}

    def _on_store(self, event: Any) -> int:
        status = super()._on_store(event)
        ds = event.dataset
        if str(ds.get("Modality", "")) == "SR":
            self.sr_at.setdefault(str(ds.StudyInstanceUID), time.time())
        return status


def _instances(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm") if "masks" not in p.parts)


def base_phantoms(root: Path) -> list[Path]:
    from training.phantoms import synthesize_case, write_study

    return [
        write_study(synthesize_case(seed, vendor=vendor, cspca=cspca), root / vendor)
        for seed, vendor, cspca in BASE_CASES
    ]


def clone_study(source: Path, out: Path, number: int) -> DemoStudy:
    """Copy a phantom study with new Study/Series/SOP/FrameOfReference UIDs (deterministic in
    `number`), a new PatientID and AccessionNumber: a distinct study to the node."""
    import pydicom
    from pydicom.uid import generate_uid

    def uid(old: str) -> str:
        return str(generate_uid(entropy_srcs=[old, f"bench-{number}"]))

    folder = out / f"study-{number:03d}"
    study_uid = ""
    for path in _instances(source):
        ds = pydicom.dcmread(path)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if keyword in ds:
                setattr(ds, keyword, uid(str(getattr(ds, keyword))))
        ds.SOPInstanceUID = uid(str(ds.SOPInstanceUID))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"BENCH{number:05d}"
        ds.AccessionNumber = f"BN{number:08d}"
        study_uid = str(ds.StudyInstanceUID)
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    return DemoStudy(folder, study_uid, source.name, "bench")


@dataclass
class Push:
    study: DemoStudy
    level: int
    scheduled_at: float
    started_at: float = 0.0
    done_at: float = 0.0
    error: str | None = None
    row: dict[str, Any] = field(default_factory=dict)
    sr_at: float | None = None


def _storescu(study: DemoStudy, port: int) -> None:
    """C-STORE a study with DCMTK storescu (one association), as a PACS would send it."""
    exe = shutil.which("storescu") or "storescu"
    cmd = [exe, "-aet", "BENCHPACS", "-aec", "RADTRIAGE", "127.0.0.1", str(port)]
    cmd += [str(p) for p in _instances(study.folder)]
    run = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=600
    )
    if run.returncode != 0:
        raise DestinationError(f"storescu failed ({run.returncode}): {run.stderr[-500:]}")


def _push(push: Push, port: int, sender: str) -> None:
    time.sleep(max(0.0, push.scheduled_at - time.time()))
    push.started_at = time.time()
    try:
        if sender == "storescu":
            _storescu(push.study, port)
        else:
            push_direct(push.study, port)
    except (DestinationError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        push.error = str(exc)
    push.done_at = time.time()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_level(
    level: int,
    interval_s: float,
    pushes: list[Push],
    port: int,
    pacs: TimedPacs,
    db_url: str,
    drain_timeout_s: float,
    sender: str,
) -> None:
    """Push `pushes` on schedule, wait until every SR is at the PACS and the index says sent."""
    from store.index import Index

    t0 = time.time() + 0.5
    for i, push in enumerate(pushes):
        push.scheduled_at = t0 + i * interval_s
    threads = [threading.Thread(target=_push, args=(p, port, sender), daemon=True) for p in pushes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    index = Index(db_url)
    try:
        deadline = time.time() + drain_timeout_s
        while True:
            rows = {
                p.study.study_instance_uid: index.get_study(p.study.study_instance_uid)
                for p in pushes
            }
            done = all(
                r is not None and r["status"] in ("sent", "failed", "not_applicable")
                for r in rows.values()
            )
            if done or time.time() > deadline:
                break
            time.sleep(0.25)
    finally:
        index.close()
    for push in pushes:
        push.row = rows.get(push.study.study_instance_uid) or {}
        push.sr_at = pacs.sr_at.get(push.study.study_instance_uid)


def _p(values: list[float], q: float) -> float | None:
    return round(_percentile(values, q), 2) if values else None


def summarise_level(interval_s: float, pushes: list[Push]) -> dict[str, Any]:
    """Percentiles of one level and whether its queue grew (see the module docstring)."""
    latencies, turnarounds, per_study = [], [], []
    stages: dict[str, list[float]] = {k: [] for k in ("wait_complete", "queue", "analysis", "send")}
    for p in pushes:
        row = p.row
        t = row.get("timings_ms") or {}
        last = row.get("last_received_at")
        latency = None if p.sr_at is None or last is None else p.sr_at - last
        turnaround = None if p.sr_at is None else p.sr_at - p.started_at
        per_study.append(
            {
                "study_instance_uid": p.study.study_instance_uid,
                "status": row.get("status"),
                "push_s": round(p.done_at - p.started_at, 2),
                "latency_s": None if latency is None else round(latency, 2),
                "turnaround_s": None if turnaround is None else round(turnaround, 2),
                **{f"{k}_ms": t.get(k) for k in stages},
                "error": p.error or (row.get("error") or {}).get("message"),
            }
        )
        if latency is not None and turnaround is not None:
            latencies.append(latency)
            turnarounds.append(turnaround)
        for key, values in stages.items():
            if t.get(key) is not None:
                values.append(t[key] / 1000.0)
    half = len(turnarounds) // 2
    early = statistics.fmean(turnarounds[:half]) if half else 0.0
    growth = statistics.fmean(turnarounds[-half:]) - early if half else 0.0
    sent = sorted(p.sr_at for p in pushes if p.sr_at is not None)
    departures = (len(sent) - 1) * 3600 / (sent[-1] - sent[0]) if len(sent) > 1 else None
    pushes_s = [p.done_at - p.started_at for p in pushes]
    return {
        "interval_s": interval_s,
        "offered_studies_per_hour": round(3600 / interval_s),
        "studies": len(pushes),
        "delivered": len(latencies),
        "latency_p50_s": _p(latencies, 0.5),
        "latency_p95_s": _p(latencies, 0.95),
        "latency_max_s": round(max(latencies), 2) if latencies else None,
        "turnaround_p50_s": _p(turnarounds, 0.5),
        "turnaround_p95_s": _p(turnarounds, 0.95),
        "push_p50_s": _p(pushes_s, 0.5),
        **{f"{k}_p50_s": _p(v, 0.5) for k, v in stages.items()},
        "queue_max_s": round(max(stages["queue"]), 2) if stages["queue"] else None,
        "turnaround_growth_s": round(growth, 2),
        "queue_grows": (bool(half) and growth > max(2.0, 0.25 * early))
        or (departures is not None and departures < 0.9 * 3600 / interval_s),
        "departures_per_hour": None if departures is None else round(departures),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "per_study": per_study,
    }


def _stop_leftovers(pids: set[int], names: dict[int, str]) -> list[str]:
    """SIGTERM processes of the server's tree still alive after it stopped (Ray daemons that
    left its process group); only pids seen in the tree with the same command line."""
    left = []
    for pid in sorted(pids):
        if process_name(pid) == names.get(pid) and names.get(pid) not in (None, "?"):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                left.append(names[pid])
    return left


def _machine() -> dict[str, Any]:
    import onnxruntime
    import ray

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def parse_levels(text: str) -> list[tuple[float, int]]:
    levels = []
    for part in text.split(","):
        interval, _, count = part.partition(":")
        levels.append((float(interval), int(count)))
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levels",
        type=parse_levels,
        default=list(DEFAULT_LEVELS),
        help="INTERVAL_S:STUDIES,... slowest first (default 20:3,10:3,5:6,3:8,2:10)",
    )
    parser.add_argument("--backend", choices=("ray", "local"), default="ray")
    parser.add_argument(
        "--sender",
        choices=("storescu", "pynetdicom"),
        default="storescu" if shutil.which("storescu") else "pynetdicom",
        help="DCMTK storescu (default when installed: little CPU taken from the server) or "
        "cli.demo.push_direct",
    )
    parser.add_argument("--drain-timeout", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="radtriage-e2e-"))
    machine = _machine()
    server: subprocess.Popen[bytes] | None = None
    sampler: TreeSampler | None = None
    pacs = TimedPacs(root / "pacs")
    pacs.start()
    names: dict[int, str] = {}
    try:
        _say("writing base phantoms")
        bases = base_phantoms(root / "base")
        dicom_port, http_port = free_ports(2)
        config = root / "radtriage.toml"
        var = root / "var"
        write_config(config, var, dicom_port, http_port, pacs.aet, pacs.port)
        log = root / "serve.log"
        cmd = [sys.executable, "-m", "cli.main", "serve", "--config", str(config)]
        if args.backend == "local":
            cmd.append("--local")
        started = time.time()
        with log.open("wb") as out:
            server = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
            )
        sampler = TreeSampler(server.pid, interval_s=0.2).start()
        total = sum(n for _, n in args.levels) + 1  # the first one warms the path up
        _say(f"server starting ({args.backend}); cloning {total} studies meanwhile")
        studies = [clone_study(bases[i % len(bases)], root / "push", i) for i in range(total)]
        wait_ready(f"http://127.0.0.1:{http_port}", server, log)
        ready_s = time.time() - started
        _say(f"ready after {ready_s:.0f} s")
        db_url = f"sqlite:///{var}/radtriage.db"
        _say("one warm-up study (not counted)")
        warm = [Push(studies[0], -1, 0.0)]
        run_level(-1, 0.0, warm, dicom_port, pacs, db_url, args.drain_timeout, args.sender)
        if warm[0].sr_at is None:
            raise RadtriageError(f"the warm-up study got no SR at the PACS; see {log}")
        time.sleep(3.0)  # idle baseline for memory
        stream_start = time.time()
        idle = sampler.summary(since=stream_start - 3.0)

        levels, results = [], []
        offset = 1
        for number, (interval, count) in enumerate(args.levels):
            pushes = [Push(s, number, 0.0) for s in studies[offset : offset + count]]
            offset += count
            _say(f"level {number}: one study every {interval:g} s x {count}")
            run_level(
                number,
                interval,
                pushes,
                dicom_port,
                pacs,
                db_url,
                args.drain_timeout,
                args.sender,
            )
            summary = summarise_level(interval, pushes)
            results.append(summary)
            levels.append(pushes)
            _say(
                "  "
                + json.dumps({k: v for k, v in summary.items() if k != "per_study"}, default=str)
            )
        stream = sampler.summary(since=stream_start)
        sampler.stop()
        names = {pid: process_name(pid) for pid in sampler.seen_pids}

        sustainable = []  # the levels before the first that grew or lost a study
        for r in results:
            if r["queue_grows"] or r["delivered"] != r["studies"]:
                break
            sustainable.append(r)
        overloaded = [r for r in results if r["queue_grows"] and r["departures_per_hour"]]
        capacity = (
            max(r["departures_per_hour"] for r in overloaded)
            if overloaded
            else round(3600 / max(results[-1]["analysis_p50_s"] or 1e-3, 1e-3))
        )
        report = {
            "backend": args.backend,
            "models": "bundled (models/repository, promoted versions)",
            "pacs": "in-process pynetdicom C-STORE SCP (cli.demo.pacs.LocalPacs), stamps the SR",
            "sender": (
                "DCMTK storescu, one association per study (TCP_NODELAY=1)"
                if args.sender == "storescu"
                else "cli.demo.push_direct (pynetdicom), one association per study"
            ),
            "study": {
                "instances": len(_instances(studies[0].folder)),
                "megabytes": round(
                    sum(p.stat().st_size for p in _instances(studies[0].folder)) / 1e6, 1
                ),
                "series": "localizer, 2 extra T2W planes, T2W, DWI, ADC, high-b, T2W repeat",
            },
            "server_ready_s": round(ready_s, 1),
            "levels": results,
            "sustainable_studies_per_hour": (
                max(r["offered_studies_per_hour"] for r in sustainable) if sustainable else None
            ),
            "capacity_studies_per_hour": capacity,
            "capacity_source": (
                "highest departure rate of an overloaded level; outside load only lowers it"
                if overloaded
                else "3600 / median analysis time (no level overloaded the server)"
            ),
            "memory": {
                "idle_after_ready": idle,
                "during_stream": stream,
                "whole_run": sampler.summary(),
            },
            "machine": machine,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        _say(
            json.dumps(
                {
                    k: report[k]
                    for k in ("sustainable_studies_per_hour", "capacity_studies_per_hour")
                }
            )
        )
        return 0
    except RadtriageError as exc:
        _say(f"end-to-end benchmark failed: {exc}")
        return 1
    finally:
        if sampler is not None:
            sampler.stop()
            names = names or {pid: process_name(pid) for pid in sampler.seen_pids}
        if server is not None:
            stop_process(server, timeout=60)
        left = _stop_leftovers(sampler.seen_pids if sampler else set(), names)
        if left:
            _say(f"stopped {len(left)} leftover server processes: {sorted(set(left))}")
        pacs.stop()
        if args.keep:
            _say(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
