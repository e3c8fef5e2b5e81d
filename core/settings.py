"""Typed settings: one `Settings` object, loaded once from TOML + environment, passed down.

Every key can be overridden by `RADTRIAGE_<SECTION>__<KEY>` (e.g. `RADTRIAGE_DICOM__PORT=11113`).
Values that look like JSON (lists, objects, numbers, booleans) are parsed as JSON.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import ConfigError

ENV_PREFIX = "RADTRIAGE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Destination(_Section):
    name: str = Field(description="Label used in logs, the outbox and the API")
    ae_title: str = Field(max_length=16, description="Called AE title of the destination")
    host: str
    port: int = Field(gt=0, lt=65536)
    tls: bool = Field(default=False, description="Use DICOM TLS for this destination")


class TlsSettings(_Section):
    certfile: Path
    keyfile: Path
    cafile: Path | None = Field(default=None, description="Verify peers against this CA bundle")


class DicomSettings(_Section):
    ae_title: str = Field(default="RADTRIAGE", max_length=16)
    node_id: str | None = Field(
        default=None,
        max_length=64,
        description="Names this DICOM node's studies in an index shared by several nodes "
        "(one per hospital, PostgreSQL); each node analyses, sends and lists only its own. "
        "None = the AE title",
    )
    bind_address: str = Field(default="127.0.0.1", description="Address the SCP listens on")
    port: int = Field(default=11112, gt=0, lt=65536)
    allowed_calling_aets: list[str] = Field(
        default_factory=list, description="Empty: accept any calling AE title"
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Empty: accept any peer address"
    )
    stable_age_s: float = Field(
        default=10.0,
        ge=0,
        description="Quiet period before a study "
        "without geometrically complete series is analysed anyway",
    )
    max_pdu_size: int = Field(default=0, ge=0, description="0 = unlimited")
    max_associations: int = Field(default=16, gt=0)
    low_water_mark_mb: int = Field(
        default=512, ge=0, description="Refuse C-STORE (0xA700) when free disk falls below this"
    )
    tls: TlsSettings | None = None
    destinations: list[Destination] = Field(default_factory=list)


class StorageSettings(_Section):
    root: Path = Field(default=Path("./var"), description="Spool, quarantine, outbox, results")
    database_url: str = Field(default="sqlite:///./var/radtriage.db")


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)


class ModelSettings(_Section):
    repository: Path | None = Field(
        default=None, description="Model repository root; None = the bundled models/repository"
    )
    detector: str = Field(default="cspca_detector", description="NAME or NAME:VERSION")
    gland: str = Field(default="prostate_gland", description="NAME or NAME:VERSION")
    shadow: str | None = Field(default=None, description="Detector version run in shadow mode")


class ServingSettings(_Section):
    replicas: int = Field(default=1, gt=0)
    max_batch_size: int = Field(default=4, gt=0)
    batch_wait_timeout_s: float = Field(default=0.05, ge=0)
    num_cpus_per_replica: float = Field(default=1.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    concurrent_studies: int = Field(
        default=4,
        gt=0,
        description="Studies a DICOM node analyses at once; more than one lets Ray Serve batch "
        "the models across studies (max_batch_size)",
    )
    deploy: bool = Field(
        default=True,
        description="True: deploy the Serve app (and own it: roll out promotions, delete it at "
        "shutdown). False: attach to the app `app_name` already running on the Ray cluster at "
        "RAY_ADDRESS, deployed by another `radtriage serve` (several DICOM nodes, one "
        "inference cluster)",
    )
    app_name: str = Field(
        default="radtriage",
        min_length=1,
        description="Name of the Serve application deployed or attached to",
    )


class SenderSettings(_Section):
    max_attempts: int = Field(default=8, gt=0)
    initial_backoff_s: float = Field(default=2.0, gt=0)
    max_backoff_s: float = Field(default=300.0, gt=0)


class TriageSettings(_Section):
    fds_days: int = Field(default=28, gt=0, description="Faster Diagnosis Standard clock, days")
    escalate_within_days: int = Field(
        default=7, ge=0, description="Days before the FDS breach when a study becomes `soon`"
    )
    urgent_within_days: int = Field(
        default=3, ge=0, description="Days before the FDS breach when a study becomes `urgent`"
    )


class Settings(_Section):
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    sender: SenderSettings = Field(default_factory=SenderSettings)
    triage: TriageSettings = Field(default_factory=TriageSettings)


def _parse_env_value(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in "[{" or text in {"true", "false", "null"}:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, name = key[len(ENV_PREFIX) :].partition("__")
        if not section or not name:
            continue
        out.setdefault(section.lower(), {})[name.lower()] = _parse_env_value(raw)
    return out


def load_settings(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read `path` (TOML, optional) and apply environment overrides; raise `ConfigError`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {p} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    env = os.environ if environ is None else environ
    for section, values in _env_overrides(env).items():
        existing = data.setdefault(section, {})
        if not isinstance(existing, dict):
            raise ConfigError(f"[{section}] must be a table")
        existing.update(values)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid settings{where}: {exc}") from exc
