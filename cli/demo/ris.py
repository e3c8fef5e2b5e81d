"""The demo's RIS (also a test peer): an MLLP server that records every message it receives."""

from __future__ import annotations

import threading

from core.settings import Hl7Settings
from ris.hl7 import Hl7Error, read_header
from ris.hl7_listener import MllpServer, build_ack


class RecordingRis:
    """A minimal RIS for tests and the demo: keeps every message it receives and answers each
    with `ack_code` (AA by default; AE/AR to test the sender's retries and dead letters)."""

    def __init__(
        self, ack_code: str = "AA", settings: Hl7Settings | None = None, port: int = 0
    ) -> None:
        self.ack_code = ack_code
        self.messages: list[str] = []
        self._settings = settings or Hl7Settings(sending_application="RIS")
        self._lock = threading.Lock()
        self.server = MllpServer(self._handle, port=port, name="recording-ris")

    def _handle(self, text: str) -> str:
        with self._lock:
            self.messages.append(text)
            code = self.ack_code
        control_id, version, kind, app, facility = read_header(text)
        error = None if code == "AA" else Hl7Error(code, 207, "test RIS refuses this message")
        event = kind.partition("^")[2]
        return build_ack(
            code,
            control_id,
            version,
            settings=self._settings,
            receiving=(app, facility),
            error=error,
            event=event,
        )

    @property
    def port(self) -> int:
        return self.server.port

    def __enter__(self) -> RecordingRis:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
