"""Load campaign against the live DICOM node (issue 12, item 5).

Starts a real node (``python -m dicom_node.node``, the DICOM side ``radtriage serve`` runs,
with a test analyser that takes `ANALYSIS_S` per study so analysis runs during the load) and
sends it many small MR studies over `senders` parallel DCMTK storescu associations. The last
study carries Requested Procedure Priority STAT: it must be analysed ahead of the routine
backlog that completed before it.

Checks: every storescu exits 0 and every C-STORE got Success (no association refused below
``dicom.max_associations``, no instance refused), every sent SOP Instance UID is in the index
and its file in the spool, every study ends ``sent`` to the destination (a storescp) and none is
stuck, and the urgent study jumped the queue. Reports the node's peak resident memory
(VmHWM).

Run (the campaign recorded in docs/reliability.md)::

    flock /tmp/radtriage-heavy.lock .venv/bin/python -m tests.campaigns.load_ingest \\
        --senders 8 --studies 64 --instances 40

The fast suite runs `run_campaign` with a few hundred instances (tests/dicom_node/test_load.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pydicom

from cli.demo.pacs import free_ports

REPO = Path(__file__).resolve().parents[2]
ANALYSIS_S = 0.5
URGENT = "STAT"


class SlowAnalyser:
    """The recording test analyser, taking `ANALYSIS_S` per study (a stand-in for models)."""

    def __init__(self, out_dir: Path) -> None:
        from tests.dicom_node.peers import RecordingAnalyser

        self.inner = RecordingAnalyser(out_dir)

    def __call__(self, uid: str, paths: list[Path], previous_sr: Path | None) -> Any:
        time.sleep(ANALYSIS_S)
        return self.inner(uid, paths, previous_sr)


def make_slow_analyser(settings: Any) -> SlowAnalyser:
    """Factory for ``python -m dicom_node.node --analyser``."""
    return SlowAnalyser(Path(settings.storage.root) / "test-analyser")


def node_config(work: Path, port: int, dest_port: int, **dicom: Any) -> Path:
    var = work / "var"
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in dicom.items())
    cfg = work / "node.toml"
    cfg.write_text(
        f"""
