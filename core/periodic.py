"""A round run every few seconds on a daemon thread until stopped: the shape of every background
loop of the node (HL7 and FHIR delivery, the waiting-list clock). A failed round is logged and
the next one runs; `stop` wakes the wait at once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls `round_` every `interval_s` seconds on a thread named `name`."""

    def __init__(self, round_: Callable[[], object], interval_s: float, name: str) -> None:
        self.round = round_
        self.interval_s = interval_s
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:
                log.exception("%s: round failed; continuing", self.name)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
