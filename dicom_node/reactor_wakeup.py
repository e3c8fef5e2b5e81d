"""Wake pynetdicom's reactor threads when there is work instead of after a fixed 1 ms nap.

pynetdicom 3 runs two threads per association and both poll: the DUL thread sleeps
``time.sleep(0.001)`` whenever a loop found nothing to do (so a PDU that arrives, or a
response our handler queues, waits up to 1 ms), and the association thread sleeps 1 ms before
every look at its DIMSE queue. One C-STORE crosses both naps at least twice (request in,
response out): about 2 ms of latency per instance on one association, plus the CPU of the
empty loops, measured in ``docs/scaling.md``.

`install` replaces the ``time`` name inside ``pynetdicom.association`` and ``pynetdicom.dul``
by `ReactorClock`, whose ``sleep`` is the real one except on a reactor thread that `attach`
equipped with a waiter. There it waits *at most* as long (so every timeout, idle timer and
shutdown path of pynetdicom behaves as before) but returns as soon as:

- association thread: a decoded DIMSE message or a primitive for the user arrived (its two
  queues notify an event);
- DUL thread: the socket is readable (TLS: decrypted bytes are pending) or a primitive was
  queued for sending (the send queue writes a byte to a pipe the DUL selects on).

Because both waits end on work, the idle naps themselves can be longer than pynetdicom's 1 ms
(`IDLE_WAIT_S`): a reactor with nothing to do wakes 50 times a second instead of 1,000, and
no longer takes the GIL from the thread that is storing an instance. What is not signalled
(the network and ARTIM timers, a flag set by another thread) is seen at most `IDLE_WAIT_S`
later; the end of the DUL thread and `Association.kill` wake the association thread at once,
and a DUL in state Sta1 (closed, about to be stopped) keeps the 1 ms nap.

No pynetdicom code is copied or changed; patches/README.md has the upstream proposal (the
same waits inside pynetdicom's reactors).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

_real_sleep = time.sleep

#: The idle nap of pynetdicom's association reactor (``Association._run_reactor``) and DUL
#: reactor (``DULServiceProvider._run_loop_delay``).
REACTOR_NAP_S = 0.001
#: How long an idle reactor thread waits instead, unless woken by work (module docstring).
IDLE_WAIT_S = 0.02


class ReactorClock:
    """Stands in for the ``time`` module inside pynetdicom's reactor modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        waiter: Callable[[float], None] | None = getattr(
            threading.current_thread(), "radtriage_wait", None
        )
        if waiter is None:
            _real_sleep(seconds)
        else:
            waiter(seconds)


class _NotifyingQueue(queue.Queue):  # type: ignore[type-arg]
    """A `queue.Queue` that calls ``radtriage_notify`` after every put."""

    radtriage_notify: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.radtriage_notify()


_installed = False


def install() -> None:
    """Swap the ``time`` of pynetdicom's reactor modules (idempotent)."""
    global _installed
    if _installed:
        return
    from pynetdicom import association, dul

    association.time = ReactorClock()  # type: ignore[assignment]
    dul.time = ReactorClock()  # type: ignore[assignment]
    _installed = True


def attach(assoc: Any) -> None:
    """Give a new acceptor association and its DUL thread their waiters (before they start)."""
    install()
    ready = threading.Event()

    def assoc_wait(seconds: float) -> None:
        if ready.wait(IDLE_WAIT_S if seconds == REACTOR_NAP_S else seconds):
            ready.clear()

    for q in (assoc.dimse.msg_queue, assoc.dul.to_user_queue):
        q.__class__ = _NotifyingQueue
        q.radtriage_notify = ready.set
    assoc.radtriage_wait = assoc_wait
    kill = assoc.kill

    def kill_and_wake() -> None:  # `_kill` is a flag: wake the reactor to see it
        kill()
        ready.set()

    assoc.kill = kill_and_wake

    dul = assoc.dul
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    pipe_lock = threading.Lock()
    pipe_open = [True]  # never write to a closed descriptor: its number may be reused

    def notify_dul() -> None:
        with pipe_lock, contextlib.suppress(OSError):  # a full pipe: the DUL is awake anyway
            if pipe_open[0]:
                os.write(wake_w, b"\x01")

    def dul_wait(seconds: float) -> None:
        sock = getattr(dul.socket, "socket", None)
        if sock is None:
            _real_sleep(seconds)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        if seconds == REACTOR_NAP_S and dul.state_machine.current_state != "Sta1":
            seconds = IDLE_WAIT_S  # in Sta1 `stop_dul` waits for the flag it set: stay brisk
        try:
            readable, _, _ = select.select([sock, wake_r], [], [], seconds)
        except (OSError, ValueError):  # socket closed under us: pynetdicom notices next
            _real_sleep(seconds)
            return
        if wake_r in readable:
            with contextlib.suppress(OSError):
                os.read(wake_r, 4096)

    dul.to_provider_queue.__class__ = _NotifyingQueue
    dul.to_provider_queue.radtriage_notify = notify_dul
    dul.radtriage_wait = dul_wait

    run = dul._target  # the DUL thread's body: close the pipe when it ends

    def run_and_close() -> None:
        try:
            run()
        finally:
            dul.radtriage_wait = None
            ready.set()  # the association reactor checks `dul.is_alive()` next
            with pipe_lock:
                pipe_open[0] = False
                for fd in (wake_r, wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)

    dul._target = run_and_close