[dicom]
port = {port}
stable_age_s = 1.0
low_water_mark_mb = 0
{extra}
[[dicom.destinations]]
name = "pacs"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {dest_port}
[storage]
root = "{var}"
database_url = "sqlite:///{var}/index.db"
[sender]
initial_backoff_s = 0.2
[serving]
concurrent_studies = 1
"""
    )
    return cfg


def start_node(config: Path, analyser: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.node", "--config", str(config), "--analyser", analyser],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise RuntimeError(f"node did not start: {line!r}")
    return proc


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (the node and its receiver processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        out.append(p)
        frontier += children.get(p, [])
    return out


def make_studies(root: Path, studies: int, instances: int) -> list[list[Path]]:
    """`studies` MR studies of `instances` small slices; the last one is STAT."""
    from tests.dicom_node.peers import make_mr_series

    out = []
    for i in range(studies):
        priority = URGENT if i == studies - 1 else None
        out.append(
            make_mr_series(
                root / f"s{i:04d}",
                instances,
                rows=32,
                columns=32,
                patient_id=f"LOAD-{i:04d}",
                requested_procedure_priority=priority,
                seed=i,
            )
        )
    return out


def _storescu(files: list[Path], port: int) -> tuple[int, int, str]:
    """Send in one association; returns (exit code, success responses, log tail)."""
    exe = shutil.which("storescu") or "storescu"
    cmd = [exe, "-v", "-aet", "LOADSCU", "-aec", "RADTRIAGE", "127.0.0.1", str(port)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    r = subprocess.run(
        [*cmd, *map(str, files)], capture_output=True, text=True, timeout=900, env=env
    )
    log = r.stdout + r.stderr
    return r.returncode, log.count("Received Store Response (Success)"), log[-1500:]


def run_campaign(
    work: Path,
    *,
    senders: int = 8,
    studies: int = 16,
    instances: int = 20,
    timeout_s: float = 600.0,
    workers: int = 2,
) -> dict[str, Any]:
    """Run the campaign in `work`; returns the report (raises AssertionError on a failure)."""
    from store.index import Index
    from tests.dicom_node.peers import storescp

    series = make_studies(work / "src", studies, instances)
    urgent_uid = str(pydicom.dcmread(series[-1][0], stop_before_pixels=True).StudyInstanceUID)
    sent_uids = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for s in series for f in s
    }
    port, dest = free_ports(2)
    cfg = node_config(work, port, dest, max_associations=senders + 2, workers=workers)
    var = work / "var"
    with ExitStack() as stack:
        stack.enter_context(storescp(work / "dest", dest, aet="STORESCP"))
        node = start_node(cfg, "tests.campaigns.load_ingest:make_slow_analyser")
        stack.callback(_stop, node)
        # each association sends whole studies, round robin; the urgent one goes last
        chunks: list[list[Path]] = [[] for _ in range(senders)]
        for i, files in enumerate(series[:-1]):
            chunks[i % senders].extend(files)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(senders) as pool:
            results = list(pool.map(lambda c: _storescu(c, port), [c for c in chunks if c]))
        # the routine backlog is now waiting for the (slow) analyser: the urgent study last
        results.append(_storescu(series[-1], port))
        ingest_s = time.perf_counter() - t0
        failed = [r for r in results if r[0] != 0]
        acked = sum(r[1] for r in results)
        assert not failed, f"a sender failed: {failed[0][2]}"
        assert acked == len(sent_uids), f"{acked} of {len(sent_uids)} instances acknowledged"
        index = Index(f"sqlite:///{var / 'index.db'}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = index.list_studies(limit=studies + 10)
            if len(rows) == studies and all(r["status"] == "sent" for r in rows):
                break
            time.sleep(0.5)
        rows = index.list_studies(limit=studies + 10)
        stuck = [r["study_instance_uid"] for r in rows if r["status"] != "sent"]
        peak = sum(peak_rss_mb(pid) for pid in process_tree(node.pid))
        with index.read() as s:
            from sqlalchemy import select

            from store.index import Instance

            indexed = dict(s.execute(select(Instance.sop_instance_uid, Instance.path)).all())
        index.close()
    lost = sorted(sent_uids - set(indexed))
    missing_files = [u for u in sent_uids & set(indexed) if not Path(indexed[u]).is_file()]
    delivered = len(list((work / "dest").rglob("*"))) if (work / "dest").exists() else 0
    report = {
        "senders": senders,
        "workers": workers,
        "studies": studies,
        "instances": len(sent_uids),
        "acknowledged": acked,
        "lost": len(lost) + len(missing_files),
        "stuck": len(stuck),
        "ingest_s": round(ingest_s, 2),
        "instances_per_s": round(len(sent_uids) / ingest_s, 1),
        "peak_rss_mb": round(peak, 1),
        "delivered_files": delivered,
        "urgent": _urgent_check(rows, urgent_uid),
    }
    assert report["lost"] == 0, f"lost instances: {lost[:5]} {missing_files[:5]}"
    assert report["stuck"] == 0, f"studies not sent: {stuck[:5]}"
    return report


def _urgent_check(rows: list[dict[str, Any]], urgent_uid: str) -> dict[str, Any]:
    """The urgent study is claimed before every routine study still waiting when it became
    complete; `overtaken` counts those it jumped (0 means there was no backlog to jump)."""
    by_uid = {r["study_instance_uid"]: r for r in rows}
    u = by_uid[urgent_uid]
    overtaken, ahead = 0, 0
    for r in rows:
        if r is u or r["completed_at"] is None or r["analysis_started_at"] is None:
            continue
        waiting = r["completed_at"] <= u["completed_at"] < r["analysis_started_at"]
        if waiting and r["analysis_started_at"] >= u["analysis_started_at"]:
            overtaken += 1
        elif waiting:
            ahead += 1  # a routine study that waited but was claimed first: wrong order
    assert ahead == 0, f"{ahead} waiting routine studies were analysed before the urgent one"
    return {"overtaken": overtaken, "referral_urgency": u["referral_urgency"]}


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--studies", type=int, default=64)
    parser.add_argument("--instances", type=int, default=40, help="per study")
    parser.add_argument("--workers", type=int, default=2, help="dicom.workers")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="radtriage-load-"))
    try:
        report = run_campaign(
            work,
            senders=args.senders,
            studies=args.studies,
            instances=args.instances,
            workers=args.workers,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
