"""Crash campaign against the whole server (issue 12, item 4).

Runs the real ``radtriage serve`` (``--local``: in-process ONNX Runtime; ``--ray`` rounds use
the Ray Serve backend, same node code) with Orthanc as the PACS (`cli.demo.pacs.OrthancPacs`) and
DCMTK storescu as the modality, and kills the server's whole process group with SIGKILL at a
random moment of one of three phases, chosen round by round:

- ``ingest``: while storescu is sending a phantom study: once the index holds a random number
  of its instances (1 up to three quarters of them), so the kill lands mid-association;
- ``worker``: the same moment, but only one receiver process (``dicom.workers = 2``) is killed;
  the node must start it again, serve the resend of the study and then die at an idle moment;
- ``analysis``: while a study is ``analysing``;
- ``sending``: while an outbox item is pending (the SR on its way to Orthanc).

After each kill the server is started again over the same storage, and storescu resends the
previous study (what a PACS does after a failed transfer; ``stable_age_s`` is long, so a study cut
short waits for its missing instances instead of being analysed half). At the end every study
must be ``sent``.

Checks: every instance storescu got Success for is in the index with its whole file (0 lost),
no study is left in any other state (0 stuck), Orthanc's SRs of each study form one chain of
versions (one SR, or a revision naming its predecessor when instances came after a report; a
resend reuses its UIDs, so the same report never arrives twice as different objects), and
`radtriage doctor` finds nothing to repair. Reports the server's peak resident memory (VmHWM,
largest of the runs).

Run (the campaign recorded in docs/reliability.md)::

    flock /tmp/radtriage-heavy.lock .venv/bin/python -m tests.campaigns.crash_serve --rounds 50

The fast suite runs `run_campaign` with a few rounds (tests/dicom_node/test_crash_campaign.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from cli.demo.pacs import free_ports
from tests.campaigns.load_ingest import peak_rss_mb, process_tree

REPO = Path(__file__).resolve().parents[2]
PHASES = ("ingest", "worker", "analysis", "sending")
START_TIMEOUT_S = 240.0


@dataclass
class Campaign:
    """State carried across rounds."""

    work: Path
    config: Path
    dicom_port: int
    orthanc: Any
    studies: list[Path]
    acked: set[str] = field(default_factory=set)  # SOP Instance UIDs storescu got Success for
    kills: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PHASES})
    missed: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PHASES})
    peak_rss_mb: float = 0.0
    starts: int = 0
    workers: int = 2
    log: Path = Path()


def _config(
    work: Path, dicom_port: int, http_port: int, pacs_aet: str, pacs_port: int, workers: int
) -> Path:
    var = work / "var"
    cfg = work / "radtriage.toml"
    cfg.write_text(
        f"""
[dicom]
ae_title = "RADTRIAGE"
port = {dicom_port}
stable_age_s = 120
low_water_mark_mb = 0
workers = {workers}

[[dicom.destinations]]
name = "pacs"
ae_title = "{pacs_aet}"
host = "127.0.0.1"
port = {pacs_port}

[storage]
root = "{var}"
database_url = "sqlite:///{var}/radtriage.db"

[http]
host = "127.0.0.1"
port = {http_port}

[sender]
initial_backoff_s = 0.5

