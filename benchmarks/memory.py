"""Memory of a whole process tree (the server, Ray's GCS/raylet, Serve replicas, workers),
sampled from /proc on Linux; psutil is not needed.

RSS counts a shared page once per process that maps it (Ray's object store, shared libraries),
so the tree's RSS sum overstates what the tree costs; PSS (/proc/PID/smaps_rollup) divides each
shared page among its mappers and sums to the real footprint. Both are recorded.

    sampler = TreeSampler(server.pid, interval_s=0.2)
    sampler.start(); ...; sampler.stop()
    sampler.summary()  # {"peak_rss_mb", "peak_pss_mb", "peak_processes", "top_at_peak", ...}
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROC = Path("/proc")
MB = 1024 * 1024


def _ppid(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_tree(root_pid: int) -> list[int]:
    """`root_pid` and all its live descendants (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            ppid = _ppid(int(entry.name))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _kb(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def process_memory(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) of one process in bytes, or None when it has gone."""
    try:
        rollup = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        try:
            status = (PROC / str(pid) / "status").read_text()
        except OSError:
            return None
        rss = _kb(status, "VmRSS:") * 1024
        return rss, rss
    return _kb(rollup, "Rss:") * 1024, _kb(rollup, "Pss:") * 1024


def process_name(pid: int) -> str:
    """A short label: Ray's titles (``ray::ServeReplica:...``), else the program and module."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    if words[0].startswith("ray::"):  # e.g. ray::ServeReplica:app:Name.handle_request
        return words[0].split(" ")[0].split(".")[0][:60]
    program = Path(words[0]).name
    if program.startswith("python") and len(words) > 2 and words[1] == "-m":
        return f"python -m {words[2]}"
    if program.startswith("python") and len(words) > 1:
        return f"python {Path(words[1]).name}"
    return program[:60]


@dataclass
class Sample:
    t: float
    processes: int
    rss: int
    pss: int


@dataclass
class TreeSampler:
    """Samples the memory of `root_pid`'s process tree every `interval_s` on a thread."""

    root_pid: int
    interval_s: float = 0.2
    samples: list[Sample] = field(default_factory=list)
    peak_breakdown: dict[str, float] = field(default_factory=dict)
    seen_pids: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample_once(self) -> Sample:
        per: dict[int, tuple[int, int]] = {}
        for pid in process_tree(self.root_pid):
            mem = process_memory(pid)
            if mem is not None:
                per[pid] = mem
        self.seen_pids.update(per)
        s = Sample(
            time.time(),
            len(per),
            sum(r for r, _ in per.values()),
            sum(p for _, p in per.values()),
        )
        if not self.samples or s.pss > max(x.pss for x in self.samples):
            breakdown: dict[str, float] = {}
            for pid, (_, pss) in per.items():
                name = process_name(pid)
                breakdown[name] = breakdown.get(name, 0.0) + pss / MB
            self.peak_breakdown = breakdown
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample_once()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def start(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def summary(self, since: float | None = None) -> dict[str, Any]:
        """Peaks over the samples taken at or after `since` (all when None); the per-process
        breakdown is that of the highest-PSS sample overall."""
        chosen = [s for s in self.samples if since is None or s.t >= since]
        if not chosen:
            return {"samples": 0}
        peak = max(chosen, key=lambda s: s.pss)
        top = sorted(self.peak_breakdown.items(), key=lambda kv: -kv[1])[:8]
        return {
            "samples": len(chosen),
            "interval_s": self.interval_s,
            "peak_rss_mb": round(max(s.rss for s in chosen) / MB, 1),
            "peak_pss_mb": round(peak.pss / MB, 1),
            "mean_pss_mb": round(sum(s.pss for s in chosen) / len(chosen) / MB, 1),
            "peak_processes": max(s.processes for s in chosen),
            "top_pss_mb_at_peak": {name: round(mb, 1) for name, mb in top},
        }
