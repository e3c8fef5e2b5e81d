"""The composition root: settings -> models (Ray Serve or in-process) + DicomNode + HTTP.

This is the only module that wires packages together. `RadtriageApp.analyse` is the analyser
the DicomNode calls for each complete study; it runs `dicom_node.analysis.analyse_study` either in
the Ray Serve ingress (`backend="ray"`) or in this process (`backend="local"`, no Ray: small
installs and tests). HTTP is uvicorn in this process rather than a Serve FastAPI ingress because
the API reads the node's SQL index and writes the worklist audit log, which live here; Serve
then only does inference and needs no HTTP proxy.

Several DICOM nodes (one per hospital) share one inference cluster: one `radtriage serve`
deploys the Serve app (``serving.deploy = true``, the default) and owns it; the others run with
``serving.deploy = false`` and RAY_ADDRESS set, and attach to that app by name
(``serving.app_name``) instead of deploying their own. See docs/scaling.md.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import uvicorn

from core.domain import ModelRef
from core.errors import ConfigError, ModelError
from core.log_events import log_event
from core.settings import Settings
from dicom_node.analysis import PipelineEngine, StudyAnalysis, analyse_study
from serving.http_api import ApiContext, AuditLog, create_app, is_pending, iso_utc, pending_row
from serving.metrics import Metrics
from serving.ray_local import init_local_ray

log = logging.getLogger(__name__)

Backend = Literal["ray", "local"]


class IndexStudies:
    """`http_api.StudySource` over the DicomNode's index: result.json of analysed studies, with
    the job status kept current (reported -> sent). No patient identifiers leave here."""

    def __init__(self, node: Any) -> None:
        self.node = node

    @staticmethod
    def _doc(row: dict[str, Any]) -> dict[str, Any] | None:
        result = row.get("result")
        if not result:
            return None
        at = row.get("reported_at") or row.get("last_received_at")
        return {**result, "status": row["status"], "updated_at": iso_utc(at)}

    def list_studies(self) -> list[dict[str, Any]]:
        return [d for row in self.node.list_studies() if (d := self._doc(row)) is not None]

    def get_study(self, study_instance_uid: str) -> dict[str, Any] | None:
        row = self.node.get_study(study_instance_uid)
        return self._doc(row) if row else None

    def list_pending(self) -> list[dict[str, Any]]:
        """Studies received but not yet reported (arriving, queued, analysing, retrying)."""
        return [pending_row(row) for row in self.node.list_studies() if is_pending(row)]


class DrainingServer(uvicorn.Server):
    """uvicorn re-raises the SIGTERM/SIGINT it caught once it has stopped, which kills the
    process before `serve_forever` drains the DICOM node. We own the shutdown: swallow it."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


