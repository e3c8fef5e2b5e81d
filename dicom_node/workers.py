"""Several receiver processes on one DICOM port (``dicom.workers``).

`WorkerPool` (in the node's process) starts ``dicom.workers`` receiver processes
(``python -m dicom_node.workers``), each running its own `dicom_node.scp.StorageSCP` on one
listening socket the pool opened and every worker inherits: one accept queue, so a connection
waits for whichever worker takes it first, and a worker holding more connections than the least
busy one gives the others a head start (`WorkerBoard.busier_than_least`; a connection counts
from the moment it is accepted: counted at A-ASSOCIATE, four simultaneous senders split 3/1 in
2 runs of 6). (``SO_REUSEPORT``, one
queue per worker, hashed each connection to a worker: 4 connections split 2/2 only 3 times in 8,
and a worker that died dropped the connections waiting in its queue.) Each association lives in
one process from A-ASSOCIATE to release. Every worker has the node's store
path (`dicom_node.ingest.Ingest`: validate, spool with fsync, index, then the status), its peer
policy, PDU limits, quarantine and work-queue backpressure; the node's own process keeps the
assembler, the analysis workers and the sender.

Shared between the processes, in ``<storage.root>/run/``:

- ``ingest-workers.bin``: one row per worker (`FIELDS`: open associations and connections,
  and the ingest counters the metrics show), memory-mapped; each field is written alone, so
  writers of different fields never undo each other;
- ``associations.lock``: an ``flock`` held while a worker counts the open associations of all
  workers and takes a slot, so ``dicom.max_associations`` holds across workers. The kernel
  drops the lock of a process that dies, so a killed worker cannot wedge the others.

A worker that dies is started again (at most once a second); its row's open associations are
set to 0 and its counters kept. Its associations end with the connection: an instance was
acknowledged only after it was spooled, fsynced and committed to the index, and an instance it
had not acknowledged may lie in the spool unindexed (indexed by `dicom_node.node.reconcile` at
the next start, or by the sender's resend). A worker whose parent goes away (its stdin closes)
stops.

The worker reads its settings as JSON on stdin (so a database password never shows in ``ps``)
and prints ``READY <port>`` once it listens.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from core.errors import ConfigError
from core.settings import Settings

log = logging.getLogger(__name__)

#: Gauges per worker row (int64 each): open associations (counted against
#: ``dicom.max_associations``) and open connections (from accept to the end of the association
#: thread: what the least busy worker is chosen by, since a connection just accepted has no
#: association yet).
GAUGES = ("associations", "connections")
#: Counters per worker row: what the worker did since it started (kept when it dies).
COUNTERS = (
    "stored",
    "duplicates",
    "bytes",
    "refused_a700",
    "refused_a900",
    "refused_c210",
    "refused_c000",
    "refused_other",
    "queue_refused_studies",
)
FIELDS = GAUGES + COUNTERS
REFUSED = tuple(f for f in COUNTERS if f.startswith("refused_"))
_REFUSED_FIELD = {0xA700: "refused_a700", 0xA900: "refused_a900", 0xC210: "refused_c210"}
_REFUSED_FIELD |= {0xC000: "refused_c000"}
_ROW = struct.Struct(f"<{len(FIELDS)}q")
_FIELD = struct.Struct("<q")
_OFFSET = {name: i * _FIELD.size for i, name in enumerate(FIELDS)}
START_TIMEOUT_S = 120.0
RESTART_MIN_INTERVAL_S = 1.0


class WorkerBoard:
    """The shared counter rows (a memory-mapped file) and the association lock."""

    def __init__(self, folder: Path, workers: int, create: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.path = folder / "ingest-workers.bin"
        size = _ROW.size * workers
        if create:
            self.path.write_bytes(b"\x00" * size)
        self._fd = os.open(self.path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, size)
        self._lock_fd = os.open(folder / "associations.lock", os.O_RDWR | os.O_CREAT, 0o640)
        self._thread_lock = threading.Lock()  # flock is per open file, not per thread

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
        os.close(self._lock_fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def row(self, worker: int) -> dict[str, int]:
        return dict(zip(FIELDS, _ROW.unpack_from(self._map, worker * _ROW.size), strict=True))

    def set(self, worker: int, **values: int) -> None:
        """Write the named fields of `worker`'s row (only those: the receiver's threads write
        its counters, gauges and connection count independently)."""
        for name, value in values.items():
            _FIELD.pack_into(self._map, worker * _ROW.size + _OFFSET[name], value)

    def add(self, worker: int, field: str, delta: int) -> None:
        """Add `delta` to one gauge of `worker` (never below 0), under the lock."""
        with self.locked():
            self.set(worker, **{field: max(0, self.row(worker)[field] + delta)})

    def open_associations(self) -> int:
        return sum(self.row(i)["associations"] for i in range(self.workers))

    def busier_than_least(self, worker: int) -> bool:
        """Whether `worker` holds more open connections than the least busy worker (a read
        without the lock: a hint for who accepts next, not a count that must hold)."""
        counts = [self.row(i)["connections"] for i in range(self.workers)]
        return counts[worker] > min(counts)

    def take_slot(self, worker: int, limit: int) -> bool:
        """Count one more open association for `worker` unless all workers hold `limit`."""
        with self.locked():
            if self.open_associations() >= limit:
                return False
            self.set(worker, associations=self.row(worker)["associations"] + 1)
            return True

    def free_slot(self, worker: int) -> None:
        self.add(worker, "associations", -1)


def refused_field(status: int) -> str:
    return _REFUSED_FIELD.get(status, "refused_other")


class WorkerPool:
    """Starts, watches and stops the receiver processes of one node."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = settings.dicom.workers
        self.folder = Path(settings.storage.root).resolve() / "run"
        self.board: WorkerBoard | None = None
        self.port = settings.dicom.port
        self.restarts = 0
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * self.workers
        self._retired: dict[str, int] = dict.fromkeys(FIELDS, 0)
        self._reservation: socket.socket | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()

    def _reserve_port(self) -> None:
        """The one listening socket every worker inherits (a port 0 becomes a real one; a port
        taken by another program fails here, before any worker starts). Connections that
        arrive while a worker restarts wait in its queue."""
        d = self.settings.dicom
        family = socket.AF_INET6 if ":" in d.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((d.bind_address, d.port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on {d.bind_address}:{d.port}: {exc}; choose a free dicom.port"
            ) from exc
        sock.setblocking(False)  # workers race for each connection; the losers must not block
        self.port = int(sock.getsockname()[1])
        self._reservation = sock

    def start(self) -> None:
        self._reserve_port()
        self.board = WorkerBoard(self.folder, self.workers, create=True)
        for i in range(self.workers):
            self._procs[i] = self._spawn(i)
        for i in range(self.workers):
            self._wait_ready(i)
        self._monitor = threading.Thread(target=self._watch, name="radtriage-workers", daemon=True)
        self._monitor.start()
        log.info("DICOM port %d served by %d receiver processes", self.port, self.workers)

    def _spawn(self, worker: int) -> subprocess.Popen[bytes]:
        dicom = self.settings.dicom.model_copy(update={"port": self.port})
        settings = self.settings.model_copy(update={"dicom": dicom})
        assert self._reservation is not None
        listen_fd = self._reservation.fileno()
        cmd = [sys.executable, "-m", "dicom_node.workers", "--worker", str(worker)]
        cmd += ["--workers", str(self.workers), "--listen-fd", str(listen_fd)]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
            pass_fds=(listen_fd,),
        )
        assert proc.stdin is not None
        proc.stdin.write(settings.model_dump_json().encode() + b"\n")
        proc.stdin.flush()  # stays open: its end tells the worker that we are gone
        return proc

    def _wait_ready(self, worker: int) -> None:
        proc = self._procs[worker]
        assert proc is not None and proc.stdout is not None
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not line or not line[0].startswith(b"READY"):
            self.stop()
            raise ConfigError(
                f"DICOM receiver process {worker} did not start (exit code {proc.poll()}); "
                "see its log"
            )

    def _watch(self) -> None:
        last_start = [time.monotonic()] * self.workers
        while not self._stopping.wait(0.2):
            for i, proc in enumerate(self._procs):
                if proc is None or proc.poll() is None or self._stopping.is_set():
                    continue
                log.error(
                    "DICOM receiver process %d (pid %d) exited with %s; starting it again",
                    i,
                    proc.pid,
                    proc.returncode,
                )
                self._retire(i)
                wait = RESTART_MIN_INTERVAL_S - (time.monotonic() - last_start[i])
                if wait > 0 and self._stopping.wait(wait):
                    return
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._procs[i] = self._spawn(i)
                    last_start[i] = time.monotonic()
                    self.restarts += 1
                try:
                    self._wait_ready(i)
                except ConfigError:
                    log.exception("receiver process %d did not start again", i)

    def _retire(self, worker: int) -> None:
        """Keep a dead worker's counters and free its association slots."""
        board = self.board
        assert board is not None
        with board.locked():
            row = board.row(worker)
            for f in COUNTERS:
                self._retired[f] += row[f]
            board.set(worker, **dict.fromkeys(FIELDS, 0))

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def totals(self) -> dict[str, int]:
        """Counters summed over the workers (and the workers that died before)."""
        out = dict(self._retired)
        if self.board is not None:
            for i in range(self.workers):
                for f, v in self.board.row(i).items():
                    out[f] += v
        return out

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running associations finish their message, stop the workers."""
        self._stopping.set()
        with self._lock:
            procs = [p for p in self._procs if p is not None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(5)
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        if self.board is not None:
            self.board.close()
            self.board = None


#: GIL switch interval of a receiver process (Python's default is 5 ms)
RECEIVER_SWITCH_INTERVAL_S = 0.0005
#: Pending connections the shared listening socket holds (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 128


def run_worker(settings: Settings, worker: int, workers: int, listen_fd: int) -> int:
    """One receiver process: the node's store path behind an SCP on the pool's socket."""
    from dicom_node.node import WorkQueue
    from dicom_node.scp import StorageSCP, StoreHandler
    from store.index import Index
    from store.spool import Spool

    d = settings.dicom
    # Each association's DUL thread (which also stores: dimse_fastpath) blocks on I/O several
    # times per instance (recv, write, fsync, rename, commit, send); with the default 5 ms
    # switch interval a thread that wakes may wait that long for the GIL while another
    # association computes. 0.5 ms: 4 senders on 2 receivers 376 -> 446 instances/s; kept
    # after the in-thread store, where 2 ms and 5 ms scaled worse (docs/scaling.md).
    sys.setswitchinterval(RECEIVER_SWITCH_INTERVAL_S)
    board = WorkerBoard(Path(settings.storage.root).resolve() / "run", workers, create=False)
    spool = Spool(settings.storage.root, d.low_water_mark_mb)
    index = Index(settings.storage.database_url, settings.node_id, settings.site_id)
    queue = WorkQueue(index, d.max_queued_studies)
    handler = StoreHandler(spool, index, max_instance_bytes=d.max_instance_bytes)
    handler.ingest.admit = queue.admit

    def publish() -> None:
        stats = handler.stats
        refused = dict.fromkeys(REFUSED, 0)
        for status, n in stats.refused.items():
            refused[refused_field(status)] += n
        board.set(
            worker,
            stored=stats.stored,
            duplicates=stats.duplicates,
            bytes=stats.bytes,
            queue_refused_studies=queue.refused_studies,
            **refused,
        )

    handler.after_store = publish
    scp = StorageSCP(d, handler, listen_fd=listen_fd, board=(board, worker))
    scp.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C goes to the parent

    def parent_gone() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):  # blocks until the parent closes the pipe or dies
                pass
        stop.set()

    threading.Thread(target=parent_gone, name="parent-watch", daemon=True).start()
    print(f"READY {scp.port}", flush=True)
    os.dup2(2, 1)  # nobody reads our stdout pipe after READY: anything printed goes to the log
    stop.wait()
    scp.stop()
    index.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dicom_node.workers", description=__doc__)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True, help="the inherited socket")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s[worker {args.worker}]: %(message)s",
    )
    settings = Settings.model_validate(json.loads(sys.stdin.buffer.readline()))
    return run_worker(settings, args.worker, args.workers, args.listen_fd)


if __name__ == "__main__":
    raise SystemExit(main())
