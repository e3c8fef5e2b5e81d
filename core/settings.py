"""Typed settings: one `Settings` object, loaded once from TOML + environment, passed down.

Every key can be overridden by `RADTRIAGE_<SECTION>__<KEY>` (e.g. `RADTRIAGE_DICOM__PORT=11113`).
Values that look like JSON (lists, objects, numbers, booleans) are parsed as JSON.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import string
import tomllib
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import ConfigError
from core.peers import parse_allowlist
from core.priority import (
    ESCALATE_WITHIN_DAYS,
    FDS_DAYS,
    PATHWAY_DAYS,
    URGENT_WITHIN_DAYS,
    WaitingPolicy,
)
from core.redact import redact

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
    check_hostname: bool = Field(
        default=True,
        description="Sender: the destination's certificate must name its host (DNS name or IP "
        "address in subjectAltName). False trusts any certificate the CA signed",
    )


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
        default_factory=list,
        description="Calling AE titles accepted (a further check on peers that allowed_hosts "
        "admits; a title never opens the port). Empty: any title",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Peer IP addresses or networks (CIDR, e.g. 10.1.0.0/16) accepted. Empty: "
        "loopback only (core/peers.py, the rule the HL7 listener shares)",
    )
    stable_age_s: float = Field(
        default=10.0,
        ge=0,
        description="Quiet period before a study "
        "without geometrically complete series is analysed anyway",
    )
    max_pdu_size: int = Field(
        default=131072,
        ge=4096,
        le=1 << 24,
        description="Largest PDU we receive (bytes, announced as Maximum Length Received); a "
        "peer's larger PDU aborts its association",
    )
    max_associations: int = Field(
        default=16, gt=0, le=1024, description="Associations at once; more are rejected"
    )
    max_queued_studies: int = Field(
        default=500,
        gt=0,
        description="Bounded work queue: studies received but not yet analysed (received, "
        "complete, analysing). When full, instances of a new study are refused with 0xA700 "
        "(out of resources; the sender retries later); instances of queued studies are accepted",
    )
    low_water_mark_mb: int = Field(
        default=512, ge=0, description="Refuse C-STORE (0xA700) when free disk falls below this"
    )
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        le=64,
        description="Receiver processes sharing the DICOM port (one accept queue); default "
        "the core count. 1 = receive in the node's own process",
    )
    max_instance_bytes: int = Field(
        default=1 << 30,
        ge=1024,
        description="Largest data set accepted per C-STORE (bytes); a larger one is refused "
        "with 0xA700 (out of resources) and nothing is kept",
    )
    tls: TlsSettings | None = None
    destinations: list[Destination] = Field(default_factory=list)

    @field_validator("allowed_hosts")
    @classmethod
    def _networks(cls, hosts: list[str]) -> list[str]:
        return parse_allowlist(hosts)

    @property
    def open_beyond_loopback(self) -> bool:
        """True when peers other than loopback may associate (allowed_hosts is configured)."""
        return bool(self.allowed_hosts)


class StorageSettings(_Section):
    root: Path = Field(default=Path("./var"), description="Spool, quarantine, outbox, results")
    database_url: str = Field(
        default="sqlite:///./var/radtriage.db",
        repr=False,  # may carry a password; use `redacted_database_url` in messages
        description="SQLite or PostgreSQL URL; its password never appears in logs or errors",
    )

    @property
    def redacted_database_url(self) -> str:
        return redact(self.database_url)


#: the placeholders a viewer URL template may name (values are URL-encoded when filled in)
VIEWER_URL_FIELDS = ("study_uid", "accession")


def _is_loopback_host(host: str | None) -> bool:
    if host in {"localhost"}:
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _http_url(value: str, what: str) -> str:
    """An absolute http(s) URL; plain http only to a loopback host (tests, a local proxy)."""
    parsed = urlsplit(value)
    if parsed.scheme not in {"http", "https"} or not parsed.netloc:
        raise ValueError(f"{what} must be an absolute https:// URL, got {value!r}")
    if parsed.scheme == "http" and not _is_loopback_host(parsed.hostname):
        raise ValueError(f"{what} must use https (plain http only on loopback), got {value!r}")
    return value


class OidcSettings(_Section):
    """`[http.oidc]`: single sign-on with OpenID Connect (authorization code + PKCE)."""

    issuer: str = Field(
        description="The provider's issuer URL, exactly as its discovery document names it "
        "(Keycloak: https://HOST/realms/REALM); discovery: ISSUER/.well-known/openid-configuration"
    )
    client_id: str = Field(min_length=1, max_length=256)
    client_secret: str = Field(
        default="",
        repr=False,
        description="Confidential client's secret (client_secret_basic); empty = public client "
        "(PKCE only)",
    )
    redirect_url: str = Field(
        description="This server's callback as registered at the provider, e.g. "
        "https://radtriage.example.org/oidc/callback (never taken from the Host header)"
    )
    post_logout_redirect_url: str = Field(
        default="",
        description="Where the provider sends the browser after sign-out (registered at the "
        "provider); empty = the redirect URL's origin + /login",
    )
    display_name: str = Field(
        default="single sign-on", max_length=64, description='Login page: "Sign in with <name>"'
    )
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    username_claim: str = Field(
        default="preferred_username",
        description="ID token claim that names the user (their radtriage user name)",
    )
    role_claim: str = Field(
        default="roles",
        description="ID token claim holding the user's groups or roles; a dotted path reaches "
        "into objects (Keycloak realm roles: realm_access.roles)",
    )
    role_map: dict[str, Literal["radiologist", "admin", "ml_engineer"]] = Field(
        default_factory=dict,
        validate_default=True,
        description="Provider role/group value -> radtriage role; the first entry (in file order) "
        "that the user holds wins; a user holding none is refused",
    )
    clock_skew_s: float = Field(default=60.0, ge=0, le=600, description="Leeway for exp/iat")
    timeout_s: float = Field(default=10.0, gt=0, description="HTTP timeout towards the provider")

    @field_validator("issuer", "redirect_url")
    @classmethod
    def _urls(cls, value: str) -> str:
        return _http_url(value, "[http.oidc] issuer and redirect_url")

    @field_validator("post_logout_redirect_url")
    @classmethod
    def _logout_url(cls, value: str) -> str:
        return _http_url(value, "[http.oidc] post_logout_redirect_url") if value else value

    @field_validator("scopes")
    @classmethod
    def _openid_scope(cls, value: list[str]) -> list[str]:
        if "openid" not in value:
            raise ValueError("[http.oidc] scopes must include openid")
        return value

    @field_validator("role_map")
    @classmethod
    def _some_role(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("[http.oidc] role_map must map at least one provider role")
        return value


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    certfile: Path | None = Field(
        default=None, description="HTTPS: server certificate (PEM); set keyfile too"
    )
    keyfile: Path | None = Field(default=None, description="HTTPS: private key (PEM)")
    session_ttl_s: float = Field(
        default=8 * 3600.0, gt=0, description="Login sessions end this long after sign-in"
    )
    oidc: OidcSettings | None = Field(
        default=None, description="Single sign-on; None = local accounts only"
    )
    viewer_url: str = Field(
        default="",
        description="Open-in-viewer link template, http(s) only, with {study_uid} and/or "
        "{accession} (URL-encoded when filled in), e.g. OHIF: "
        "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}; empty = no link",
    )

    @field_validator("viewer_url")
    @classmethod
    def _viewer_template(cls, value: str) -> str:
        if not value:
            return value
        if urlsplit(value).scheme not in {"http", "https"} or not urlsplit(value).netloc:
            raise ValueError(f"[http] viewer_url must be an http(s) URL template, got {value!r}")
        try:
            fields = [p[1:] for p in string.Formatter().parse(value) if p[1] is not None]
        except ValueError as exc:
            raise ValueError(f"[http] viewer_url is not a valid template: {exc}") from None
        if any(spec or conversion for _, spec, conversion in fields):
            raise ValueError("[http] viewer_url placeholders take no format spec or conversion")
        names = {str(name) for name, _, _ in fields}
        unknown = names - set(VIEWER_URL_FIELDS)
        if unknown or not names:
            raise ValueError(
                f"[http] viewer_url may name only {{study_uid}} and {{accession}} (at least one), "
                f"got {sorted(unknown) or 'none'}"
            )
        return value

    token_ttl_days: float = Field(
        default=90.0,
        gt=0,
        description="Bearer tokens expire this long after they were issued (`radtriage users "
        "token NAME` issues a new one and revokes the old)",
    )
    max_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        description="Largest request body (bytes) on every route but STOW-RS; larger ones get "
        "413 before authentication and before the body is read",
    )
    public_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="The server's public base URL (e.g. https://radtriage.hospital.example); "
        "FHIR bundle links are built from it, never from the request's Host header. None: "
        "links are relative",
    )
    stow: bool = Field(
        default=False,
        description="Accept STOW-RS (POST /dicomweb/studies) from integrator and admin tokens",
    )
    stow_max_bytes: int = Field(
        default=2 * 1024**3,
        ge=1 << 20,
        description="Largest STOW-RS request (bytes); it is streamed to a temporary file",
    )
    stow_concurrency: int = Field(
        default=2, ge=1, le=64, description="STOW-RS requests at once; more get 503"
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpSettings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("[http] certfile and keyfile go together: set both or neither")
        return self


class ModelSettings(_Section):
    repository: Path | None = Field(
        default=None, description="Model repository root; None = the bundled models/repository"
    )
    detector: str = Field(default="cspca_detector", description="NAME or NAME:VERSION")
    gland: str = Field(default="prostate_gland", description="NAME or NAME:VERSION")
    shadow: str | None = Field(default=None, description="Detector version run in shadow mode")

    def role_refs(self) -> dict[str, str]:
        """Role (detector, gland, shadow when set) -> requested model reference."""
        refs = {"detector": self.detector, "gland": self.gland}
        if self.shadow:
            refs["shadow"] = self.shadow
        return refs


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
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources every deployment asks for, e.g. {inference = 0.01} "
        "to keep the Serve app on the cluster's inference nodes",
    )


class SenderSettings(_Section):
    """Retries of the outbox's DICOM channel (C-STORE of SR and SEG to the destinations)."""

    max_attempts: int = Field(
        default=8, gt=0, description="Attempts before a DICOM outbox item is a dead letter"
    )
    initial_backoff_s: float = Field(
        default=2.0, gt=0, description="Delay after the first failed attempt; doubles after each"
    )
    max_backoff_s: float = Field(default=300.0, gt=0, description="Longest delay between attempts")


