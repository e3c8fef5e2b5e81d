"""DICOMweb for the node: STOW-RS in, QIDO-RS over our results (PS3.18).

- ``POST /dicomweb/studies`` (STOW-RS), only when configured (`StowLimits`, ``[http] stow``;
  otherwise the route does not exist): ``multipart/related; type="application/dicom"``, one
  Part 10 file per part. The body is streamed to a temporary file in the node's storage (never
  held in memory), then read part by part in a worker thread (off the event loop); each part
  goes through `dicom_node.ingest.Ingest.receive_part10`, the same validate -> spool (fsync) ->
  index -> completeness path as C-STORE. The answer is a DICOM JSON Store Instances Response:
  Referenced SOP Sequence (0008,1199) for what was stored, Failed SOP Sequence (0008,1198) with
  Failure Reason (0008,1197, the C-STORE status) and the reason in words (Error Comment
  (0000,0902)) for each part refused. HTTP 200 when all parts were stored, 202 when some were,
  409 when none was; 415 for another media type, 413 above ``max_bytes`` (or a part above
  `MAX_STOW_PART_BYTES`), 503 with Retry-After when ``concurrency`` requests already run or the
  node has no ingest path wired. Who stored what is reported to ``on_store`` (the audit).
- ``GET /dicomweb/studies`` and ``GET /dicomweb/studies/{study}/series`` (QIDO-RS): the studies
  that have our results, and the result series (SR, SEG) of one study, as
  ``application/dicom+json``. Filters: StudyInstanceUID (comma list), PatientID,
  AccessionNumber; ``limit``/``offset`` page (a ``Warning: 299`` header says more results
  exist). Unknown query keys are refused (400), never ignored.
- WADO-RS, for the studies this node holds and the SR/SEG it produced for them:
  ``GET /dicomweb/studies/{study}[/series/{series}[/instances/{instance}]]`` streams the Part 10
  files from disk as ``multipart/related; type="application/dicom"`` (each part labelled with
  the transfer syntax it was stored in: nothing is transcoded, so an Accept that names
  transfer syntaxes not covering every stored one gets 406; naming none means as stored), and
  ``.../metadata`` answers the same instances as ``application/dicom+json`` without Pixel Data.
  UIDs in the path are validated; files come only from the index (`Index.study_files`).
  QIDO searches and WADO retrievals are audit events (``qido``, ``wado``) of the caller.

Authentication is the API's: the router is mounted with the caller's dependencies
(`workspace.app`). Every field of a request is hostile: no path is built from one.
"""

from __future__ import annotations

import json
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Any

import pydicom
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

DICOM_JSON = "application/dicom+json"
MAX_STOW_PART_BYTES = 512 * 1024**2  # one instance (one part) is read into memory
_STOW_BLOCK = 1 << 20
_MAX_PART_HEADERS = 16384
MAX_QIDO_LIMIT = 1000
_QIDO_STUDY_KEYS = {"StudyInstanceUID", "PatientID", "AccessionNumber"}
_QIDO_CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_CHUNK = 1024 * 1024


def _element(vr: str, *values: Any) -> dict[str, Any]:
    present = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": present} if present else {"vr": vr}


def _media_type(header: str) -> tuple[str, dict[str, str]]:
    message = Message()
    message["content-type"] = header
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def _part_content_type(head: bytes) -> str:
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            return _media_type(value.strip())[0]
    return ""


