"""The sender: C-STORE of result documents (SR, SEG) from the durable outbox to destinations.

Each outbox row is one (destination, SOP Instance) pair. A due row is sent in one association
per destination per round; success (0x0000 or a warning 0xB000/0xB006/0xB007) marks it
``sent``; anything else (association refused, network error, failure status) counts an attempt
and schedules the next one with exponential backoff (``sender.initial_backoff_s`` doubling up to
``sender.max_backoff_s``); after ``sender.max_attempts`` the row is ``dead`` (a dead letter,
listed by `Index.dead_letters` for the API) and its study becomes ``failed``. When every row of a
``reported`` study is sent, the study becomes ``sent``.

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
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from sqlalchemy import select

from core.domain import StudyStatus
from core.errors import DestinationError
from core.settings import Destination, SenderSettings, TlsSettings
from dicom_node.index import OUTBOX_DEAD, OUTBOX_PENDING, OUTBOX_SENT, Index, OutboxItem
from dicom_node.jobs import transition, unsent_documents

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


def backoff_s(attempts: int, settings: SenderSettings) -> float:
    """Delay before attempt number ``attempts + 1`` (``attempts`` >= 1 failed so far)."""
    return float(
        min(settings.max_backoff_s, settings.initial_backoff_s * 2 ** max(0, attempts - 1))
    )


@dataclass(frozen=True)
class _Due:
    id: int
    study_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    attempts: int


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
        self.calling_ae_title = calling_ae_title
        self.tls = tls
        self.clock = clock

    def run_once(self) -> int:
        """Send every due item of this node; returns how many were sent."""
        now = self.clock()
        with self.index.read() as s:
            rows = s.scalars(
                select(OutboxItem)
                .where(
                    OutboxItem.state == OUTBOX_PENDING,
                    OutboxItem.next_attempt_at <= now,
                    self.index.mine(OutboxItem.node_id),
                )
                .order_by(OutboxItem.id)
            ).all()
        by_dest: dict[str, list[_Due]] = defaultdict(list)
        for r in rows:
            by_dest[r.destination].append(
                _Due(
                    r.id,
                    r.study_instance_uid,
                    r.sop_instance_uid,
                    r.sop_class_uid,
                    r.path,
                    r.attempts,
                )
            )
        sent = 0
        for name, items in by_dest.items():
            dest = self.destinations.get(name)
            if dest is None:
                for item in items:
                    self._failed(item, f"destination {name!r} is no longer configured", dead=True)
                continue
            sent += self._send(dest, items)
        return sent

    def _send(self, dest: Destination, items: list[_Due]) -> int:
        from pynetdicom import AE

        datasets: list[tuple[_Due, Any]] = []
        for item in items:
            try:
                datasets.append((item, pydicom.dcmread(item.path)))
            except Exception as exc:
                self._failed(item, f"cannot read {item.path}: {exc}", dead=True)
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
                self._failed(item, error)
            return 0
        sent = 0
        try:
            for item, ds in datasets:
                try:
                    status = assoc.send_c_store(self.negotiated(assoc, ds))
                    code = int(status.Status) if status is not None and "Status" in status else -1
                except Exception as exc:
                    self._failed(item, f"C-STORE to {dest.name} failed: {exc}")
                    continue
                if code in SUCCESS_STATUSES:
                    self._sent(item)
                    sent += 1
                else:
                    text = "no response" if code < 0 else f"status 0x{code:04X}"
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

    def _sent(self, item: _Due) -> None:
        now = self.clock()
        with self.index.write() as s:
            row = s.get(OutboxItem, item.id)
            assert row is not None
            row.state = OUTBOX_SENT
            row.attempts += 1
            row.sent_at = now
            row.last_error = None
            pending = unsent_documents(s, item.study_instance_uid)
        if not pending:
            transition(self.index, item.study_instance_uid, StudyStatus.SENT, now=now, sent_at=now)

    def _failed(self, item: _Due, error: str, dead: bool = False) -> None:
        now = self.clock()
        attempts = item.attempts + 1
        dead = dead or attempts >= self.settings.max_attempts
        with self.index.write() as s:
            row = s.get(OutboxItem, item.id)
            assert row is not None
            row.attempts = attempts
            row.last_error = error
            if dead:
                row.state = OUTBOX_DEAD
            else:
                row.next_attempt_at = now + backoff_s(attempts, self.settings)
        if dead:
            log.error(
                "dead letter %s after %d attempts: %s", item.sop_instance_uid, attempts, error
            )
            transition(
                self.index,
                item.study_instance_uid,
                StudyStatus.FAILED,
                now=now,
                error_code=DestinationError.reason_code,
                error_message=error,
            )
        else:
            log.warning(
                "send of %s failed (attempt %d): %s", item.sop_instance_uid, attempts, error
            )
