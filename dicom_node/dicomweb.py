"""DICOMweb for the node: STOW-RS in, QIDO-RS over our results (PS3.18).

- ``POST /dicomweb/studies`` (STOW-RS): ``multipart/related; type="application/dicom"``, one
  Part 10 file per part. Every part goes through `dicom_node.ingest.Ingest.receive_part10`, the
  same validate -> spool (fsync) -> index -> completeness path as C-STORE. The answer is a
  DICOM JSON Store Instances Response: Referenced SOP Sequence (0008,1199) for what was stored,
  Failed SOP Sequence (0008,1198) with Failure Reason (0008,1197, the C-STORE status) and the
  reason in words (Error Comment (0000,0902)) for each part refused. HTTP 200 when all parts
  were stored, 202 when some were, 409 when none was; 415 for another media type, 413 above
  `MAX_STOW_BYTES`, 503 when the node has no ingest path wired.
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
from collections.abc import Iterator, Sequence
from email.message import Message
from pathlib import Path
from typing import Any

import pydicom
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

DICOM_JSON = "application/dicom+json"
MAX_STOW_BYTES = 2 * 1024**3  # one request; larger studies are sent in several requests
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


def split_multipart(body: bytes, boundary: str) -> list[tuple[str, bytes]]:
    """The parts of a multipart body: (content type, payload). Raises ValueError when the
    body is not delimited by `boundary`."""
    # RFC 2046 caps boundaries at 70 characters; Orthanc's DICOMweb plugin sends 73: read
    # tolerantly, but bounded
    if not boundary or len(boundary) > 200:
        raise ValueError("multipart boundary missing or longer than 200 characters")
    delimiter = b"--" + boundary.encode("ascii", "strict")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise ValueError("no multipart parts delimited by the boundary")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # close delimiter
        chunk = chunk.removeprefix(b"\r\n")
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part has no header/body separator")
        content_type = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                content_type = _media_type(value.strip())[0]
        parts.append((content_type, payload.removesuffix(b"\r\n")))
    return parts


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


def create_dicomweb_router(ctx: Any, *, dependencies: Sequence[Any] = ()) -> APIRouter:
    """The DICOMweb routes over `ctx.index` and `ctx.ingest` (`dicom_node.ingest.Ingest`)."""
    router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=list(dependencies))

    @router.post("/studies")
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
        if declared and declared.isdigit() and int(declared) > MAX_STOW_BYTES:
            raise HTTPException(413, f"request above {MAX_STOW_BYTES} bytes; split the study")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_STOW_BYTES:
                raise HTTPException(413, f"request above {MAX_STOW_BYTES} bytes; split the study")
        try:
            parts = split_multipart(bytes(body), params.get("boundary", ""))
        except (ValueError, UnicodeEncodeError) as exc:
            raise HTTPException(400, f"malformed multipart body: {exc}") from exc
        stored, failed = [], []
        for content_type, payload in parts:
            if content_type not in ("application/dicom", ""):
                failed.append(_failed(payload, 0xC210, f"part is {content_type[:40]}"))
                continue
            outcome = await run_in_threadpool(ingest.receive_part10, payload, "stow-rs")
            if outcome.ok:
                cls = _failed(payload, 0, "")["00081150"]
                stored.append(
                    {"00081150": cls, "00081155": _element("UI", outcome.sop_instance_uid)}
                )
            else:
                failed.append(_failed(payload, outcome.status, outcome.reason or "refused"))
        response: dict[str, Any] = {}
        if stored:
            response["00081199"] = {"vr": "SQ", "Value": stored}
        if failed:
            response["00081198"] = {"vr": "SQ", "Value": failed}
        code = 200 if not failed else 202 if stored else 409
        return JSONResponse(response, status_code=code, media_type=DICOM_JSON)

    def _result_studies(filters: dict[str, list[str]], enough: int) -> list[dict[str, Any]]:
        index = ctx.index
        if "StudyInstanceUID" in filters:
            found = [index.get_study(uid) for uid in filters["StudyInstanceUID"]]
            studies = [s for s in found if s is not None]
        else:
            studies = index.list_studies(limit=enough)
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