class TriageSettings(_Section):
    fds_days: int = Field(
        default=FDS_DAYS, gt=0, description="Faster Diagnosis Standard clock, days"
    )
    escalate_within_days: int = Field(
        default=ESCALATE_WITHIN_DAYS,
        ge=0,
        description="Days before the FDS breach when a study becomes `soon`",
    )
    urgent_within_days: int = Field(
        default=URGENT_WITHIN_DAYS,
        ge=0,
        description="Days before the FDS breach when a study becomes `urgent`",
    )
    pathway_days: int = Field(
        default=PATHWAY_DAYS,
        gt=0,
        description="Suspected-cancer pathway target (referral to treatment)",
    )
    today: date | None = Field(
        default=None,
        description='The waiting-list clock, "YYYY-MM-DD"; empty = the date in `timezone`',
    )
    timezone: str = Field(
        default="Europe/London",
        description="The site's IANA time zone: what day it is for the waiting-list clock",
    )
    tick_s: float = Field(
        default=3600.0, gt=0, description="How often the waiting list recomputes priorities"
    )

    @field_validator("today", mode="before")
    @classmethod
    def _empty_is_system_date(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name, e.g. Europe/London)"
            ) from exc
        return value

    @model_validator(mode="after")
    def _policy_is_valid(self) -> TriageSettings:
        self.waiting_policy()  # a bad [triage] section fails at start-up, not on every study
        return self

    def waiting_policy(self) -> WaitingPolicy:
        return WaitingPolicy(
            self.fds_days, self.escalate_within_days, self.urgent_within_days, self.pathway_days
        )

    def current_date(self) -> date:
        """`today` when set (tests, demos, replays), else today's date in the site's zone (a
        UTC date is yesterday for an evening in a zone east of UTC)."""
        from zoneinfo import ZoneInfo

        if self.today is not None:
            return self.today
        return datetime.now(UTC).astimezone(ZoneInfo(self.timezone)).date()


