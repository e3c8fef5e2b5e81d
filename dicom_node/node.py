"""`DicomNode`: the SCP, assembler, job worker and sender, wired and run as threads.

The analysis is injected (`Analyser`, defined in `dicom_node.jobs`): the composition root in
`serving` passes one that calls the models; tests pass their own.

Start-up is also crash recovery: half-written spool files are removed, spool files missing from
the index (acknowledged, then the process died before indexing) are indexed, studies left
``analysing`` go back to ``complete``, and the outbox resumes where it stopped.

Several nodes (one per hospital, each with its own AE title, port and spool) may share one
PostgreSQL index: each node is named by ``dicom.node_id`` (default: its AE title) and touches only
the studies it received (see `store.index`). See docs/scaling.md.

Backpressure: the work queue (studies received, complete or analysing) is bounded by
``dicom.max_queued_studies`` (`WorkQueue`). When it is full, the first instance of a new study
is answered 0xA700 (out of resources) and nothing is kept, so the sender retries later;
instances of studies already queued are always accepted (a study is never half refused).

Run standalone (used by the crash tests)::

    python -m dicom_node.node --config node.toml --analyser package.module:factory

where ``factory(settings) -> Analyser``. SIGTERM/SIGINT stop it gracefully.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import func, select

from core.domain import StudyStatus
from core.errors import ConfigError, OutOfResourcesError, RadtriageError
from core.settings import Settings, load_settings
from dicom_node.assembler import Assembler
from dicom_node.jobs import Analyser, AnalysisOutput, JobWorker, recover
from dicom_node.scp import (
    StorageSCP,
    StoreHandler,
    describe_peer_policy,
    record_from_header,
)
from dicom_node.sender import Sender
from dicom_node.workers import WorkerPool
from store.index import Index, Study
from store.spool import Spool

__all__ = ["Analyser", "AnalysisOutput", "DicomNode", "WorkQueue", "reconcile"]

log = logging.getLogger(__name__)


def reconcile(spool: Spool, index: Index, now: float) -> int:
    """Index every spooled instance the index lacks; returns how many were added."""
    known = index.known_paths()
    added = 0
    for path in sorted(spool.spool_dir.glob("*/*/*.dcm")):
        if str(path) in known:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            rec = record_from_header(
                ds,
                sop_class_uid=str(ds.file_meta.MediaStorageSOPClassUID),
                sop_instance_uid=str(ds.file_meta.MediaStorageSOPInstanceUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=path,
                size_bytes=path.stat().st_size,
                calling_ae_title=str(ds.file_meta.get("SourceApplicationEntityTitle", "")),
            )
        except Exception as exc:
            log.error("spooled file %s is unreadable (%s); moving it to quarantine", path, exc)
            spool.quarantine(path.stem, path.read_bytes(), f"unreadable after restart: {exc}")
            path.unlink(missing_ok=True)
            continue
        if index.add_instance(rec, now):
            added += 1
    return added


#: Study statuses that count as queued work: not yet analysed (or being analysed).
QUEUED_STATUSES = (
    StudyStatus.RECEIVED.value,
    StudyStatus.COMPLETE.value,
    StudyStatus.ANALYSING.value,
)


class WorkQueue:
    """The bounded work queue: this node's studies waiting for or in analysis.

    `depth` counts them in the index (cached for `refresh_s`, plus the new studies admitted
    since, so parallel associations cannot overshoot the bound between two counts). `admit`
    is the ingest hook: a study already in the index is always admitted; a new one only while
    the queue has room, else `OutOfResourcesError` (0xA700)."""

    def __init__(
        self,
        index: Index,
        limit: int,
        refresh_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.index = index
        self.limit = limit
        self.refresh_s = refresh_s
        self.clock = clock
        self.refused_studies = 0
        self._lock = threading.Lock()
        self._counted = 0
        self._counted_at = float("-inf")
        self._admitted: set[str] = set()  # new studies admitted since the last count
        self._seen: set[str] = set()  # studies admitted since the last count

    def _count(self) -> int:
        with self.index.read() as s:
            q = (
                select(func.count())
                .select_from(Study)
                .where(Study.status.in_(QUEUED_STATUSES), self.index.mine(Study.node_id))
            )
            return int(s.scalar(q) or 0)

    def depth(self) -> int:
        """Studies waiting for or in analysis (received, complete, analysing)."""
        with self._lock:
            self._refresh()
            return self._counted + len(self._admitted)

    def _refresh(self) -> None:
        now = self.clock()
        if now - self._counted_at >= self.refresh_s:
            self._counted = self._count()
            self._counted_at = now
            self._admitted.clear()
            self._seen.clear()

    def _known(self, study_instance_uid: str) -> bool:
        with self.index.read() as s:
            q = select(Study.id).where(Study.study_instance_uid == study_instance_uid)
            return s.scalar(q) is not None

    def admit(self, study_instance_uid: str) -> None:
        """Let an instance of `study_instance_uid` in, or raise `OutOfResourcesError`. The
        index is asked about a study at most once per `refresh_s`."""
        with self._lock:
            self._refresh()
            if study_instance_uid in self._seen:
                return
        known = self._known(study_instance_uid)
        with self._lock:
            if known:
                self._seen.add(study_instance_uid)
                return
            if study_instance_uid in self._seen:  # admitted by another association meanwhile
                return
            if self._counted + len(self._admitted) < self.limit:
                self._admitted.add(study_instance_uid)
                self._seen.add(study_instance_uid)
                return
            self.refused_studies += 1
        raise OutOfResourcesError(
            f"the work queue is full ({self.limit} studies waiting for analysis, "
            "dicom.max_queued_studies); resend this study later"
        )


class _Loop(threading.Thread):
    """Calls `step` until stopped; sleeps `interval` when a step found nothing to do."""

    def __init__(
        self, name: str, step: Callable[[], Any], interval: float, wake: threading.Event
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.step = step
        self.interval = interval
        self.wake = wake
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                busy = self.step()
            except Exception:
                log.exception("%s step failed; continuing", self.name)
                busy = None
            if not busy:
                self.wake.wait(self.interval)
                self.wake.clear()


class DicomNode:
    """The DICOM side of radtriage. `start()` binds the port and starts the threads;
    `stop()` stops accepting, lets the running analysis and send finish, and returns."""

    def __init__(
        self,
        settings: Settings,
        analyse: Analyser,
        *,
        poll_interval_s: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.analyse = analyse
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        d = settings.dicom
        self.spool = Spool(settings.storage.root, d.low_water_mark_mb)
        self.node_id = d.node_id or d.ae_title
        self.site_id = settings.site_id  # [site] id, else the node id
        self.index = Index(settings.storage.database_url, self.node_id, self.site_id)
        self._work = threading.Event()
        self._send = threading.Event()
        self.handler = StoreHandler(
            self.spool, self.index, clock=clock, max_instance_bytes=d.max_instance_bytes
        )
        self.queue = WorkQueue(self.index, d.max_queued_studies)
        self.handler.ingest.admit = self.queue.admit
        self.scp = StorageSCP(d, self.handler)
        #: receiver processes on the DICOM port (``dicom.workers`` > 1); else `scp` receives
        self.pool = WorkerPool(settings) if d.workers > 1 else None
        self.assembler = Assembler(self.index, d.stable_age_s, clock=clock)
        self.worker = JobWorker(
            self.index, self.spool, analyse, [x.name for x in d.destinations], clock=clock
        )
        self.sender = Sender(
            self.index, list(d.destinations), settings.sender, d.ae_title, d.tls, clock=clock
        )
        self._loops: list[_Loop] = []

    @property
    def port(self) -> int:
        return self.pool.port if self.pool is not None else self.scp.port

    def _assemble(self) -> bool:
        if self.assembler.poll():
            self._work.set()
        return False

    def _analyse(self) -> bool:
        uid = self.worker.run_once()
        if uid is not None:
            self._send.set()
        return uid is not None

    def _deliver(self) -> bool:
        return self.sender.run_once() > 0

    def start(self) -> None:
        now = self.clock()
        removed = self.spool.clean_tmp()
        adopted = self.index.adopt_unowned()
        if adopted:
            log.info("node %s adopted %d studies indexed before node ids", self.node_id, adopted)
        added = reconcile(self.spool, self.index, now)
        resumed = recover(self.index, now)
        if removed or added or resumed:
            log.info(
                "recovered: %d partial files removed, %d spooled instances indexed, "
                "%d studies resumed",
                removed,
                added,
                len(resumed),
            )
        if self.pool is not None:
            self.pool.start()
        else:
            self.scp.start()
        if self.settings.dicom.open_beyond_loopback:
            log.warning(
                "DICOM port %d is open beyond loopback: %s",
                self.port,
                describe_peer_policy(self.settings.dicom),
            )
        self._loops = [
            _Loop("radtriage-assembler", self._assemble, self.poll_interval_s, threading.Event()),
            *(
                # claims are compare-and-set, so several workers never take the same study
                _Loop(f"radtriage-worker-{i}", self._analyse, self.poll_interval_s, self._work)
                for i in range(self.settings.serving.concurrent_studies)
            ),
            _Loop("radtriage-sender", self._deliver, self.poll_interval_s, self._send),
        ]
        for loop in self._loops:
            loop.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self.pool is not None:
            self.pool.stop(timeout)
        self.scp.stop()
        for loop in self._loops:
            loop.stopping.set()
            loop.wake.set()
        for loop in self._loops:
            loop.join(timeout)
        self._loops = []
        self.index.close()

    def __enter__(self) -> DicomNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- reads for the HTTP API and metrics ---------------------------------------------------

    def list_studies(
        self, status: StudyStatus | str | None = None, all_nodes: bool = False
    ) -> list[dict[str, Any]]:
        """This node's studies; every node's on the shared index with `all_nodes`."""
        return self.index.list_studies(status, all_nodes=all_nodes)

    def get_study(self, study_instance_uid: str) -> dict[str, Any] | None:
        return self.index.get_study(study_instance_uid)

    def outbox(self, state: str | None = None) -> list[dict[str, Any]]:
        return self.index.outbox(state)

    def dead_letters(self) -> list[dict[str, Any]]:
        return self.index.dead_letters()

    def queue_depth(self) -> int:
        """Studies waiting for or in analysis (the `radtriage_queue_depth` metric)."""
        return self.queue.depth()

    def counts(self) -> dict[str, Any]:
        out = self.index.counts()
        stats = self.handler.stats  # this process: STOW-RS, and C-STORE without workers
        refused = {f"0x{k:04X}": v for k, v in (stats.refused or {}).items()}
        ingest = {"stored": stats.stored, "duplicates": stats.duplicates, "bytes": stats.bytes}
        refused_studies = self.queue.refused_studies
        if self.pool is not None:
            totals = self.pool.totals()
            for key in ingest:
                ingest[key] += totals[key]
            for name, n in totals.items():
                if name.startswith("refused_") and n:
                    key = name.removeprefix("refused_").upper().replace("OTHER", "other")
                    key = key if key == "other" else f"0x{key}"
                    refused[key] = refused.get(key, 0) + n
            refused_studies += totals["queue_refused_studies"]
        out["ingest"] = {**ingest, "refused": refused}
        out["queue"] = {
            "depth": self.queue.depth(),
            "limit": self.queue.limit,
            "refused_studies": refused_studies,
        }
        return out


def _load_factory(spec: str) -> Callable[[Settings], Analyser]:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"--analyser must be 'package.module:factory', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load analyser factory {spec!r}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicom_node.node", description=__doc__)
    parser.add_argument("--config", type=Path, help="settings TOML")
    parser.add_argument("--analyser", required=True, help="package.module:factory")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings(args.config)
        node = DicomNode(settings, _load_factory(args.analyser)(settings))
        node.start()
    except RadtriageError as exc:
        log.error("%s", exc.message)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"READY {node.port}", flush=True)
    stop.wait()
    node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
