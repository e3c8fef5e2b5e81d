"""Ray Serve deployments: preprocess -> (gland, detector: batched ONNX Runtime) -> postprocess,
behind an ingress that runs `dicom_node.analysis.analyse_study` and returns its `StudyAnalysis`.

    TriageIngress ──> Preprocessor (CPU: resample + normalise, models.preprocessing)
                  ├─> OnnxModelDeployment "gland"     @serve.batch, one result or error per item
                  ├─> OnnxModelDeployment "detector"  @serve.batch
                  ├─> OnnxModelDeployment "shadow"    optional, logged only, never in results
                  └─> Postprocessor (CPU: lesions, zones, gland volume; models.postprocessing)

Model versions travel in `user_config` ({"detector": "name:version", "gland": ...}): changing it
makes Serve call `reconfigure` on every replica, which loads and verifies the new version
(sha256 + ONNX signature), warms it and swaps it in; a version that fails verification is
refused and the old one keeps serving (`info()["last_error"]` says why).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from core.domain import ModelRef, Prediction, Volume
from core.errors import ModelError
from core.log_events import log_event
from core.priority import Thresholds
from core.settings import Settings
from dicom_node.analysis import EngineOutput, StudyAnalysis, analyse_study
from serving.batching import BatchItemResult, run_batch

log = logging.getLogger(__name__)

APP_NAME = "radtriage"
INGRESS = "TriageIngress"


class _Meta:
    """Stand-in for an OnnxModel where only its metadata is needed (pre/post-processing)."""

    def __init__(self, metadata: Any) -> None:
        self.metadata = metadata
        self.ref = metadata.model_ref()


def _metadata_pipeline(repository: Path | None, detector: str, gland: str) -> Any:
    from models.pipeline import TriagePipeline
    from models.repository import ModelRepository

    repo = ModelRepository(repository)
    return TriagePipeline(
        _Meta(repo.resolve(detector).metadata),  # type: ignore[arg-type]
        _Meta(repo.resolve(gland).metadata),  # type: ignore[arg-type]
    )


class _PipelineStage:
    def __init__(self, repository: str | None, detector: str, gland: str) -> None:
        self.repository = Path(repository) if repository else None
        self.refs = (detector, gland)
        self.pipeline = _metadata_pipeline(self.repository, detector, gland)

    def reconfigure(self, config: dict[str, Any]) -> None:
        refs = (config.get("detector", self.refs[0]), config.get("gland", self.refs[1]))
        if refs != self.refs:
            try:
                self.pipeline = _metadata_pipeline(self.repository, *refs)
                self.refs = refs
            except ModelError as exc:
                log_event(log, "model update refused", logging.ERROR, **exc.to_dict())


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Preprocessor(_PipelineStage):
    """Volumes -> the model-grid case and each model's (C, Z, Y, X) input."""

    def prepare(self, t2w: Volume, adc: Volume, hbv: Volume) -> tuple[Any, np.ndarray, np.ndarray]:
        prepared = self.pipeline.prepare(t2w, adc, hbv)
        return prepared, self.pipeline.gland_input(prepared), self.pipeline.detector_input(prepared)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Postprocessor(_PipelineStage):
    """Model outputs -> `Prediction` on the T2W grid, plus the thresholds that apply."""

    def finish(
        self, prepared: Any, gland_out: np.ndarray, detector_out: np.ndarray
    ) -> tuple[Prediction, Thresholds]:
        return self.pipeline.finish(prepared, gland_out, detector_out), self.pipeline.thresholds


