"""The composition root: settings -> inference engine -> DicomNode + its analysis step + HTTP.

This is the only module that wires packages together, for `serve`, `infer` and `evaluate`
alike (`build_engine`, `build_analyser`). The DicomNode's analysis step
(`triage.analysis.StudyAnalyser`) runs in this process and calls an `InferenceEngine`:
Ray Serve (`backend="ray"`, `serving.serve_engine.ServeEngine`: only volumes go to the cluster,
only predictions come back) or ONNX Runtime in this process (`backend="local"`,
`models.engine.LocalEngine`: small installs and tests). HTTP is uvicorn in this process rather
than a Serve FastAPI ingress because the API reads the node's SQL index and audit log, which live
here; Serve then only does inference and needs no HTTP proxy.

Several DICOM nodes (one per hospital) share one inference cluster: one `radtriage serve`
deploys the Serve app (``serving.deploy = true``, the default) and owns it; the others run with
``serving.deploy = false`` and RAY_ADDRESS set, and attach to that app by name
(``serving.app_name``) instead of deploying their own. See docs/scaling.md.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request

from core.domain import ModelInfo, ModelRef
from core.engine import InferenceEngine
from core.errors import ConfigError, ModelError, ModelNotFoundError
from core.log_events import log_event
from core.priority import Thresholds
from core.settings import ModelSettings, Settings
from dicom_node.dicomweb import StowLimits, StowReport, create_dicomweb_router
from dicom_node.jobs import AnalysisOutput
from dicom_node.node import DicomNode
from imaging.study_reader import scan_study
from models.engine import LocalEngine
from models.repository import ModelRepository, parse_ref
from models.shadow_log import ShadowLog
from ris.fhir import create_fhir_router
from ris.node import RisNode
from store.index import Index
from store.outbox import listing as outbox_listing
from triage.analysis import StudyAnalyser, StudyAnalysis
from triage.waiting_list import LiveWaitingList
from workspace.app import ApiContext, create_app, is_pending, pending_row
from workspace.atna import AuditSource
from workspace.audit import AuditTrail, anchor_from_settings
from workspace.auth import INTEGRATIONS, UPLOADERS, client_address, require
from workspace.metrics import Metrics
from workspace.syslog_sender import AuditForwarder, SyslogTarget, tls_context

if TYPE_CHECKING:  # Ray is imported only by the Ray backend
    from ray.serve.handle import DeploymentHandle

    from serving.serve_engine import ServeEngine

log = logging.getLogger(__name__)

Backend = Literal["ray", "local"]


def build_http_app(ctx: ApiContext) -> FastAPI:
    """The web app with the ways in that share its sign-in: FHIR R4 (`ris.fhir`) and DICOMweb
    (`dicom_node.dicomweb`), each behind the clinical roles and integrator tokens; STOW-RS only
    when ``[http] stow`` is on, for integrator tokens and admins, each upload audited."""
    app = create_app(ctx)
    integrations = [Depends(require(*INTEGRATIONS))]
    app.include_router(
        create_fhir_router(dependencies=integrations, public_url=ctx.http.public_url)
    )
    stow = (
        StowLimits(max_bytes=ctx.http.stow_max_bytes, concurrency=ctx.http.stow_concurrency)
        if ctx.http.stow
        else None
    )

    def audit_store(request: Request, report: StowReport) -> None:
        who = getattr(request.state, "principal", None)
        for uid, instances in report.studies.items() or {"": 0}.items():
            app.state.audit.append(
                "stow",
                user=who.name if who else "",
                role=who.role if who else "",
                study_instance_uid=uid or None,
                address=client_address(request),
                detail={"instances": instances, "refused": report.refused},
            )

    app.include_router(
        create_dicomweb_router(
            ctx,
            dependencies=integrations,
            stow=stow,
            store_dependencies=[Depends(require(*UPLOADERS))],
            on_store=audit_store,
        )
    )
    return app


class IndexStudies:
    """The "awaiting AI analysis" list over the node's index: every study received but not
    reported yet (no cap), without patient identifiers."""

    def __init__(self, index: Any) -> None:
        self.index = index

    def list_pending(self) -> list[dict[str, Any]]:
        """Studies received but not yet reported (arriving, queued, analysing, retrying)."""
        from workspace.app import PENDING_STATUSES

        rows = []
        for status in PENDING_STATUSES:
            rows += self.index.list_studies(status, limit=2**31 - 1)
        return [pending_row(row) for row in rows if is_pending(row)]


class DrainingServer(uvicorn.Server):
    """uvicorn re-raises the SIGTERM/SIGINT it caught once it has stopped, which kills the
    process before `serve_forever` drains the DICOM node. We own the shutdown: swallow it."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def build_engine(models: ModelSettings, device: str = "auto") -> LocalEngine:
    """The in-process engine (`infer`, `evaluate`, `serve --local`): both models verified."""
    try:
        return LocalEngine.load(models.repository, models.detector, models.gland, device=device)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{exc.message} (check the model names and repository)") from exc


