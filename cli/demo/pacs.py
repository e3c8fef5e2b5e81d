"""A PACS to talk to in the demo and the benchmarks: Orthanc when installed, else a small
in-process C-STORE receiver.

`OrthancPacs` starts the Debian `Orthanc` binary on loopback with its own config, storage and
index (nothing shared with a system Orthanc), and speaks its REST API with the standard library.
`LocalPacs` is a pynetdicom storage SCP that files what it receives under a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DestinationError

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    """Block until something accepts TCP connections on host:port; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: all are held bound while chosen (`free_port` twice in a row
    may return the same port, which a program given both refuses)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def orthanc_available() -> bool:
    return shutil.which("Orthanc") is not None


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it if it does not stop in `timeout` seconds."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


@dataclass
class OrthancPacs:
    """Orthanc on loopback. `modalities`: name -> (AE title, host, port) it may send to."""

    workdir: Path
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "radtriage-pacs",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {n: list(m) for n, m in self.modalities.items()},
            "Plugins": [],
            "StorageCompression": False,
            "HttpTimeout": 120,
            "DicomScuTimeout": 60,
            "ConcurrentJobs": 2,
            "StableAge": 2,
        }

    def start(self) -> OrthancPacs:
        exe = shutil.which("Orthanc")
        if exe is None:
            raise DestinationError("Orthanc is not installed (Debian package `orthanc`)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        with (self.workdir / "orthanc.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_port(self.http_port, timeout=60)
            wait_port(self.dicom_port, timeout=60)
        except TimeoutError as exc:
            self.stop()
            raise DestinationError(
                f"Orthanc did not start: see {self.workdir / 'orthanc.log'}"
            ) from exc
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def __enter__(self) -> OrthancPacs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- REST -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | None = None,
        timeout: float = 120.0,
    ) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if isinstance(body, dict):
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = resp.read()
        except urllib.error.URLError as exc:
            raise DestinationError(f"Orthanc {method} {path} failed: {exc}") from exc
        return json.loads(payload) if payload else None

    def upload(self, path: Path) -> dict[str, Any]:
        """POST one DICOM file to /instances; returns Orthanc's answer (ParentStudy etc.)."""
        result: dict[str, Any] = self.request("POST", "/instances", path.read_bytes())
        return result

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc's id of the study, or None."""
        ids = self.request("POST", "/tools/lookup", study_instance_uid.encode())
        for item in ids or []:
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def send_study(self, study_instance_uid: str, modality: str) -> None:
        """C-STORE the whole study to a configured modality (what a PACS auto-route does)."""
        orthanc_id = self.find_study(study_instance_uid)
        if orthanc_id is None:
            raise DestinationError(f"study {study_instance_uid} is not in Orthanc")
        self.request(
            "POST",
            f"/modalities/{modality}/store",
            {"Resources": [orthanc_id], "Synchronous": True},
            timeout=600,
        )

    def series_modalities(self, study_instance_uid: str) -> list[str]:
        """Modality of every series Orthanc holds for the study (e.g. to find our SR/SEG)."""
        orthanc_id = self.find_study(study_instance_uid)
        if orthanc_id is None:
            return []
        series = self.request("GET", f"/studies/{orthanc_id}/series")
        return [str(s["MainDicomTags"].get("Modality", "")) for s in series]


class LocalPacs:
    """A minimal C-STORE receiver (pynetdicom) filing instances under `root/<StudyUID>/`."""

    def __init__(self, root: Path, port: int | None = None, aet: str = "DEMOPACS") -> None:
        self.root = root
        self.port = port or free_port()
        self.aet = aet
        self._server: Any = None
        self._lock = threading.Lock()
        self.received: dict[str, list[str]] = {}  # StudyInstanceUID -> Modality of each instance

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        study = str(ds.StudyInstanceUID)
        folder = self.root / study
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        with self._lock:
            self.received.setdefault(study, []).append(str(ds.get("Modality", "")))
        return 0x0000

    def start(self) -> LocalPacs:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.aet)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        self.root.mkdir(parents=True, exist_ok=True)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def series_modalities(self, study_instance_uid: str) -> list[str]:
        with self._lock:
            return list(self.received.get(study_instance_uid, []))

    def __enter__(self) -> LocalPacs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