@serve.deployment(ray_actor_options={"num_cpus": 1})
class OnnxModelDeployment:
    """One verified ONNX model version; dynamic batching across studies."""

    def __init__(
        self,
        role: str,
        repository: str | None,
        ref: str,
        device: str = "auto",
        threads: int = 1,
        max_batch_size: int = 4,
        batch_wait_timeout_s: float = 0.05,
    ) -> None:
        self.role = role
        self.repository = Path(repository) if repository else None
        self.device, self.threads = device, max(1, threads)
        self.requested = ref
        self.last_error: dict[str, str] | None = None
        self.model = self._load(ref)
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _load(self, ref: str) -> Any:
        from models.onnx_runner import OnnxModel

        model = OnnxModel.load(self.repository, ref, device=self.device, threads=self.threads)
        shape = tuple(int(d) for d in model.metadata.inputs[0].shape[1:])
        model.run(np.zeros((1, *shape), np.float32))  # warm: first run allocates
        log_event(
            log,
            "model loaded",
            role=self.role,
            model=f"{model.ref.name}:{model.ref.version}",
            providers=model.providers,
            threads=self.threads,
        )
        return model

    def reconfigure(self, config: dict[str, Any]) -> None:
        ref = config.get(self.role)
        if not ref or ref == self.requested:
            return
        try:
            self.model = self._load(ref)
            self.requested, self.last_error = ref, None
        except ModelError as exc:  # keep serving the verified version we have
            self.last_error = exc.to_dict()
            log_event(log, "model update refused", logging.ERROR, role=self.role, **exc.to_dict())

    def info(self) -> dict[str, Any]:
        ref: ModelRef = self.model.ref
        return {
            "role": self.role,
            "name": ref.name,
            "version": ref.version,
            "sha256": ref.sha256,
            "requested": self.requested,
            "providers": self.model.providers,
            "threads": self.threads,
            "thresholds": (
                self.model.metadata.thresholds.model_dump()
                if self.model.metadata.thresholds
                else None
            ),
            "last_error": self.last_error,
        }

    def ref(self) -> ModelRef:
        return self.model.ref  # type: ignore[no-any-return]

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def infer(self, items: list[np.ndarray]) -> list[BatchItemResult]:
        model = self.model  # one version for the whole batch, even during a reconfigure
        ref = f"{model.ref.name}:{model.ref.version}"

        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"output": model.run(inputs["input"])}

        results = await asyncio.to_thread(run_batch, run, [{"input": x} for x in items])
        return [BatchItemResult(r.outputs, r.error, r.batch_size, {"model": ref}) for r in results]


class ServeEngine:
    """`analysis.Engine` over deployment handles (used inside the ingress, in a worker thread)."""

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        detector: ModelRef,
        thresholds: Thresholds,
        shadow: Any = None,
    ) -> None:
        self.handles = handles
        self._detector = detector
        self._thresholds = thresholds
        self._shadow = shadow

    @property
    def detector(self) -> ModelRef:
        return self._detector

    @property
    def thresholds(self) -> Thresholds:
        return self._thresholds

    def predict(self, t2w: Volume, adc: Volume, hbv: Volume) -> EngineOutput:
        h = self.handles
        prepared, gland_in, detector_in = h["pre"].prepare.remote(t2w, adc, hbv).result()
        gland_resp = h["gland"].infer.remote(gland_in)
        detector_resp = h["detector"].infer.remote(detector_in)
        gland_item: BatchItemResult = gland_resp.result()
        detector_item: BatchItemResult = detector_resp.result()
        gland_out = gland_item.raise_for_error()["output"]
        detector_out = detector_item.raise_for_error()["output"]
        self._detector = h["detector"].ref.remote().result()
        prediction, self._thresholds = (
            h["post"].finish.remote(prepared, gland_out, detector_out).result()
        )
        if self._shadow is not None:
            self._shadow(prepared, gland_out, detector_in, prediction)
        return EngineOutput(
            prediction,
            {"gland": gland_item.batch_size, "detector": detector_item.batch_size},
        )


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16)
class TriageIngress:
    """Analyses one study per call; returns `StudyAnalysis` (result + documents written)."""

    def __init__(
        self,
        pre: DeploymentHandle,
        gland: DeploymentHandle,
        detector: DeploymentHandle,
        post: DeploymentHandle,
        shadow: DeploymentHandle | None,
        triage_json: str,
    ) -> None:
        from core.settings import TriageSettings

        self.handles = {"pre": pre, "gland": gland, "detector": detector, "post": post}
        self.shadow = shadow
        self.triage = TriageSettings.model_validate_json(triage_json)
        self.shadow_log: deque[dict[str, Any]] = deque(maxlen=256)
        self._lock = threading.Lock()

    def _compare_shadow(
        self, prepared: Any, gland_out: np.ndarray, detector_in: np.ndarray, primary: Prediction
    ) -> None:
        assert self.shadow is not None
        shadow = self.shadow

        def compare() -> None:
            try:
                item: BatchItemResult = shadow.infer.remote(detector_in).result()
                out = item.raise_for_error()["output"]
                pred, _ = self.handles["post"].finish.remote(prepared, gland_out, out).result()
                entry = {
                    "shadow_model": item.extras.get("model"),
                    "primary_likelihood": round(primary.case_likelihood, 4),
                    "shadow_likelihood": round(pred.case_likelihood, 4),
                    "primary_lesions": len(primary.lesions),
                    "shadow_lesions": len(pred.lesions),
                    "at": time.time(),
                }
            except Exception as exc:  # a shadow failure is logged, never propagated
                entry = {"shadow_error": f"{type(exc).__name__}: {exc}", "at": time.time()}
            with self._lock:
                self.shadow_log.append(entry)
            log_event(log, "shadow comparison", **entry)

        threading.Thread(target=compare, daemon=True).start()

    async def analyse(
        self,
        source: str | Sequence[str],
        out_dir: str,
        study_instance_uid: str | None = None,
        previous_sr: str | None = None,
        days_waited: int | None = None,
    ) -> StudyAnalysis:
        detector = await self.handles["detector"].ref.remote()
        info = await self.handles["detector"].info.remote()
        thresholds = (
            Thresholds(**{k: info["thresholds"][k] for k in ("urgent", "soon")})
            if info["thresholds"]
            else Thresholds(0.5, 0.2)
        )
        engine = ServeEngine(
            self.handles,
            detector,
            thresholds,
            self._compare_shadow if self.shadow is not None else None,
        )
        src: Path | list[Path] = (
            Path(source) if isinstance(source, str) else [Path(p) for p in source]
        )
        return await asyncio.to_thread(
            analyse_study,
            src,
            Path(out_dir),
            engine,
            triage=self.triage,
            study_instance_uid=study_instance_uid,
            previous_sr=Path(previous_sr) if previous_sr else None,
            days_waited=days_waited,
        )

    async def models(self) -> dict[str, Any]:
        roles = {"gland": self.handles["gland"], "detector": self.handles["detector"]}
        if self.shadow is not None:
            roles["shadow"] = self.shadow
        return {role: await h.info.remote() for role, h in roles.items()}

    def shadow_comparisons(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.shadow_log)