def build_analyser(
    settings: Settings, engine: InferenceEngine, results_root: Path | None = None
) -> StudyAnalyser:
    """The node's analysis step over `engine`, with the site's triage policy (checked now)."""
    root = results_root if results_root is not None else Path(settings.storage.root) / "results"
    try:
        return StudyAnalyser(engine, root, settings.triage)
    except ValueError as exc:
        raise ConfigError(f"[triage]: {exc}") from exc


def build_audit(settings: Settings, index: Index) -> AuditTrail:
    """The audit trail, anchored by `[audit]`'s key file (created 0600 on first start) and
    head file."""
    anchor = anchor_from_settings(settings.audit, Path(settings.storage.root), create=True)
    return AuditTrail(index.engine, anchor, site_id=index.site_id)


def build_audit_forwarder(
    settings: Settings, trail: AuditTrail, index: Index
) -> AuditForwarder | None:
    """The ATNA sender for `[audit] syslog` (None when it is empty)."""
    a = settings.audit
    if not a.syslog:
        return None
    target = SyslogTarget.parse(a.syslog)
    tls = (
        tls_context(a.cafile, a.certfile, a.keyfile, a.check_hostname)
        if target.transport == "tls"
        else None
    )
    source = AuditSource(
        source_id=index.node_id or settings.dicom.ae_title,
        host=socket.gethostname(),
        enterprise_site_id=a.enterprise_site_id,
    )

    def patient_of(uid: str) -> str | None:
        study = index.get_study(uid)
        return study.get("patient_id") if study else None

    return AuditForwarder(trail, target, source, tls=tls, patient_of=patient_of)


