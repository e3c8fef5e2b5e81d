"""The model repository: `<root>/<name>/<version>/{model.onnx, metadata.json, model_card.md}`.

`<root>/<name>/production.json` names the promoted version that "NAME" resolves to;
`<root>/<name>/promotions.jsonl` is the append-only promotion log (who, when, why, gate result).
"NAME:VERSION" always resolves to that exact version.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.errors import InputError, ModelIntegrityError, ModelNotFoundError
from models.metadata import METADATA_FILE, MODEL_FILE, ModelMetadata, read_metadata

PRODUCTION_FILE = "production.json"
PROMOTION_LOG = "promotions.jsonl"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def default_repository() -> Path:
    """The bundled repository (`models/repository`)."""
    return Path(__file__).resolve().parent / "repository"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_ref(ref: str) -> tuple[str, str | None]:
    """ "NAME" -> (NAME, None); "NAME:VERSION" -> (NAME, VERSION). Raises `InputError`."""
    name, sep, version = ref.partition(":")
    if not _NAME.match(name) or (sep and not _NAME.match(version)):
        raise InputError(f"model reference {ref!r} must look like NAME or NAME:VERSION")
    return name, (version if sep else None)


def _version_key(version: str) -> tuple[Any, ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-]", version))


@dataclass(frozen=True)
class ModelVersion:
    """One version folder, its metadata read and validated (the ONNX file is not read here)."""

    path: Path
    metadata: ModelMetadata

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    def read_verified(self) -> bytes:
        """The bytes of model.onnx after checking them against metadata's sha256.

        The same bytes are then handed to ONNX Runtime, so what was checked is what runs.
        """
        try:
            data = self.onnx_path.read_bytes()
        except FileNotFoundError as exc:
            raise ModelIntegrityError(
                f"{self.onnx_path} is missing; expected a file with sha256 "
                f"{self.metadata.sha256} (re-export or restore the model)"
            ) from exc
        actual = sha256_bytes(data)
        if actual != self.metadata.sha256:
            raise ModelIntegrityError(
                f"{self.onnx_path} has sha256 {actual}, but metadata.json expects "
                f"{self.metadata.sha256}: the file is corrupted or was swapped; refusing to load "
                "it (restore the exported file or re-export the model)"
            )
        return data


class ModelRepository:
    """A folder of model versions with promotion state."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_repository()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if (p / METADATA_FILE).is_file()]
        return sorted(found, key=_version_key)

    def promoted(self, name: str) -> str | None:
        path = self.root / name / PRODUCTION_FILE
        if not path.is_file():
            return None
        return str(json.loads(path.read_text(encoding="utf-8"))["version"])

    def resolve(self, ref: str) -> ModelVersion:
        """ "NAME" (the promoted version) or "NAME:VERSION" -> its folder and metadata."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(
                f"no model named {name!r} in {self.root} (available: {self.names() or 'none'})"
            )
        if version is None:
            version = self.promoted(name)
            if version is None:
                raise ModelNotFoundError(
                    f"model {name!r} has no promoted version in {self.root}; use "
                    f"{name}:VERSION (one of {versions}) or `radtriage models promote`"
                )
        if version not in versions:
            raise ModelNotFoundError(
                f"model {name}:{version} not found in {self.root} (versions: {versions})"
            )
        folder = self.root / name / version
        return ModelVersion(folder, read_metadata(folder / METADATA_FILE))

    def verify(self, ref: str) -> ModelVersion:
        """Resolve `ref` and check model.onnx against its sha256 (raises ModelIntegrityError)."""
        version = self.resolve(ref)
        version.read_verified()
        return version

    def listing(self) -> list[dict[str, Any]]:
        """`radtriage models list --json`: every version with its key facts."""
        rows = []
        for name in self.names():
            promoted = self.promoted(name)
            for v in self.versions(name):
                md = self.resolve(f"{name}:{v}").metadata
                rows.append(
                    {
                        "name": name,
                        "version": v,
                        "promoted": v == promoted,
                        "task": md.task,
                        "sha256": md.sha256,
                        "size_bytes": md.size_bytes,
                        "clinical_use": md.clinical_use,
                        "thresholds": md.thresholds.model_dump() if md.thresholds else None,
                        "metrics": md.metrics,
                        "created": md.created,
                    }
                )
        return rows

    def promotion_log(self, name: str) -> list[dict[str, Any]]:
        path = self.root / name / PROMOTION_LOG
        if not path.is_file():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def promote(
        self,
        ref: str,
        *,
        reason: str = "",
        forced: bool = False,
        gate: dict[str, Any] | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Make NAME:VERSION the version "NAME" resolves to; append to the promotion log.

        The evaluation gate is the caller's job (`cli.commands.models`); `gate` records it.
        """
        name, version = parse_ref(ref)
        if version is None:
            raise InputError(f"promote needs NAME:VERSION, got {ref!r}")
        self.verify(ref)  # never promote a file that does not match its metadata
        entry = {
            "name": name,
            "version": version,
            "previous": self.promoted(name),
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "user": user or _user(),
            "reason": reason,
            "forced": forced,
            "gate": gate,
        }
        folder = self.root / name
        tmp = folder / (PRODUCTION_FILE + ".tmp")
        tmp.write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
        tmp.replace(folder / PRODUCTION_FILE)
        with (folder / PROMOTION_LOG).open("a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")
        return entry


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
