"""The sender: the DICOM channel of the one outbox (`store.outbox`), C-STORE of result
documents (SR, SEG) to destinations.

Each DICOM outbox item is one (destination, SOP Instance) pair. The due items
(`store.outbox.due`: in order per study and destination, a newer SR having withdrawn an
older pending one) are sent in one association per destination per round; success (0x0000 or a
warning 0xB000/0xB006/0xB007) marks an item ``sent``; anything else (association refused,
network error, failure status) is a failed attempt (`store.outbox.record_failure`:
backoff from ``[sender]`` ``initial_backoff_s`` doubling up to ``max_backoff_s``, a dead letter
after ``max_attempts``), and the items of the same study behind it wait. A dead letter makes its
study ``failed``. When no DICOM item of a ``reported`` study is left undelivered, the study
becomes ``sent``.

Transfer syntax: each document's SOP Class is proposed with the file's own transfer syntax
plus `FALLBACK_SYNTAXES` (Explicit VR Little Endian, Implicit VR Little Endian, Deflated
Explicit VR Little Endian); what the destination accepts is sent (a compressed file is
decompressed when only an uncompressed syntax is accepted); a destination that accepts none of
them (e.g. only JPEG-LS for SR) fails the document with `DestinationError`, retried as usual.
Resending is idempotent: the documents keep their SOP Instance UIDs.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from core.domain import StudyStatus
from core.errors import DestinationError
from core.settings import Destination, SenderSettings, TlsSettings
from dicom_node.jobs import transition
from store import outbox
from store.index import Index
from store.outbox import Channel, DeliveryRound, DueItem, RetryPolicy

log = logging.getLogger(__name__)

SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
# proposed for every document after its own transfer syntax (docs/conformance.md 2.3)
FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)


def requested_contexts(datasets: Iterable[Any]) -> dict[str, list[str]]:
    """SOP Class UID -> transfer syntaxes to propose, for the documents to send."""
    by_class: dict[str, dict[str, None]] = defaultdict(dict)
    for ds in datasets:
        own = str(ds.file_meta.TransferSyntaxUID)
        for syntax in (own, *FALLBACK_SYNTAXES):
            by_class[str(ds.SOPClassUID)][str(syntax)] = None
    return {sop_class: list(syntaxes) for sop_class, syntaxes in by_class.items()}


class Sender:
    """Drains the outbox. `run_once` does one round; the node calls it in a loop."""

    def __init__(
        self,
        index: Index,
        destinations: list[Destination],
        settings: SenderSettings,
        calling_ae_title: str,
        tls: TlsSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.destinations = {d.name: d for d in destinations}
        self.settings = settings
        self.policy = RetryPolicy.of(settings)
        self.calling_ae_title = calling_ae_title
        self.tls = tls
        self.clock = clock

    def run_once(self) -> int:
        """Send every due DICOM item of this node, in order per study and destination; returns
        how many were sent."""
        by_dest: dict[str, list[DueItem]] = defaultdict(list)
        for item in outbox.due(self.index, Channel.DICOM, self.clock()):
            by_dest[item.destination].append(item)
        sent = 0
        for name, items in by_dest.items():
            dest = self.destinations.get(name)
            round_ = DeliveryRound()
            if dest is None:
                for item in items:
                    if round_.may_send(item):
                        round_.failed(item)
                        self._failed(item, f"destination {name!r} is no longer configured", True)
                continue
            sent += self._send(dest, items, round_)
        return sent

    def _send(self, dest: Destination, items: list[DueItem], round_: DeliveryRound) -> int:
        from pynetdicom import AE

        datasets: list[tuple[DueItem, Any]] = []
        for item in items:
            try:
                datasets.append((item, pydicom.dcmread(item.path or "")))
            except Exception as exc:
                name = Path(item.path or "").name
                self._failed(item, f"cannot read document {name}: {exc}", dead=True)
        if not datasets:
            return 0
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = 15
        ae.dimse_timeout = 60
        ae.network_timeout = 30
        for sop_class, syntaxes in requested_contexts(ds for _, ds in datasets).items():
            ae.add_requested_context(sop_class, syntaxes)
        tls_args = None
        if dest.tls:
            from dicom_node.scp import client_ssl_context

            # the certificate must name dest.host (DNS or IP SAN) unless tls.check_hostname
            # is false
            tls_args = (client_ssl_context(self.tls), dest.host)
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)  # type: ignore[arg-type]
        except Exception as exc:  # socket errors, TLS errors
            assoc = None
            error = f"cannot connect to {dest.name} ({dest.host}:{dest.port}): {exc}"
        else:
            error = (
                f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}) refused or did not "
                "answer the association"
            )
        if assoc is None or not assoc.is_established:
            for item, _ in datasets:
                if round_.may_send(item):  # the first of each study; the rest wait behind it
                    round_.failed(item)
                    self._failed(item, error)
            return 0
        sent = 0
        try:
            for item, ds in datasets:
                if not round_.may_send(item) or not outbox.still_pending(self.index, item.id):
                    continue  # an older item of its study failed (keep the order), or withdrawn
                try:
                    status = assoc.send_c_store(self.negotiated(assoc, ds))
                    code = int(status.Status) if status is not None and "Status" in status else -1
                except Exception as exc:
                    round_.failed(item)
                    self._failed(item, f"C-STORE to {dest.name} failed: {exc}")
                    continue
                if code in SUCCESS_STATUSES:
                    self._sent(item)
                    sent += 1
                else:
                    text = "no response" if code < 0 else f"status 0x{code:04X}"
                    round_.failed(item)
                    self._failed(item, f"C-STORE to {dest.name}: {text}")
        finally:
            assoc.release()
        return sent

    @staticmethod
    def negotiated(assoc: Any, ds: Any) -> Any:
        """`ds` as it can be sent: decompressed if only uncompressed syntaxes were accepted."""
        ts = UID(ds.file_meta.TransferSyntaxUID)
        accepted = {
            str(cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == ds.SOPClassUID
        }
        if not accepted:
            raise DestinationError(f"destination accepts no context for SOP Class {ds.SOPClassUID}")
        if str(ts) in accepted or not ts.is_compressed:
            return ds
        ds.decompress()
        return ds

    def _sent(self, item: DueItem) -> None:
        now = self.clock()
        with self.index.write() as s:
            outbox.record_sent(s, item.id, now)
            pending = outbox.undelivered(s, item.study_instance_uid, Channel.DICOM)
        if not pending:
            transition(self.index, item.study_instance_uid, StudyStatus.SENT, now=now, sent_at=now)

    def _failed(self, item: DueItem, error: str, dead: bool = False) -> None:
        now = self.clock()
        with self.index.write() as s:
            state = outbox.record_failure(s, item.id, error, now, self.policy, permanent=dead)
        if state == outbox.DEAD:
            transition(
                self.index,
                item.study_instance_uid,
                StudyStatus.FAILED,
                now=now,
                error_code=DestinationError.reason_code,
                error_message=error,
            )
