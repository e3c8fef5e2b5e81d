"""The model repository: `<root>/<name>/<version>/{model.onnx, metadata.json, model_card.md}`.

Versions are immutable (metadata.json is sealed: `models.metadata`); `derive` writes a new version
from an existing one with other thresholds, calibration or gate, and never touches the original.

`<root>/<name>/production.json` names the promoted version that "NAME" resolves to;
`<root>/<name>/promotions.jsonl` is the append-only promotion log (who, when, why, gate result).
"NAME:VERSION" always resolves to that exact version.

One gate: `ModelRepository.promote` takes a `GateDecision` (made by `evaluation.promotion.gate`)
and refuses a refused, stale or reasonless forced one; `promoted(NAME)` (what "NAME" resolves to
and what the server rolls out) returns a version only when production.json is the last line of
the log and carries an allowing decision, so no path reaches production around the gate.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from core.errors import InputError, ModelError, ModelIntegrityError, ModelNotFoundError
from models.metadata import (
    METADATA_FILE,
    MODEL_FILE,
    ModelMetadata,
    read_metadata,
    write_metadata,
)

log = logging.getLogger(__name__)

PRODUCTION_FILE = "production.json"
PROMOTION_LOG = "promotions.jsonl"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_LINKABLE = frozenset({".onnx", ".pt", ".pth"})  # large, read-only model files


class PromotionRefusedError(ModelError):
    """The promotion gate did not allow this promotion (refused, stale or missing decision)."""

    http_status = 409
    reason_code = "promotion_refused"


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

    def read_verified_member(self, file: str, sha256: str) -> bytes:
        """An ensemble member's ONNX bytes (a plain file name in this folder), checked against
        the sha256 its metadata records."""
        if "/" in file or "\\" in file or file.startswith("."):
            raise ModelIntegrityError(f"{file!r} is not a file name inside {self.path}")
        path = self.path / file
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ModelIntegrityError(f"{path} is missing (ensemble member)") from exc
        if sha256_bytes(data) != sha256:
            raise ModelIntegrityError(
                f"{path} does not match its sha256 in metadata.json: refusing to load it"
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
        """The version "NAME" resolves to: production.json, only when its promotion record
        carries an allowing gate decision (`promotion_record`). The server's rollout reads
        this, so nothing reaches it except through the gate."""
        entry = self.promotion_record(name)
        return None if entry is None else str(entry["version"])

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

    def derive(
        self, ref: str, update: dict[str, Any], new_version: str | None = None
    ) -> ModelVersion:
        """A new version of `ref`'s model, `update` applied to its metadata (sealed,
        `derived_from` = `ref`). Model files are hard-linked where possible, everything else
        copied (editing the new card never edits the old). The original is untouched and
        nothing is promoted. `new_version` defaults to "<base>-t<n>", the next free n. Written
        into a temporary folder and renamed, so a half-written version never appears."""
        source = self.verify(ref)  # derive only from a version whose files are all intact
        name = source.metadata.name
        folder = self.root / name
        version = new_version or self._next_derived(name, source.metadata.version)
        if not _NAME.match(version):
            raise InputError(f"version {version!r} must match {_NAME.pattern}")
        target = folder / version
        if target.exists():
            raise InputError(
                f"{name}:{version} already exists in {self.root}; versions are immutable"
            )
        staging = folder / f".{version}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for item in source.path.iterdir():
                if item.name == METADATA_FILE or not item.is_file():
                    continue
                if item.suffix in _LINKABLE:
                    with contextlib.suppress(OSError):
                        os.link(item, staging / item.name)
                        continue
                shutil.copy2(item, staging / item.name)
            metadata = source.metadata.model_copy(
                update={
                    **update,
                    "version": version,
                    "derived_from": f"{name}:{source.metadata.version}",
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "version_digest": None,
                }
            )
            checked = ModelMetadata.model_validate(metadata.model_dump())
            write_metadata(staging / METADATA_FILE, checked)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.resolve(f"{name}:{version}")

    def _next_derived(self, name: str, version: str) -> str:
        base = re.sub(r"-t\d+$", "", version)
        taken = set(self.versions(name)) | {p.name[1:-4] for p in (self.root / name).glob(".*.tmp")}
        n = 1
        while f"{base}-t{n}" in taken:
            n += 1
        return f"{base}-t{n}"

    def partner(self, ref: str, name: str) -> str:
        """The NAME:VERSION of model `name` that runs with `ref` on one model grid: the
        promoted version when its grid matches, else the newest version that matches (a grid
        change promotes a detector and gland pair). Falls back to the promoted one, whose grid
        mismatch the pipeline then reports."""
        grid = self.resolve(ref).metadata.input_spec
        promoted = self.promoted(name)
        candidates = ([promoted] if promoted else []) + self.versions(name)[::-1]
        for version in candidates:
            if self.resolve(f"{name}:{version}").metadata.input_spec.same_grid(grid):
                return f"{name}:{version}"
        return name

    def verify(self, ref: str) -> ModelVersion:
        """Resolve `ref` and check model.onnx and every ensemble member against their sha256
        (raises ModelIntegrityError); the metadata's seal is checked by `resolve`."""
        version = self.resolve(ref)
        version.read_verified()
        for member in version.metadata.inference.members:
            version.read_verified_member(member.file, member.sha256)
        return version

    def exact(self, ref: str) -> str:
        """ "NAME" or "NAME:VERSION" -> the exact "NAME:VERSION" it resolves to now."""
        md = self.resolve(ref).metadata
        return f"{md.name}:{md.version}"

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
                        "digest": md.digest,
                        "sealed": md.version_digest is not None,
                        "derived_from": md.derived_from,
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

    def promotion_record(self, name: str) -> dict[str, Any] | None:
        """The production.json entry of NAME when it is trustworthy: its gate decision passed,
        was forced with a reason, or is a first promotion or rollback, and it is the last line
        of the append-only promotion log. Anything else (hand-edited, legacy without a gate,
        refused) counts as nothing promoted, with a warning."""
        path = self.root / name / PRODUCTION_FILE
        if not path.is_file():
            return None
        entry = json.loads(path.read_text(encoding="utf-8"))
        log_entries = self.promotion_log(name)
        if not log_entries or log_entries[-1] != entry:
            log.warning(
                "%s does not match the last entry of %s: ignoring it (promote through the gate)",
                path,
                PROMOTION_LOG,
            )
            return None
        if not _decision_allows(entry.get("gate")):
            log.warning("%s carries no passed or forced gate decision: ignoring it", path)
            return None
        return dict(entry)

    def promote(
        self,
        ref: str,
        decision: GateDecision | None = None,
        *,
        reason: str = "",
        user: str | None = None,
        gate: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Make NAME:VERSION the version "NAME" resolves to, on the gate's `decision`.

        `decision` comes from `evaluation.promotion.gate` (the one gate: CLI, training, server
        rollout all read what it wrote). Without one, only a first promotion (nothing promoted
        yet) is allowed. A refused, stale (made against another promoted version) or reasonless
        forced decision raises `PromotionRefusedError`. `gate` is a legacy free-form note,
        recorded but carrying no authority.
        """
        name, version = parse_ref(ref)
        if version is None:
            raise InputError(f"promote needs NAME:VERSION, got {ref!r}")
        self.verify(ref)  # never promote a file that does not match its metadata
        # the log is the lock: one promotion of NAME at a time decides against what is current
        with (self.root / name / PROMOTION_LOG).open("a", encoding="utf-8") as promotions:
            fcntl.flock(promotions.fileno(), fcntl.LOCK_EX)
            current = self.promoted(name)
            if decision is None:
                if current is not None and current != version:
                    raise PromotionRefusedError(
                        f"{name}:{current} is promoted: replacing it with {ref} needs a gate "
                        "decision (radtriage models promote, evaluation.promotion.gate)"
                    )
                decision = GateDecision.first(name, version, current)
            decision.check_applies(name, version, current)
            if decision.outcome == "rollback" and version not in self.rollback_targets(name):
                raise PromotionRefusedError(
                    f"cannot roll back to {ref}: it was never promoted on an allowing gate decision"
                )
            entry = {
                "name": name,
                "version": version,
                "previous": current,
                "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "user": user or _user(),
                "reason": reason or decision.reason,
                "forced": decision.outcome == "forced",
                "gate": decision.to_dict(),
            }
            if gate is not None:
                entry["caller_note"] = gate
            promotions.write(json.dumps(entry, default=str) + "\n")
            promotions.flush()
            os.fsync(promotions.fileno())
            folder = self.root / name
            tmp = folder / (PRODUCTION_FILE + ".tmp")
            tmp.write_text(json.dumps(entry, indent=2, default=str) + "\n", encoding="utf-8")
            tmp.replace(folder / PRODUCTION_FILE)
        return json.loads(json.dumps(entry, default=str))

    def rollback_targets(self, name: str) -> list[str]:
        """Versions once promoted on an allowing gate decision (newest first), still valid."""
        seen: list[str] = []
        for entry in reversed(self.promotion_log(name)):
            v = str(entry.get("version"))
            if v not in seen and _decision_allows(entry.get("gate")) and v in self.versions(name):
                seen.append(v)
        return seen


_ALLOWING = ("first", "passed", "forced", "rollback", "same")


def _decision_allows(gate: Any) -> bool:
    """Whether a recorded gate dict allows serving. Legacy records (before `outcome`) count
    when `allowed` is True; a legacy "no evaluation gate ran" (`allowed` None) does not."""
    if not isinstance(gate, dict):
        return False
    outcome = gate.get("outcome")
    if outcome is None:
        return gate.get("allowed") is True
    if outcome == "forced" and not str(gate.get("force_reason") or "").strip():
        return False
    return outcome in _ALLOWING


@dataclass(frozen=True)
class GateDecision:
    """What the promotion gate decided for NAME:candidate against the promoted `current`.

    `outcome`: first (nothing promoted), same (already promoted), passed (evidence says not
    worse), forced (worse or no evidence, overridden with `force_reason`), rollback (back to a
    version once promoted on an allowing decision), refused. `evidence` is the comparison
    behind it (offline paired bootstrap, live outcomes, shadow), recorded in the log.
    """

    outcome: Literal["first", "same", "passed", "forced", "rollback", "refused"]
    name: str
    candidate: str
    current: str | None
    reason: str
    force_reason: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in (*_ALLOWING, "refused"):
            raise ValueError(f"outcome {self.outcome!r} is not a gate outcome")
        if self.outcome in ("forced", "rollback") and not (self.force_reason or "").strip():
            raise ValueError(f"a {self.outcome} decision needs a non-empty force_reason")
        if self.outcome == "passed" and not self.evidence:
            raise ValueError("a passed decision needs the evidence it passed on")
        if not self.reason.strip():
            raise ValueError("a gate decision needs a reason")

    @property
    def allowed(self) -> bool:
        return self.outcome != "refused"

    @classmethod
    def first(cls, name: str, version: str, current: str | None) -> GateDecision:
        """Nothing to compare with: a first promotion (or re-promoting the promoted one)."""
        if current == version:
            return cls("same", name, version, current, f"{name}:{version} is already promoted")
        return cls("first", name, version, None, f"{name} has no promoted version yet")

    def check_applies(self, name: str, version: str, current: str | None) -> None:
        """Raise `PromotionRefusedError` unless this decision allows NAME:VERSION now."""
        ref = f"{name}:{version}"
        if (self.name, self.candidate) != (name, version):
            raise PromotionRefusedError(
                f"the gate decision is for {self.name}:{self.candidate}, not {ref}"
            )
        if self.outcome == "refused":
            raise PromotionRefusedError(f"the gate refused {ref}: {self.reason}")
        if self.current != current and self.outcome != "same":
            raise PromotionRefusedError(
                f"the gate compared {ref} with {self.current or 'nothing'}, but "
                f"{current or 'nothing'} is promoted now: run the gate again"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "allowed": self.allowed,
            "name": self.name,
            "candidate_version": self.candidate,
            "current_version": self.current,
            "reason": self.reason,
            "forced": self.outcome == "forced",
            "force_reason": self.force_reason,
            "evidence": self.evidence,
        }


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