class Hl7Destination(_Section):
    name: str = Field(min_length=1, max_length=64, description="Label in logs and the outbox")
    host: str
    port: int = Field(gt=0, lt=65536)
    receiving_application: str = Field(default="RIS", max_length=180, description="MSH-5")
    receiving_facility: str = Field(default="", max_length=180, description="MSH-6")


ProcessingId = Literal["P", "T", "D"]


def _production_only() -> list[ProcessingId]:
    return ["P"]


class Hl7Settings(_Section):
    listen_port: int | None = Field(
        default=None,
        gt=0,
        lt=65536,
        description="MLLP port for orders (ORM^O01, OMI^O23); None = no listener",
    )
    bind_address: str = Field(default="127.0.0.1", description="Address the listener binds")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Peer IP addresses or networks (CIDR) allowed to send orders. Empty: "
        "loopback only (core/peers.py, the rule the DICOM SCP shares)",
    )
    tls: TlsSettings | None = Field(
        default=None,
        description="MLLP over TLS: certfile and keyfile; with cafile, senders must present a "
        "client certificate signed by it (mutual TLS). None = plain TCP (keep it on loopback "
        "or a trusted network)",
    )
    max_connections: int = Field(
        default=16, gt=0, le=1024, description="Connections at once; more are closed at once"
    )
    idle_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="A connection that sends nothing (or no whole message) for this long is "
        "closed; also the TLS handshake timeout",
    )
    processing_ids: list[ProcessingId] = Field(
        default_factory=_production_only,
        min_length=1,
        description="MSH-11 processing IDs accepted. Default production only: training (T) "
        "and debugging (D) messages are refused with AR and never change live orders",
    )
    sending_application: str = Field(default="RADTRIAGE", max_length=180, description="MSH-3")
    sending_facility: str = Field(default="", max_length=180, description="MSH-4")
    destinations: list[Hl7Destination] = Field(
        default_factory=list, description="RIS endpoints that receive ORU^R01 results"
    )
    max_attempts: int = Field(
        default=8, gt=0, description="Attempts before an HL7 or FHIR outbox item is a dead letter"
    )
    initial_backoff_s: float = Field(
        default=2.0, gt=0, description="Delay after the first failed attempt; doubles after each"
    )
    max_backoff_s: float = Field(default=300.0, gt=0, description="Longest delay between attempts")
    ack_timeout_s: float = Field(default=10.0, gt=0)
    fhir_base_url: str | None = Field(
        default=None, description="Optional FHIR R4 server that results are also pushed to"
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hl7_networks(cls, hosts: list[str]) -> list[str]:
        return parse_allowlist(hosts)


class MonitoringSettings(_Section):
    """`[monitoring]` in the config TOML: alert thresholds (per model version and period)."""

    min_studies: int = Field(default=20, ge=1, description="Fewer studies in a period: no alert")
    not_analysed_share_max: float = Field(
        default=0.10, ge=0, le=1, description="Alert above this share of not_analysed studies"
    )
    likelihood_shift_max: float = Field(
        default=0.10,
        ge=0,
        le=1,
        description="Alert when a period's median likelihood moves more than this from the "
        "version's first period (input drift, scanner change)",
    )
    urgent_share_max: float = Field(
        default=0.50, ge=0, le=1, description="Alert above this share of urgent studies"
    )
    pirads_agreement_min: float = Field(
        default=0.60, ge=0, le=1, description="Alert below this AI vs PI-RADS>=3 agreement"
    )
    biopsy_sensitivity_min: float = Field(
        default=0.85, ge=0, le=1, description="Alert below this sensitivity at `soon` vs biopsy"
    )


class AuditSettings(_Section):
    """`[audit]`: where the audit trail goes besides the index, and what anchors it."""

    syslog: str = Field(
        default="",
        description="ATNA: send every audit event as a DICOM audit message (PS3.15 A.5) to this "
        'syslog receiver: "tcp://host:514", "tls://host:6514" (RFC 5425) or "udp://host:514" '
        "(RFC 5426); empty = off",
    )
    cafile: Path | None = Field(
        default=None, description="tls://: verify the receiver against this CA bundle (PEM)"
    )
    certfile: Path | None = Field(
        default=None, description="tls://: our client certificate (PEM), when the receiver asks"
    )
    keyfile: Path | None = Field(default=None, description="tls://: the client key (PEM)")
    check_hostname: bool = Field(
        default=True, description="tls://: the receiver's certificate must name its host"
    )
    enterprise_site_id: str = Field(
        default="", max_length=64, description="AuditEnterpriseSiteID of the messages"
    )
    key_file: Path | None = Field(
        default=None,
        description="HMAC key that anchors the audit chain (kept outside the database; created "
        "0600 on first start); None = <storage.root>/audit.key",
    )
    head_file: Path | None = Field(
        default=None,
        description="The audit chain's newest event, exported outside the database for "
        "`radtriage audit verify`; None = <storage.root>/audit-head.json",
    )

    @field_validator("syslog")
    @classmethod
    def _syslog_url(cls, value: str) -> str:
        if value and not re.fullmatch(r"(tcp|tls|udp)://[^\s/:]+(:\d{1,5})?", value):
            raise ValueError(
                '[audit] syslog is "tcp://host:port", "tls://host:port" or "udp://..."'
            )
        return value

    @model_validator(mode="after")
    def _client_pair(self) -> AuditSettings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("[audit] certfile and keyfile go together: set both or neither")
        return self


class SiteSettings(_Section):
    """The hospital this node belongs to (docs/scaling.md, "Sites")."""

    id: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="The site (hospital) this node serves: its studies, orders and audit "
        "events carry it, and its HTTP API, FHIR, DICOMweb and HL7 listener see and change only "
        "that site's rows and users granted it. Several nodes of one hospital share one id. "
        "None = the node id (dicom.node_id, else the AE title): a single site needs nothing",
    )


class Settings(_Section):
    site: SiteSettings = Field(default_factory=SiteSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    sender: SenderSettings = Field(default_factory=SenderSettings)
    triage: TriageSettings = Field(default_factory=TriageSettings)
    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    @property
    def node_id(self) -> str:
        """This DICOM node's id: `dicom.node_id`, else its AE title."""
        return self.dicom.node_id or self.dicom.ae_title

    @property
    def site_id(self) -> str:
        """This node's site: `site.id`, else the node id."""
        return self.site.id or self.node_id


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
        raise ConfigError(f"invalid settings{where}: {redact(str(exc))}") from None