def iter_multipart(
    stream: IO[bytes], boundary: str, max_part_bytes: int = MAX_STOW_PART_BYTES
) -> Iterator[tuple[str, bytes]]:
    """The parts of a multipart body in a seekable `stream` (the spooled request), one at a
    time: (content type, payload). A part's end is found by scanning with one read block in
    memory; its bytes are then read once. Raises ValueError when the body is not delimited by
    `boundary` or a part is above `max_part_bytes`."""
    # RFC 2046 caps boundaries at 70 characters; Orthanc's DICOMweb plugin sends 73: read
    # tolerantly, but bounded
    if not boundary or len(boundary) > 200:
        raise ValueError("multipart boundary missing or longer than 200 characters")
    delimiter = b"--" + boundary.encode("ascii", "strict")
    separator = b"\r\n" + delimiter
    buf = bytearray()
    base = stream.tell()  # the stream offset of buf[0]

    def fill() -> bool:
        block = stream.read(_STOW_BLOCK)
        buf.extend(block)
        return bool(block)

    def consume(n: int) -> None:
        nonlocal base
        del buf[:n]
        base += n

    def find(needle: bytes, limit: int, what: str, at_end: str = "") -> int:
        start = 0
        while (at := buf.find(needle, start)) < 0:
            if len(buf) > limit:
                raise ValueError(what)
            start = max(0, len(buf) - len(needle) + 1)
            if not fill():
                raise ValueError(at_end or "the body ends inside a part (no closing delimiter)")
        return at

    no_parts = "no multipart parts delimited by the boundary"
    consume(find(delimiter, 1 << 20, no_parts, no_parts) + len(delimiter))
    while True:
        while len(buf) < 2 and fill():
            pass
        if buf[:2] == b"--":
            return  # the close delimiter
        consume(find(b"\r\n", 1024, "junk after a multipart delimiter") + 2)
        while len(buf) < 2 and fill():
            pass
        if buf[:2] == b"\r\n":
            head = b""  # no part headers
            consume(2)
        else:
            end = find(b"\r\n\r\n", _MAX_PART_HEADERS, "part headers too long")
            head = bytes(buf[:end])
            consume(end + 4)
        content_start = base
        while (at := buf.find(separator)) < 0:
            if len(buf) >= len(separator):
                consume(len(buf) - len(separator) + 1)  # scanned: only the tail is kept
            if base - content_start > max_part_bytes:
                raise ValueError("a part is too large")
            if not fill():
                raise ValueError("the body ends inside a part (no closing delimiter)")
        content_end = base + at
        if content_end - content_start > max_part_bytes:
            raise ValueError("a part is too large")
        consume(at + len(separator))
        resume = stream.tell()
        stream.seek(content_start)
        payload = stream.read(content_end - content_start)
        stream.seek(resume)
        yield _part_content_type(head), payload


def split_multipart(body: bytes, boundary: str) -> list[tuple[str, bytes]]:
    """The parts of a multipart body held in memory (small bodies; see `iter_multipart`)."""
    import io

    return list(iter_multipart(io.BytesIO(body), boundary, max(len(body), 1)))


@dataclass(frozen=True)
class StowLimits:
    """STOW-RS bounds (``[http] stow_max_bytes``, ``stow_concurrency``)."""

    max_bytes: int = 2 * 1024**3
    concurrency: int = 2


@dataclass(frozen=True)
class StowReport:
    """What one STOW-RS request stored, for the audit: instances per study, parts refused."""

    studies: dict[str, int]
    refused: int


def _failed(content: bytes, status: int, reason: str) -> dict[str, Any]:
    cls = sop = ""
    try:
        from dicom_node.ingest import read_file_meta

        meta, _ = read_file_meta(content)
        cls = meta.get("MediaStorageSOPClassUID", "")
        sop = meta.get("MediaStorageSOPInstanceUID", "")
    except Exception:  # unreadable meta: the failure is reported without UIDs
        pass
    return {
        "00081150": _element("UI", cls),
        "00081155": _element("UI", sop),
        "00081197": _element("US", status),
        "00000902": _element("LO", reason[:64]),
    }