class RadtriageApp:
    """Everything `radtriage serve` runs, built from one Settings object."""

    def __init__(self, settings: Settings, *, backend: Backend = "ray") -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = Metrics()
        self.results_root = Path(settings.storage.root) / "results"
        self.audit = AuditLog(Path(settings.storage.root) / "audit.jsonl")
        self._engine: PipelineEngine | None = None
        self._handle: Any = None
        self._refs: dict[str, str] = {}
        self._ready = False
        self._lock = threading.Lock()
        self.node: Any = None

    # --- models ---------------------------------------------------------------------------

    def start_models(self) -> None:
        """Load, verify and warm the models (Ray Serve app or in-process pipeline)."""
        from serving.deployments import model_config

        self._refs = model_config(self.settings)
        if self.backend == "local":
            self._engine = PipelineEngine.load(
                self.settings.models, device=self.settings.serving.device
            )
        elif not self.settings.serving.deploy:
            self._attach()
        else:
            self._deploy(self._refs)
        self._ready = True
        self._record_models()

    def _deploy(self, refs: dict[str, str]) -> None:
        import ray
        from ray import serve

        from serving.deployments import APP_NAME, build_app, required_cpus

        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(include_dashboard=False, configure_logging=False)
            else:
                # A local single-node Ray: Ray's CPUs are scheduling tokens, so declare at least
                # what the app requests, or the model replicas never get scheduled on a small
                # host (2 cores: 2.75 requested). ONNX Runtime threads share the cores anyway.
                cores = os.cpu_count() or 1
                init_local_ray(max(cores, math.ceil(required_cpus(self.settings))))
        serve.start(http_options={"location": "NoServer"})
        app = build_app(self.settings, refs)
        name = self.settings.serving.app_name or APP_NAME
        self._handle = serve.run(app, name=name, route_prefix=None)

    def _attach(self) -> None:
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
            self._handle = serve.get_app_handle(name)
        except Exception as exc:  # RayServeException: no such application (yet)
            raise ModelError(
                f"no Serve application {name!r} runs on the Ray cluster at {address}: start the "
                f"`radtriage serve` that deploys it (serving.deploy = true) first ({exc})"
            ) from exc

    def loaded_models(self, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
        """Name, version, sha256 and providers of each model the analysis path runs."""
        if self._engine is not None:
            p = self._engine.pipeline
            return {
                role: {
                    "name": m.ref.name,
                    "version": m.ref.version,
                    "sha256": m.ref.sha256,
                    "providers": m.providers,
                }
                for role, m in (("detector", p.detector), ("gland", p.gland))
            }
        if self._handle is not None:
            return self._handle.models.remote().result(timeout_s=timeout_s)  # type: ignore[no-any-return]
        return {}

    def _record_models(self) -> None:
        refs = {
            role: ModelRef(info["name"], info["version"], info["sha256"])
            # at start-up: a fresh handle first has to learn the replicas from the controller
            for role, info in self.loaded_models(timeout_s=120.0).items()
        }
        self.metrics.set_models(refs)

    def models_info(self) -> dict[str, Any]:
        """`/api/models`: what is loaded and every version in the repository."""
        from models.repository import ModelRepository

        return {
            "loaded": self.loaded_models(),
            "requested": dict(self._refs),
            "available": ModelRepository(self.settings.models.repository).listing(),
        }

    def check_promotions(self) -> dict[str, str]:
        """Roll out newly promoted versions of models configured without a version (Serve:
        rolling update through user_config, no restart). Returns the roles that changed."""
        from models.repository import ModelRepository, parse_ref

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
        if self.backend == "local":
            models = self.settings.models.model_copy(update=changed)
            self._engine = PipelineEngine.load(models, device=self.settings.serving.device)
        else:
            self._deploy(refs)
        self._refs = refs
        self._record_models()
        return changed

    def ready(self) -> bool:
        return self._ready

    # --- analysis (the DicomNode's Analyser) ------------------------------------------------

    def analyse_path(
        self,
        source: Path | list[Path],
        out_dir: Path,
        *,
        study_instance_uid: str | None = None,
        previous_sr: Path | None = None,
    ) -> StudyAnalysis:
        self.metrics.queue_depth.inc()
        try:
            if self._engine is not None:
                analysis = analyse_study(
                    source,
                    out_dir,
                    self._engine,
                    triage=self.settings.triage,
                    study_instance_uid=study_instance_uid,
                    previous_sr=previous_sr,
                )
            elif self._handle is not None:
                src = str(source) if isinstance(source, Path) else [str(p) for p in source]
                analysis = self._handle.analyse.remote(
                    src,
                    str(out_dir),
                    study_instance_uid,
                    str(previous_sr) if previous_sr else None,
                ).result(timeout_s=600)
            else:
                raise ModelError("models are not loaded yet; call start_models() first")
        finally:
            self.metrics.queue_depth.dec()
        self.metrics.observe_result(analysis.result)
        for model, size in analysis.batch_sizes.items():
            self.metrics.batch_size.labels(model).observe(size)
        return analysis

    def analyse(
        self, study_instance_uid: str, instance_paths: list[Path], previous_sr: Path | None
    ) -> Any:
        """`dicom_node.jobs.Analyser`: results go to <storage.root>/results/<uid>/."""
        from dicom_node.jobs import AnalysisOutput

        analysis = self.analyse_path(
            instance_paths,
            self.results_root / study_instance_uid,
            study_instance_uid=study_instance_uid,
            previous_sr=previous_sr,
        )
        return AnalysisOutput(result=analysis.result, documents=analysis.documents)

    # --- HTTP and lifecycle -----------------------------------------------------------------

    def http_app(self) -> Any:
        from serving.http_api import ResultDirectory

        studies = (
            IndexStudies(self.node) if self.node is not None else ResultDirectory(self.results_root)
        )
        ctx = ApiContext(
            studies=studies,
            metrics=self.metrics,
            audit=self.audit,
            models=self.models_info,
            outbox=(lambda: self.node.dead_letters()) if self.node is not None else list,
            pending=studies.list_pending if isinstance(studies, IndexStudies) else list,
            ready=self.ready,
        )
        return create_app(ctx)

    def serve_forever(self, promotion_poll_s: float = 30.0) -> None:
        """Start everything; return after SIGTERM/SIGINT once in-flight work has finished."""
        from dicom_node.node import DicomNode

        self.start_models()
        self.node = DicomNode(self.settings, self.analyse)
        self.node.start()
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
            uvicorn.Config(self.http_app(), host=h.host, port=h.port, log_config=None)
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
            self.node.stop()
            self.shutdown()
            log_event(log, "radtriage stopped", drain_s=round(time.monotonic() - started, 1))

    def shutdown(self) -> None:
        """Leave Ray. A deploying app removes its Serve app (all of Serve on a local Ray it
        started); an attached one leaves the shared app running for the other nodes."""
        if self._handle is not None:
            import ray
            from ray import serve

            if self.settings.serving.deploy:
                if os.environ.get("RAY_ADDRESS"):
                    serve.delete(self.settings.serving.app_name)
                else:
                    serve.shutdown()
            ray.shutdown()
            self._handle = None