class RadtriageApp:
    """Everything `radtriage serve` runs, built from one Settings object."""

    def __init__(self, settings: Settings, *, backend: Backend = "ray") -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = Metrics()
        self.results_root = Path(settings.storage.root) / "results"
        self.shadow_log = ShadowLog(Path(settings.storage.root) / "shadow")
        self.engine: LocalEngine | ServeEngine | None = None
        self.analyser: StudyAnalyser | None = None
        self._refs: dict[str, str] = {}
        self._ready = False
        self.live: LiveWaitingList | None = None
        self.node: DicomNode | None = None
        self.audit: AuditTrail | None = None

    # --- models ---------------------------------------------------------------------------

    def start_models(self) -> None:
        """Load, verify and warm the models (Ray Serve app or in-process pipeline)."""
        self._refs = {
            "detector": self.settings.models.detector,
            "gland": self.settings.models.gland,
        }
        if self.settings.models.shadow:
            self._refs["shadow"] = self.settings.models.shadow
        if self.backend == "local":
            self.engine = build_engine(self.settings.models, self.settings.serving.device)
        else:
            from serving.serve_engine import ServeEngine

            handle = (
                self._attach() if not self.settings.serving.deploy else self._deploy(self._refs)
            )
            self.engine = ServeEngine(handle)
        self.analyser = build_analyser(self.settings, self.engine, self.results_root)
        self.analyser.observe = self._observe
        self._ready = True
        self._record_models()

    def _deploy(self, refs: dict[str, str]) -> DeploymentHandle:
        import ray
        from ray import serve

        from serving.deployments import APP_NAME, build_app, required_cpus
        from serving.ray_local import init_local_ray

        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(include_dashboard=False, configure_logging=False)
            else:
                # A local single-node Ray: Ray's CPUs are scheduling tokens, so declare at least
                # what the app requests, or the model replicas never get scheduled on a small
                # host (2 cores: 2.75 requested). ONNX Runtime threads share the cores anyway.
                cores = os.cpu_count() or 1
                init_local_ray(max(cores, math.ceil(required_cpus(self.settings))))
        serve.start(proxy_location="Disabled")
        app = build_app(self.settings, refs)
        name = self.settings.serving.app_name or APP_NAME
        return serve.run(app, name=name, route_prefix=None)

    def _attach(self) -> DeploymentHandle:
        """Use the Serve app another `radtriage serve` deployed on the cluster at RAY_ADDRESS."""
        import ray
        from ray import serve

        name = self.settings.serving.app_name
        address = os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            if not address:
                raise ConfigError(
                    "serving.deploy = false attaches to a Serve app on a running Ray cluster: "
                    "set RAY_ADDRESS (e.g. 10.0.0.5:6379), or set serving.deploy = true"
                )
            ray.init(include_dashboard=False, configure_logging=False)
        try:
            return serve.get_app_handle(name)
        except Exception as exc:  # RayServeException: no such application (yet)
            raise ModelError(
                f"no Serve application {name!r} runs on the Ray cluster at {address}: start the "
                f"`radtriage serve` that deploys it (serving.deploy = true) first ({exc})"
            ) from exc

    def loaded_models(self, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
        """Name, version, sha256 and providers of each model the analysis path runs."""
        return self.engine.loaded(timeout_s) if self.engine is not None else {}

    def _record_models(self) -> None:
        refs = {
            role: ModelRef(
                info["name"], info["version"], info["sha256"], digest=info.get("digest", "")
            )
            # at start-up: a fresh handle first has to learn the replicas from the controller
            for role, info in self.loaded_models(timeout_s=120.0).items()
        }
        self.metrics.set_models(refs)

    def models_info(self) -> dict[str, Any]:
        """`/api/models`: what is loaded and every version in the repository."""
        return {
            "loaded": self.loaded_models(),
            "requested": dict(self._refs),
            "available": ModelRepository(self.settings.models.repository).listing(),
        }

    def check_promotions(self) -> dict[str, str]:
        """Roll out newly promoted versions of models configured without a version (Serve:
        rolling update through user_config, no restart). Returns the roles that changed."""
        if self.backend != "local" and not self.settings.serving.deploy:
            return {}  # attached: the node that deployed the app rolls out promotions
        repo = ModelRepository(self.settings.models.repository)
        loaded = self.loaded_models()
        changed: dict[str, str] = {}
        for role in ("detector", "gland"):
            name, version = parse_ref(getattr(self.settings.models, role))
            if version is not None:
                continue  # pinned in the config
            promoted = repo.promoted(name)
            if promoted and loaded.get(role, {}).get("version") != promoted:
                changed[role] = f"{name}:{promoted}"
        if not changed:
            return {}
        refs = {**self._refs, **changed}
        log_event(log, "rolling out promoted models", models=changed)
        engine: LocalEngine | ServeEngine
        if self.backend == "local":
            models = self.settings.models.model_copy(update=changed)
            engine = build_engine(models, self.settings.serving.device)
        else:
            from serving.serve_engine import ServeEngine

            engine = ServeEngine(self._deploy(refs))
        self.engine = engine
        if self.analyser is not None:
            self.analyser.engine = engine
        self._refs = refs
        self._record_models()
        return changed

    def ready(self) -> bool:
        return self._ready

    # --- analysis (the DicomNode's Analyser) ------------------------------------------------

    def _observe(self, analysis: StudyAnalysis) -> None:
        self.metrics.observe_result(analysis.result)
        for model, size in analysis.batch_sizes.items():
            self.metrics.batch_size.labels(model).observe(size)
        shadow, result = analysis.shadow, analysis.result
        if shadow is None or result.model is None or result.case_likelihood is None:
            return
        primary = ModelRef(
            result.model.name,
            result.model.version,
            result.model.sha256,
            digest=result.model.digest,
        )
        self.shadow_log.append_comparison(
            result.study_instance_uid,
            primary,
            result.case_likelihood,
            shadow.model,
            shadow.case_likelihood,
            shadow_lesions=shadow.lesions,
            error=shadow.error,
        )
        name = f"{shadow.model.name}:{shadow.model.version}" if shadow.model else "unknown"
        delta = (
            abs(result.case_likelihood - shadow.case_likelihood)
            if shadow.case_likelihood is not None
            else None
        )
        self.metrics.observe_shadow(name, delta)

    def _analyser(self) -> StudyAnalyser:
        if self.analyser is None:
            raise ModelError("models are not loaded yet; call start_models() first")
        return self.analyser

    def analyse_folder(self, folder: Path, out_dir: Path) -> StudyAnalysis:
        """Analyse a study folder into `out_dir` (tools and tests; the node uses `analyse`)."""
        return self._analyser().analyse(scan_study(folder), out_dir)

    def analyse(
        self, study_instance_uid: str, instance_paths: list[Path], previous_sr: Path | None
    ) -> AnalysisOutput:
        """`dicom_node.jobs.Analyser`: results go to <storage.root>/results/<uid>/."""
        return self._analyser()(study_instance_uid, instance_paths, previous_sr)

    # --- HTTP and lifecycle -----------------------------------------------------------------

    def http_app(self) -> Any:
        """The HTTP app over the node's index (or the configured index when no node runs)."""
        node = self.node
        index = (
            node.index
            if node is not None
            else Index(self.settings.storage.database_url, site_id=self.settings.site_id)
        )
        ctx = ApiContext(
            index=index,
            metrics=self.metrics,
            models=self.models_info,
            outbox=lambda state: outbox_listing(index, state),
            ingest=node.handler.ingest if node is not None else None,
            pending=IndexStudies(index).list_pending,
            ready=self.ready,
            node_id=index.node_id,
            session_ttl_s=self.settings.http.session_ttl_s,
            oidc=self.settings.http.oidc,
            viewer_url=self.settings.http.viewer_url,
            http=self.settings.http,
            fds_days=self.settings.triage.fds_days,
            today=self.settings.triage.current_date,
            redecide=self.live.waiting_list.redecide if self.live is not None else None,
            audit=self.audit if self.audit is not None else build_audit(self.settings, index),
        )
        return build_http_app(ctx)

    def model_thresholds(self, model: ModelInfo) -> Thresholds | None:
        """The thresholds of the detector version that analysed a study (the waiting list
        recomputes its flag as days pass); None when that version is not in the repository."""
        try:
            version = ModelRepository(self.settings.models.repository).resolve(
                f"{model.name}:{model.version}"
            )
        except ModelError:
            return None
        spec = version.metadata.thresholds
        return spec.as_thresholds() if spec is not None else None

    def serve_forever(self, promotion_poll_s: float = 30.0) -> None:
        """Start everything; return after SIGTERM/SIGINT once in-flight work has finished."""
        self.start_models()
        self.node = DicomNode(self.settings, self.analyse)
        self.metrics.watch_queue(self.node.queue_depth)  # studies waiting, not only in flight
        self._analyser().index = self.node.index  # RIS orders count at analysis time
        self.node.start()
        live = self.live = LiveWaitingList(
            self.node.index, self.node.spool, self.settings, self.model_thresholds
        )
        live.start()
        self.audit = build_audit(self.settings, self.node.index)
        forwarder = build_audit_forwarder(self.settings, self.audit, self.node.index)
        if forwarder is not None:
            forwarder.start()
        self.audit.append("application_start")
        ris = RisNode(self.node.index, self.settings.hl7, audit=self.audit)
        ris.start()
        stop = threading.Event()

        def poll_promotions() -> None:
            while not stop.wait(promotion_poll_s):
                try:
                    self.check_promotions()
                except Exception:
                    log.exception("promotion check failed; keeping the loaded models")

        threading.Thread(target=poll_promotions, name="radtriage-promotions", daemon=True).start()
        h = self.settings.http
        server = DrainingServer(
            uvicorn.Config(
                self.http_app(),
                host=h.host,
                port=h.port,
                log_config=None,
                ssl_certfile=h.certfile,
                ssl_keyfile=h.keyfile,
            )
        )
        log_event(
            log,
            "radtriage serving",
            http=f"http://{h.host}:{h.port}",
            dicom_port=self.node.port,
            backend=self.backend,
        )
        try:
            server.run()  # uvicorn turns SIGTERM/SIGINT into a graceful shutdown
        finally:
            stop.set()
            self._ready = False
            started = time.monotonic()
            ris.stop()
            live.stop()
            self.node.stop()
            self.shutdown()
            self.audit.append("application_stop")
            if forwarder is not None:
                forwarder.stop()  # what it cannot send now stays queued for the next start
            log_event(log, "radtriage stopped", drain_s=round(time.monotonic() - started, 1))

    def shutdown(self) -> None:
        """Leave Ray. On a shared cluster a deploying app removes its Serve app and an attached
        one leaves it running for the other nodes. On the local Ray this process started,
        `ray.shutdown()` ends the whole cluster, Serve's replicas with it: Serve's own graceful
        shutdown first (replica by replica) would only add seconds to a Ctrl-C, and replicas
        hold only arrays in flight, nothing to write."""
        if self.backend == "ray" and self.engine is not None:
            import ray
            from ray import serve

            if self.settings.serving.deploy and os.environ.get("RAY_ADDRESS"):
                serve.delete(self.settings.serving.app_name)
            ray.shutdown()
            self.engine = None