[serving]
concurrent_studies = 1
"""
    )
    return cfg


def _start(c: Campaign, ray: bool) -> subprocess.Popen[bytes]:
    from cli.demo.pacs import wait_port

    cmd = [sys.executable, "-m", "cli.main", "serve", "--config", str(c.config)]
    with c.log.open("ab") as out:
        proc = subprocess.Popen(
            cmd if ray else [*cmd, "--local"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    c.starts += 1
    try:
        wait_port(c.dicom_port, timeout=START_TIMEOUT_S)
    except Exception:
        _kill(proc)
        raise RuntimeError(f"serve did not start: {c.log.read_text()[-3000:]}") from None
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the server's whole session (its Ray processes too): no chance to clean up."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    for entry in Path("/proc").iterdir():  # Ray daemons that left the group, same session
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == proc.pid:
                os.kill(int(entry.name), signal.SIGKILL)


def _storescu(files: list[Path], port: int) -> subprocess.Popen[str]:
    exe = shutil.which("storescu") or "storescu"
    cmd = [exe, "-v", "-aet", "MODALITY", "-aec", "RADTRIAGE", "127.0.0.1", str(port)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.Popen(
        [*cmd, *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _acked(log: str) -> list[str]:
    """Files storescu got Success for (``-v`` log: Sending file, then its response)."""
    acked, current = [], None
    for line in log.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _db(c: Campaign, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    import sqlite3

    db = c.work / "var" / "radtriage.db"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []  # not migrated yet
    finally:
        con.close()


def _wait(cond: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def _files(study: Path) -> list[Path]:
    return sorted(p for p in study.rglob("*.dcm"))


def _send_all(c: Campaign, files: list[Path]) -> None:
    """Send `files` with storescu to a running server and record what was acknowledged."""
    sender = _storescu(files, c.dicom_port)
    log, _ = sender.communicate(timeout=600)
    c.acked |= {_sop(Path(f)) for f in _acked(log)}


def _round(
    c: Campaign, rng: random.Random, phase: str, study: Path, previous: Path | None, ray: bool
) -> None:
    """Start the server, resend the `previous` study (as a PACS retries what failed), drive it
    into `phase` (sending `study`) and SIGKILL it at a random moment."""
    proc = _start(c, ray)
    sender: subprocess.Popen[str] | None = None
    try:
        if previous is not None:
            _send_all(c, _files(previous))
        files = _files(study)
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        sender = _storescu(files, c.dicom_port)
        if phase in ("ingest", "worker"):
            # kill once the index holds `k` of the study's instances: mid-association
            k = rng.randint(1, max(1, len(files) * 3 // 4))
            _wait(lambda: _instances_of(c, uid) >= k or sender.poll() is not None, 120, 0.01)
            hit = sender.poll() is None  # storescu still sending when the kill comes
        if phase == "worker":
            workers = _receiver_pids(proc.pid)
            serving = _serving_receiver(c, proc.pid)  # the process storescu is talking to
            os.kill(serving or rng.choice(workers), signal.SIGKILL)
            c.kills[phase] += 1
            if not hit or serving is None:
                c.missed[phase] += 1
            log, _ = sender.communicate(timeout=120)
            sender = None
            c.acked |= {_sop(Path(f)) for f in _acked(log)}
            restarted = _wait(lambda: len(set(_receiver_pids(proc.pid)) - set(workers)) == 1, 60)
            assert restarted, f"the killed receiver process was not started again: {workers}"
            _send_all(c, files)  # the node still receives (either process may get it)
            phase, hit = "idle", True  # the round ends with a whole-server kill at rest
        elif phase != "ingest":
            sql = (
                "SELECT count(*) FROM studies WHERE status = 'analysing'"
                if phase == "analysis"
                else "SELECT count(*) FROM outbox WHERE state = 'pending'"
            )
            hit = _wait(lambda: (_db(c, sql) or [(0,)])[0][0] > 0, 90)
            time.sleep(rng.uniform(0, 0.5 if phase == "analysis" else 0.05))
        c.peak_rss_mb = max(c.peak_rss_mb, _rss_tree(proc.pid))
        _kill(proc)
        if phase != "idle":
            c.kills[phase] += 1
            if not hit:
                c.missed[phase] += 1  # the phase passed before we saw it: a kill elsewhere
    finally:
        _kill(proc)
        if sender is not None:
            log, _ = sender.communicate(timeout=120)
            c.acked |= {_sop(Path(f)) for f in _acked(log)}


def _instances_of(c: Campaign, study_uid: str) -> int:
    rows = _db(
        c,
        "SELECT count(*) FROM instances i JOIN studies s ON s.id = i.study_fk "
        "WHERE s.study_instance_uid = ?",
        (study_uid,),
    )
    return int(rows[0][0]) if rows else 0


def _receiver_pids(pid: int) -> list[int]:
    """The receiver processes (``python -m dicom_node.workers``) under the server `pid`."""
    out = []
    for p in process_tree(pid):
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"dicom_node.workers" in cmdline:
            out.append(p)
    return out


def _serving_receiver(c: Campaign, pid: int) -> int | None:
    """The receiver process with an open association (the node's shared board), if any."""
    import contextlib

    from dicom_node.workers import WorkerBoard

    board = WorkerBoard(c.work / "var" / "run", c.workers, create=False)
    try:
        rows = [i for i in range(c.workers) if board.row(i)["associations"] > 0]
    finally:
        board.close()
    for p in _receiver_pids(pid):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            if rows and args[args.index(b"--worker") + 1] == str(rows[0]).encode():
                return p
    return None


def _rss_tree(pid: int) -> float:
    """Peak resident memory of the server and its receiver processes, summed."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += peak_rss_mb(p)
        except OSError:
            continue
    return total


def _orthanc_srs(c: Campaign) -> dict[str, dict[str, set[str]]]:
    """StudyInstanceUID -> {SR SOP Instance UID -> the SOP Instance UIDs its Predecessor
    Documents Sequence names}, for every SR Orthanc holds."""
    out: dict[str, dict[str, set[str]]] = {}
    base = c.orthanc.url
    with urllib.request.urlopen(f"{base}/instances", timeout=30) as r:
        ids = json.loads(r.read())
    for iid in ids:
        with urllib.request.urlopen(f"{base}/instances/{iid}/simplified-tags", timeout=30) as r:
            tags = json.loads(r.read())
        if tags.get("Modality") == "SR":
            text = json.dumps(tags.get("PredecessorDocumentsSequence", []))
            named = set(re.findall(r'"ReferencedSOPInstanceUID": "([0-9.]+)"', text))
            out.setdefault(tags["StudyInstanceUID"], {})[tags["SOPInstanceUID"]] = named
    return out


def _one_report_chain(srs: dict[str, set[str]]) -> bool:
    """The SRs of one study are one chain of versions: exactly one without a predecessor among
    them, every other naming one of them, none named twice. Two SRs for the same analysis (a
    resend with new UIDs) would be two roots."""
    roots = [uid for uid, named in srs.items() if not named & srs.keys()]
    named = [p for ps in srs.values() for p in ps if p in srs]
    return len(roots) == 1 and len(named) == len(set(named)) == len(srs) - 1


def make_studies(root: Path, n: int, seed: int) -> list[Path]:
    from training.phantoms import synthesize_case, write_study

    return [
        write_study(synthesize_case(seed + i, cspca=i % 2 == 0), root, distractors=False)
        for i in range(n)
    ]


def run_campaign(
    work: Path, *, rounds: int = 4, ray_rounds: int = 0, seed: int = 12, workers: int = 2
) -> dict[str, Any]:
    """`rounds` SIGKILL rounds (the last `ray_rounds` on the Ray backend), each sending a new
    phantom study, then the final checks; returns the report (AssertionError on a failure)."""
    studies = rounds
    from cli.demo.pacs import OrthancPacs

    rng = random.Random(seed)
    dicom_port, http_port = free_ports(2)
    with OrthancPacs(work / "orthanc") as orthanc:
        c = Campaign(
            work=work,
            config=_config(work, dicom_port, http_port, orthanc.aet, orthanc.dicom_port, workers),
            dicom_port=dicom_port,
            orthanc=orthanc,
            studies=make_studies(work / "studies", studies, seed),
            log=work / "serve.log",
            workers=workers,
        )
        t0 = time.monotonic()
        for i in range(rounds):
            phase = PHASES[i % len(PHASES)]
            previous = c.studies[i - 1] if i else None
            _round(c, rng, phase, c.studies[i], previous, ray=i >= rounds - ray_rounds)
        # recovery: start once more, resend everything (duplicates are acknowledged as such)
        proc = _start(c, ray=False)
        try:
            for study in c.studies:
                _send_all(c, _files(study))
            settled = _wait(
                lambda: (
                    _db(c, "SELECT count(*) FROM studies")[0][0] == studies
                    and not _db(c, "SELECT 1 FROM studies WHERE status != 'sent'")
                    and not _db(c, "SELECT 1 FROM outbox WHERE state IN ('pending', 'dead')")
                ),
                600,
                0.5,
            )
            c.peak_rss_mb = max(c.peak_rss_mb, _rss_tree(proc.pid))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                _kill(proc)
        indexed = dict(_db(c, "SELECT sop_instance_uid, path FROM instances"))
        lost = [u for u in c.acked if u not in indexed or not Path(indexed[u]).is_file()]
        stuck = _db(c, "SELECT study_instance_uid, status FROM studies WHERE status != 'sent'")
        srs = _orthanc_srs(c)
        doctor = subprocess.run(
            [sys.executable, "-m", "cli.main", "doctor", "--config", str(c.config), "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        report = {
            "rounds": rounds,
            "ray_rounds": ray_rounds,
            "workers": workers,
            "kills": c.kills,
            "kills_after_phase_passed": c.missed,
            "studies": studies,
            "instances": sum(len(_files(s)) for s in c.studies),
            "acknowledged": len(c.acked),
            "lost": len(lost),
            "stuck": len(stuck),
            "settled": settled,
            "srs_in_orthanc": {uid: len(v) for uid, v in srs.items()},
            "sr_chains_ok": all(_one_report_chain(v) for v in srs.values()),
            "doctor_exit": doctor.returncode,
            "peak_rss_mb": round(c.peak_rss_mb, 1),
            "seconds": round(time.monotonic() - t0, 1),
        }
    assert not lost, f"acknowledged instances lost: {lost[:5]}"
    assert not stuck and settled, f"studies stuck: {stuck[:5]} ({c.log.read_text()[-2000:]})"
    # one report per study, or one chain of versions when more instances came after a report
    assert len(srs) == studies and report["sr_chains_ok"], report
    assert doctor.returncode == 0, doctor.stdout[-2000:]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--ray-rounds", type=int, default=0, help="last N rounds on Ray Serve")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2, help="dicom.workers of the server")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="radtriage-crash-"))
    try:
        report = run_campaign(
            work,
            rounds=args.rounds,
            ray_rounds=args.ray_rounds,
            seed=args.seed,
            workers=args.workers,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