def _page(request: Request, allowed: set[str]) -> tuple[dict[str, list[str]], int, int]:
    params = request.query_params
    unknown = set(params) - allowed - _QIDO_CONTROL
    if unknown:
        raise HTTPException(400, f"unsupported query keys: {', '.join(sorted(unknown))}")
    try:
        limit = int(params.get("limit", 100))
        offset = int(params.get("offset", 0))
    except ValueError as exc:
        raise HTTPException(400, "limit and offset must be integers") from exc
    if not (1 <= limit <= MAX_QIDO_LIMIT and offset >= 0):
        raise HTTPException(400, f"limit must be 1..{MAX_QIDO_LIMIT} and offset >= 0")
    filters = {k: [v for v in params[k].split(",") if v] for k in allowed if params.get(k)}
    return filters, limit, offset


def _paged(rows: list[dict[str, Any]], limit: int, offset: int) -> JSONResponse:
    page = rows[offset : offset + limit]
    headers = {}
    if len(rows) > offset + limit:
        headers["Warning"] = '299 radtriage "There are additional results that can be requested"'
    return JSONResponse(page, media_type=DICOM_JSON, headers=headers)


def _documents(study: dict[str, Any]) -> list[pydicom.Dataset]:
    out: list[pydicom.Dataset] = []
    for path in study.get("documents") or []:
        try:
            out.append(pydicom.dcmread(Path(path), stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError):
            continue  # a document removed by retention: not listed
    return out


def _study_json(study: dict[str, Any], documents: list[pydicom.Dataset]) -> dict[str, Any]:
    series = {str(d.SeriesInstanceUID) for d in documents}
    return {
        "0020000D": _element("UI", study["study_instance_uid"]),
        "00080020": _element("DA", study.get("study_date")),
        "00080050": _element("SH", study.get("accession_number")),
        "00081030": _element("LO", study.get("study_description")),
        "00100020": _element("LO", study.get("patient_id")),
        "00100010": (
            {"vr": "PN", "Value": [{"Alphabetic": study["patient_name"]}]}
            if study.get("patient_name")
            else {"vr": "PN"}
        ),
        "00080061": _element("CS", *sorted({str(d.Modality) for d in documents})),
        "00201206": _element("IS", len(series)),
        "00201208": _element("IS", len(documents)),
    }


def _uid(value: str) -> str:
    if len(value) > 64 or not _UID.fullmatch(value):
        raise HTTPException(400, "not a UID")
    return value


def _audit(request: Request, action: str, study: str | None, **detail: Any) -> None:
    """An audit event of the caller (the web app's trail, when the router is mounted on it)."""
    trail = getattr(request.app.state, "audit", None)
    if trail is None:
        return
    who = getattr(request.state, "principal", None)
    trail.append(
        action,
        user=getattr(who, "name", ""),
        role=getattr(who, "role", ""),
        study_instance_uid=study,
        address=request.client.host if request.client else "",
        detail=detail,
    )


def _accepted_transfer_syntaxes(accept: str) -> set[str] | None:
    """The transfer syntaxes an Accept header names for application/dicom parts; None when it
    names none or ``*`` (the instances then come as stored). Raises 406 when it accepts
    neither multipart/related application/dicom nor any type."""
    if not accept.strip():
        return None
    wanted: set[str] = set()
    acceptable = False
    for item in accept.split(","):
        media, params = _media_type(item.strip())
        part_type = params.get("type", "application/dicom").lower()
        if media in ("*/*", "multipart/*"):
            return None
        if (media == "multipart/related" and part_type == "application/dicom") or (
            media == "application/dicom"
        ):
            acceptable = True
            syntax = params.get("transfer-syntax")
            if syntax is None or syntax == "*":
                return None
            wanted.add(syntax)
    if not acceptable:
        raise HTTPException(406, 'WADO-RS here answers multipart/related; type="application/dicom"')
    return wanted


def _header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError):
        return None  # removed by retention: not served


