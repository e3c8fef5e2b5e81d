"""HL7 v2 test material: order messages as a RIS writes them, a real MLLP client (python-hl7's
asyncio streams), and studies indexed as the SCP would with an Accession Number."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pydicom
from hl7.mllp import open_hl7_connection

from core.domain import ModelInfo, Priority, StudyStatus, TriageResult
from store.index import Index, InstanceRecord, Study

from .peers import make_mr_series


def orm_o01(
    control_id: str,
    placer: str,
    *,
    control: str = "NW",
    patient_id: str = "PAT001",
    issuer: str = "HOSP",
    accession: str = "ACC001",
    priority: str = "R",
    request_date: str = "20261120",
    reason: str = "",
    psa: str | None = None,
    psa_unit: str = "ng/mL",
    version: str = "2.3",
) -> str:
    """An ORM^O01 (v2.3/2.4 style: priority in ORC-7.6, accession in OBR-18)."""
    orc = f"ORC|{control}|{placer}|FIL{placer}||SC||^^^{request_date}^^{priority}||{request_date}"
    obr = (
        f"OBR|1|{placer}|FIL{placer}|MRPROS^MRI prostate^L|||{request_date}||||||"
        f"Raised PSA \\T\\ LUTS|||||{accession}" + "|" * 13 + reason
    )
    segments = [
        f"MSH|^~\\&|RIS|HOSP|RADTRIAGE|HOSP|20261201101500||ORM^O01|{control_id}|P|{version}",
        f"PID|1||{patient_id}^^^{issuer}^MR||Doe^John||19580101|M",
        "PV1|1|O",
        orc,
        obr,
    ]
    if psa is not None:
        segments.append(f"OBX|1|NM|2857-1^PSA^LN||{psa}|{psa_unit}|||||F")
    return "\r".join(segments) + "\r"


def omi_o23(
    control_id: str,
    placer: str,
    *,
    control: str = "NW",
    patient_id: str = "PAT002",
    issuer: str = "HOSP",
    accession: str = "ACC002",
    priority: str = "A",
    request_date: str = "20261118",
    study_uid: str = "",
    psa: str | None = None,
) -> str:
    """An OMI^O23 (v2.5.1: TQ1-9 priority, IPC-1 accession, IPC-3 Study Instance UID)."""
    segments = [
        f"MSH|^~\\&|RIS|HOSP|RADTRIAGE|HOSP|20261201101500||OMI^O23^OMI_O23|{control_id}|P|2.5.1",
        f"PID|1||{patient_id}^^^{issuer}^MR||Doe^Jim||19600101|M",
        f"ORC|{control}|{placer}|FIL{placer}||SC||||{request_date}",
        f"TQ1|1||||||||{priority}",
        f"OBR|1|{placer}|FIL{placer}|MRPROS^MRI prostate^L|||{request_date}",
    ]
    if psa is not None:
        segments.append(f"OBX|1|NM|2857-1^PSA^LN||{psa}|ng/mL|||||F")
    segments.append(f"IPC|{accession}|RP1|{study_uid}|SPS1|MR")
    return "\r".join(segments) + "\r"


async def _send_all(port: int, messages: list[str]) -> list[str]:
    reader, writer = await open_hl7_connection("127.0.0.1", port)
    answers = []
    try:
        for message in messages:
            writer.writeblock(message.encode("utf-8"))
            await writer.drain()
            answers.append(bytes(await asyncio.wait_for(reader.readblock(), 10)).decode())
    finally:
        writer.close()
    return answers


def send(port: int, *messages: str) -> list[str]:
    """Send messages on one MLLP connection; returns each ACK (ER7)."""
    return asyncio.run(_send_all(port, list(messages)))


def segment(message: str, name: str) -> list[str]:
    """The fields of the first `name` segment of an ER7 message ([] when absent)."""
    for line in message.replace("\n", "\r").split("\r"):
        if line.startswith(name + "|"):
            return line.split("|")
    return []


def index_study(
    index: Index,
    folder: Path,
    *,
    patient_id: str,
    accession: str = "",
    issuer: str = "HOSP",
    now: float = 1795507200.0,  # 2026-11-24 (received the day of the analysis)
    slices: int = 2,
    seed: int = 0,
) -> str:
    """Index an MR series as the SCP would (with Accession Number and issuer)."""
    files = make_mr_series(folder, slices, patient_id=patient_id, seed=seed)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        index.add_instance(
            InstanceRecord(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_instance_uid=ds.SeriesInstanceUID,
                study_instance_uid=ds.StudyInstanceUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                path=f,
                size_bytes=f.stat().st_size,
                patient_id=patient_id,
                issuer_of_patient_id=issuer,
                patient_name="Doe^John",
                accession_number=accession,
                modality="MR",
            ),
            now,
        )
    return str(ds.StudyInstanceUID)


MODEL = ModelInfo(name="cspca_detector", version="0.1.0", sha256="0" * 64)


def mark_reported(
    index: Index,
    uid: str,
    *,
    likelihood: float | None,
    priority: Priority,
    days_waited: int | None,
    reported_at: float,
    sr_path: Path | None = None,
    gland_volume_ml: float | None = 40.0,
) -> TriageResult:
    """Put a study in ``reported`` with a result, as the analysis step would."""
    if likelihood is None:
        result = TriageResult(
            study_instance_uid=uid,
            status=StudyStatus.FAILED,
            priority=Priority.NOT_ANALYSED,
            reason={"code": "missing_adc", "message": "no ADC series"},
            days_waited=days_waited,
        )
    else:
        result = TriageResult(
            study_instance_uid=uid,
            status=StudyStatus.REPORTED,
            priority=priority,
            case_likelihood=likelihood,
            gland_volume_ml=gland_volume_ml,
            model=MODEL,
            disclaimer="NOT FOR CLINICAL USE: demonstration model trained on synthetic data.",
            days_waited=days_waited,
        )
    with index.write() as s:
        study = s.query(Study).filter(Study.study_instance_uid == uid).one()
        study.status = StudyStatus.REPORTED.value
        study.result_json = json.dumps(result.to_json_dict())
        study.reported_at = reported_at
        study.previous_sr_path = str(sr_path) if sr_path else None
        study.documents_json = json.dumps([str(sr_path)] if sr_path else [])
    return result