def model_config(settings: Settings) -> dict[str, str]:
    """The user_config every deployment receives: role -> requested model reference."""
    m = settings.models
    config = {"detector": m.detector, "gland": m.gland}
    if m.shadow:
        config["shadow"] = m.shadow
    return config


#: Logical CPUs of the deployments that are not models (pre/post-processing and the ingress).
STAGE_CPUS = 0.75


def required_cpus(settings: Settings) -> float:
    """Logical CPUs the application asks Ray for (models x replicas + the other stages)."""
    s = settings.serving
    n_models = 3 if settings.models.shadow else 2
    return STAGE_CPUS + n_models * s.replicas * s.num_cpus_per_replica


def build_app(settings: Settings, refs: dict[str, str] | None = None) -> Any:
    """The bound Serve application for `settings`, serving the model versions in `refs`.

    Constructor arguments always come from `settings`, and `refs` only through `user_config`,
    so redeploying with other `refs` is an in-place `reconfigure` of the running replicas
    (no restart) rather than a replacement.
    """
    initial = model_config(settings)
    refs = refs or initial
    s = settings.serving
    repo = str(settings.models.repository) if settings.models.repository else None
    threads = max(1, round(s.num_cpus_per_replica))

    def model(role: str) -> Any:
        return OnnxModelDeployment.options(
            name=role,
            num_replicas=s.replicas,
            ray_actor_options={"num_cpus": s.num_cpus_per_replica},
            user_config=refs,
            max_ongoing_requests=max(16, 4 * s.max_batch_size),
        ).bind(
            role, repo, initial[role], s.device, threads, s.max_batch_size, s.batch_wait_timeout_s
        )

    stage_args = (repo, initial["detector"], initial["gland"])
    pre = Preprocessor.options(user_config=refs).bind(*stage_args)
    post = Postprocessor.options(user_config=refs).bind(*stage_args)
    shadow = model("shadow") if "shadow" in refs else None
    return TriageIngress.bind(
        pre,
        model("gland"),
        model("detector"),
        post,
        shadow,
        settings.triage.model_dump_json(),
    )