async def _spool_body(request: Request, body: IO[bytes], limit: int, too_big: str) -> None:
    """Copy the request body to `body` (a file), in blocks written off the event loop."""
    size, pending, pending_bytes = 0, [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, too_big)
        pending.append(chunk)
        pending_bytes += len(chunk)
        if pending_bytes >= _STOW_BLOCK:
            await run_in_threadpool(body.writelines, pending)
            pending, pending_bytes = [], 0
    if pending:
        await run_in_threadpool(body.writelines, pending)


def _store_parts(
    ingest: Any, body: IO[bytes], boundary: str
) -> tuple[dict[str, Any], int, StowReport]:
    """Store each part of the spooled body (a worker thread): the DICOM JSON answer, the HTTP
    status and the report for the audit."""
    stored, failed = [], []
    studies: dict[str, int] = {}
    try:
        for content_type, payload in iter_multipart(body, boundary):
            if content_type not in ("application/dicom", ""):
                failed.append(_failed(payload, 0xC210, f"part is {content_type[:40]}"))
                continue
            outcome = ingest.receive_part10(payload, "stow-rs")
            if outcome.ok:
                cls = _failed(payload, 0, "")["00081150"]
                stored.append(
                    {"00081150": cls, "00081155": _element("UI", outcome.sop_instance_uid)}
                )
                uid = outcome.study_instance_uid or ""
                studies[uid] = studies.get(uid, 0) + 1
            else:
                failed.append(_failed(payload, outcome.status, outcome.reason or "refused"))
    except (ValueError, UnicodeEncodeError) as exc:
        if not stored and not failed:
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        failed.append(_failed(b"", 0xC000, f"malformed multipart body: {exc}"))
    response: dict[str, Any] = {}
    if stored:
        response["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        response["00081198"] = {"vr": "SQ", "Value": failed}
    code = 200 if not failed else 202 if stored else 409
    return response, code, StowReport(studies, len(failed))


def create_dicomweb_router(
    ctx: Any,
    *,
    dependencies: Sequence[Any] = (),
    stow: StowLimits | None = None,
    store_dependencies: Sequence[Any] = (),
    on_store: Callable[[Request, StowReport], None] | None = None,
) -> APIRouter:
    """The DICOMweb routes over `ctx.index` and `ctx.ingest` (`dicom_node.ingest.Ingest`).
    STOW-RS exists only with `stow` limits; `store_dependencies` (who may store) apply to it on
    top of `dependencies`, and `on_store` hears who stored what (the app's audit)."""
    router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=list(dependencies))

    if stow is not None:
        slots = threading.BoundedSemaphore(stow.concurrency)

        @router.post("/studies", dependencies=list(store_dependencies))
        async def store_instances(request: Request) -> JSONResponse:
            """STOW-RS: store the Part 10 files of a multipart/related request."""
            ingest = ctx.ingest
            if ingest is None:
                raise HTTPException(503, "this node has no DICOM ingest path (STOW-RS disabled)")
            media, params = _media_type(request.headers.get("content-type", ""))
            part_type = params.get("type", "application/dicom").lower()
            if media != "multipart/related" or part_type != "application/dicom":
                raise HTTPException(
                    415, 'send multipart/related; type="application/dicom" (Part 10 files)'
                )
            declared = request.headers.get("content-length")
            too_big = f"request above {stow.max_bytes} bytes; split the study"
            if declared and declared.isdigit() and int(declared) > stow.max_bytes:
                raise HTTPException(413, too_big)
            if not slots.acquire(blocking=False):
                raise HTTPException(
                    503, "too many STOW-RS requests at once", headers={"Retry-After": "5"}
                )
            try:
                tmp_dir = ingest.spool.tmp_dir
                tmp_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=tmp_dir) as body:
                    await _spool_body(request, body, stow.max_bytes, too_big)
                    body.seek(0)
                    boundary = params.get("boundary", "")
                    response, code, report = await run_in_threadpool(
                        _store_parts, ingest, body, boundary
                    )
            finally:
                slots.release()
            if on_store is not None:
                await run_in_threadpool(on_store, request, report)
            return JSONResponse(response, status_code=code, media_type=DICOM_JSON)

    def _result_studies(filters: dict[str, list[str]], enough: int) -> list[dict[str, Any]]:
        index = ctx.index
        if "StudyInstanceUID" in filters:
            found = [index.get_study(uid) for uid in filters["StudyInstanceUID"]]
            studies = [s for s in found if s is not None]
        else:  # the filters in SQL, before the page limit
            studies = index.list_studies(
                limit=enough,
                patient_ids=filters.get("PatientID", ()),
                accession_numbers=filters.get("AccessionNumber", ()),
                with_documents=True,
            )
        keys = {"PatientID": "patient_id", "AccessionNumber": "accession_number"}
        return [
            s
            for s in studies
            if s.get("documents")
            and all(s.get(keys[k]) in v for k, v in filters.items() if k in keys)
        ]

    @router.get("/studies")
    def search_studies(request: Request) -> JSONResponse:
        """QIDO-RS: studies with our results (SR/SEG)."""
        filters, limit, offset = _page(request, _QIDO_STUDY_KEYS)
        _audit(request, "qido", None, query=request.url.query[:1024])
        # one more than the page, so that the Warning header can say more exist
        studies = _result_studies(filters, offset + limit + 1)
        rows = [_study_json(s, _documents(s)) for s in studies]
        return _paged(rows, limit, offset)

    @router.get("/studies/{study_instance_uid}/series")
    def search_series(study_instance_uid: str, request: Request) -> JSONResponse:
        """QIDO-RS: the result series (SR, SEG) of one study."""
        if not re.fullmatch(r"[0-9.]{1,64}", study_instance_uid):
            raise HTTPException(400, "not a UID")
        _, limit, offset = _page(request, set())
        _audit(request, "qido", study_instance_uid, query=request.url.query[:1024])
        study = ctx.index.get_study(study_instance_uid)
        if study is None:
            raise HTTPException(404, "no such study")
        by_series: dict[str, list[pydicom.Dataset]] = {}
        for d in _documents(study):
            by_series.setdefault(str(d.SeriesInstanceUID), []).append(d)
        rows = [
            {
                "0020000D": _element("UI", study_instance_uid),
                "0020000E": _element("UI", uid),
                "00080060": _element("CS", str(docs[0].Modality)),
                "00200011": _element("IS", docs[0].get("SeriesNumber")),
                "0008103E": _element("LO", str(docs[0].get("SeriesDescription", ""))),
                "00201209": _element("IS", len(docs)),
            }
            for uid, docs in by_series.items()
        ]
        return _paged(rows, limit, offset)

    # --- WADO-RS ---------------------------------------------------------------------------

    def _files(study: str, series: str | None, instance: str | None) -> list[dict[str, Any]]:
        """The files of a request, from the index only: the node's stored instances and its
        own documents (whose UIDs are read from the files it wrote)."""
        found = ctx.index.study_files(study)
        if found is None:
            raise HTTPException(404, "no such study")
        instances, documents = found
        for path in documents:
            ds = _header(path)
            if ds is None or str(ds.StudyInstanceUID) != study:
                continue
            instances.append(
                {
                    "series_instance_uid": str(ds.SeriesInstanceUID),
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                    "sop_class_uid": str(ds.SOPClassUID),
                    "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
                    "path": path,
                }
            )
        chosen = [
            f
            for f in instances
            if (series is None or f["series_instance_uid"] == series)
            and (instance is None or f["sop_instance_uid"] == instance)
            and f["path"].is_file()
        ]
        if not chosen:
            raise HTTPException(404, "no such series or instance in this study")
        return chosen

    def _classes(files: list[dict[str, Any]]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in files:
            counts[f["sop_class_uid"]] = counts.get(f["sop_class_uid"], 0) + 1
        return counts

    def _retrieve(
        request: Request, study: str, series: str | None = None, instance: str | None = None
    ) -> StreamingResponse:
        study = _uid(study)
        series = _uid(series) if series is not None else None
        instance = _uid(instance) if instance is not None else None
        wanted = _accepted_transfer_syntaxes(request.headers.get("accept", ""))
        files = _files(study, series, instance)
        stored = {f["transfer_syntax_uid"] for f in files}
        if wanted is not None and not stored <= wanted:  # served as stored, never transcoded
            raise HTTPException(
                406,
                f"stored as {', '.join(sorted(stored))}; ask for these or transfer-syntax=*",
            )
        _audit(
            request, "wado", study, series=series, instance=instance, sop_classes=_classes(files)
        )
        boundary = secrets.token_hex(16)

        def body() -> Iterator[bytes]:
            for f in files:
                path: Path = f["path"]
                try:
                    handle = path.open("rb")
                except OSError:
                    continue  # removed since the listing: the part is left out
                with handle:
                    size = path.stat().st_size
                    yield (
                        f"--{boundary}\r\nContent-Type: application/dicom; "
                        f"transfer-syntax={f['transfer_syntax_uid']}\r\n"
                        f"Content-Length: {size}\r\n\r\n"
                    ).encode("ascii")
                    while chunk := handle.read(_CHUNK):
                        yield chunk
                    yield b"\r\n"
            yield f"--{boundary}--\r\n".encode("ascii")

        media = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return StreamingResponse(body(), media_type=media)

    def _metadata(
        request: Request, study: str, series: str | None = None, instance: str | None = None
    ) -> StreamingResponse:
        study = _uid(study)
        series = _uid(series) if series is not None else None
        instance = _uid(instance) if instance is not None else None
        files = _files(study, series, instance)
        _audit(request, "wado", study, series=series, instance=instance, metadata=True)

        def body() -> Iterator[bytes]:
            yield b"["
            first = True
            for f in files:
                ds = _header(f["path"])
                if ds is None:
                    continue
                item = ds.to_json_dict(bulk_data_threshold=2**20)
                item.pop("7FE00010", None)
                yield (b"" if first else b",") + json.dumps(item).encode()
                first = False
            yield b"]"

        return StreamingResponse(body(), media_type=DICOM_JSON)

    @router.get("/studies/{study}", response_class=StreamingResponse)
    def retrieve_study(study: str, request: Request) -> StreamingResponse:
        """WADO-RS: every instance of the study the node holds, and its SR/SEG."""
        return _retrieve(request, study)

    @router.get("/studies/{study}/metadata", response_class=StreamingResponse)
    def study_metadata(study: str, request: Request) -> StreamingResponse:
        """WADO-RS: the study's instances as DICOM JSON (no Pixel Data)."""
        return _metadata(request, study)

    @router.get("/studies/{study}/series/{series}", response_class=StreamingResponse)
    def retrieve_series(study: str, series: str, request: Request) -> StreamingResponse:
        """WADO-RS: one series (an image series the node holds, or our SR or SEG)."""
        return _retrieve(request, study, series)

    @router.get("/studies/{study}/series/{series}/metadata", response_class=StreamingResponse)
    def series_metadata(study: str, series: str, request: Request) -> StreamingResponse:
        """WADO-RS: one series' instances as DICOM JSON."""
        return _metadata(request, study, series)

    @router.get(
        "/studies/{study}/series/{series}/instances/{instance}", response_class=StreamingResponse
    )
    def retrieve_instance(
        study: str, series: str, instance: str, request: Request
    ) -> StreamingResponse:
        """WADO-RS: one instance."""
        return _retrieve(request, study, series, instance)

    @router.get(
        "/studies/{study}/series/{series}/instances/{instance}/metadata",
        response_class=StreamingResponse,
    )
    def instance_metadata(
        study: str, series: str, instance: str, request: Request
    ) -> StreamingResponse:
        """WADO-RS: one instance as DICOM JSON."""
        return _metadata(request, study, series, instance)

    return router
