"""The RIS side of a running node: the HL7 order listener (when ``[hl7] listen_port`` is set),
the HL7 result sender and the FHIR result push (when ``[hl7] fhir_base_url`` is set), started
and stopped together like `dicom_node.node.DicomNode`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from core.periodic import Periodic
from core.settings import Hl7Settings
from ris.fhir import FhirSender
from ris.hl7_listener import Hl7Listener
from ris.hl7_results import Hl7Sender
from store.index import Index
from store.outbox import RetryPolicy

log = logging.getLogger(__name__)


class RisNode:
    """Orders in and results out for one node; `start`/`stop`."""

    def __init__(
        self,
        index: Index,
        settings: Hl7Settings,
        *,
        poll_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        audit: Any = None,
    ) -> None:
        self.listener = (
            Hl7Listener(index, settings, clock=clock, audit=audit) if settings.listen_port else None
        )
        self.sender = Hl7Sender(index, settings, clock=clock)
        self.fhir = (
            FhirSender(index, settings.fhir_base_url, policy=RetryPolicy.of(settings), clock=clock)
            if settings.fhir_base_url
            else None
        )
        self.poll_s = poll_s
        self._sends = Periodic(self.sender.run_once, poll_s, "radtriage-hl7-sender")

    def start(self) -> None:
        if self.listener is not None:
            self.listener.start()
        if self.fhir is not None:
            self.fhir.start()
        self._sends.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._sends.stop(timeout)
        if self.fhir is not None:
            self.fhir.stop()
        if self.listener is not None:
            self.listener.stop()
