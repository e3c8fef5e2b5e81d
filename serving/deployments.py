"""Ray Serve deployments: preprocess -> (gland, detector: batched ONNX Runtime) -> postprocess,
behind an ingress whose one job is `predict(InferenceRequest) -> InferenceOutput` (`core.engine`):
volumes in, prediction out. Reading DICOM, deciding the priority and writing SR/SEG happen on the
DICOM node (`triage.analysis`), so no Ray worker needs the node's files.

    TriageIngress ──> Preprocessor (CPU: resample + normalise, models.preprocessing)
                  ├─> OnnxModelDeployment "gland"     @serve.batch, one result or error per item
                  ├─> OnnxModelDeployment "detector"  @serve.batch
                  ├─> OnnxModelDeployment "shadow"    optional: returned apart, never sets a flag
                  └─> Postprocessor (CPU: lesions, zones, gland volume; models.postprocessing)

Model versions travel in `user_config` ({"detector": "name:version", "gland": ...}): changing it
makes Serve call `reconfigure` on every replica, which loads and verifies the new version
(sha256 + ONNX signature), warms it and swaps it in; a version that fails verification is
refused and the old one keeps serving (`info()["last_error"]` says why).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from core.domain import ModelRef, Prediction, Volume
from core.engine import InferenceOutput, InferenceRequest, ShadowOutput
from core.errors import ModelError, ModelSignatureError
from core.log_events import log_event
from core.priority import Thresholds
from core.settings import Settings
from models.onnx_runner import OnnxModel
from models.pipeline import PipelineSteps, PreparedPair, declared, model_map
from models.preprocessing import PreparedCase
from models.repository import ModelRepository
from serving.batching import BatchItemResult, run_batch

log = logging.getLogger(__name__)

APP_NAME = "radtriage"
DETECTOR_ROLES = frozenset({"detector", "shadow"})  # roles whose outputs set a priority


def _steps(repository: Path | None, detector: str, gland: str) -> PipelineSteps:
    """Pre/post-processing of a model pair from their verified metadata (no network loaded)."""
    repo = ModelRepository(repository)
    return PipelineSteps(repo.resolve(detector).metadata, repo.resolve(gland).metadata)


class _PipelineStage:
    def __init__(self, repository: str | None, detector: str, gland: str) -> None:
        self.repository = Path(repository) if repository else None
        self.refs = (detector, gland)
        self.steps = _steps(self.repository, detector, gland)

    def reconfigure(self, config: dict[str, Any]) -> None:
        refs = (config.get("detector", self.refs[0]), config.get("gland", self.refs[1]))
        if refs != self.refs:
            try:
                self.steps = _steps(self.repository, *refs)
                self.refs = refs
            except ModelError as exc:
                log_event(log, "model update refused", logging.ERROR, **exc.to_dict())


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Preprocessor(_PipelineStage):
    """Volumes -> the model-grid case and each model's (C, Z, Y, X) input."""

    def prepare(
        self, t2w: Volume, adc: Volume, hbv: Volume
    ) -> tuple[PreparedCase | PreparedPair, np.ndarray, np.ndarray]:
        prepared = self.steps.prepare(t2w, adc, hbv)
        return prepared, self.steps.gland_input(prepared), self.steps.detector_input(prepared)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Postprocessor(_PipelineStage):
    """Model outputs -> `Prediction` on the T2W grid."""

    def finish(
        self, prepared: PreparedCase | PreparedPair, gland_out: np.ndarray, detector_out: np.ndarray
    ) -> Prediction:
        return self.steps.finish(prepared, gland_out, detector_out)


@dataclass(frozen=True)
class ModelRun:
    """The model version that answered, with its priority thresholds (detectors have them)."""

    ref: ModelRef
    thresholds: Thresholds | None


@dataclass(frozen=True)
class ModelAnswer:
    """One batch item's result and the version that produced it."""

    item: BatchItemResult
    model: ModelRun


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

    def _load(self, ref: str) -> OnnxModel:
        model = OnnxModel.load(self.repository, ref, device=self.device, threads=self.threads)
        if self.role in DETECTOR_ROLES and model.metadata.thresholds is None:
            raise ModelSignatureError(
                f"{ref} has no priority thresholds in its metadata.json; choose them with "
                "`radtriage evaluate --write-thresholds` before serving it"
            )
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
    async def infer(self, items: list[np.ndarray]) -> list[ModelAnswer]:
        model = self.model  # one version for the whole batch, even during a reconfigure
        thresholds = model.metadata.thresholds
        ran = ModelRun(model.ref, thresholds.as_thresholds() if thresholds else None)

        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if declared(model.metadata):  # members x flips (x windows) per study
                return {"output": np.stack([model_map(model, x) for x in inputs["input"]])}
            return {"output": model.run(inputs["input"])}

        results = await asyncio.to_thread(run_batch, run, [{"input": x} for x in items])
        return [ModelAnswer(r, ran) for r in results]


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16)
class TriageIngress:
    """Answers `predict(InferenceRequest) -> InferenceOutput`: volumes in, prediction out.

    Arrays and small frozen objects only: no file path, no DICOM, nothing of the node's disk.
    A shadow detector, when configured, runs on the same inputs in the same request; its answer
    travels back in `InferenceOutput.shadow` for the node to store (it never sets a priority).
    """

    def __init__(
        self,
        pre: DeploymentHandle,
        gland: DeploymentHandle,
        detector: DeploymentHandle,
        post: DeploymentHandle,
        shadow: DeploymentHandle | None,
    ) -> None:
        self.pre, self.gland, self.detector, self.post = pre, gland, detector, post
        self.shadow = shadow

    async def predict(self, request: InferenceRequest) -> InferenceOutput:
        prepared, gland_in, detector_in = await self.pre.prepare.remote(
            request.t2w, request.adc, request.hbv
        )
        gland_resp = self.gland.infer.remote(gland_in)
        detector_resp = self.detector.infer.remote(detector_in)
        shadow_resp = self.shadow.infer.remote(detector_in) if self.shadow is not None else None
        gland_answer: ModelAnswer = await gland_resp
        detector_answer: ModelAnswer = await detector_resp
        gland_out = gland_answer.item.raise_for_error()["output"]
        detector_out = detector_answer.item.raise_for_error()["output"]
        prediction: Prediction = await self.post.finish.remote(prepared, gland_out, detector_out)
        ran = detector_answer.model
        if ran.thresholds is None:  # refused at load; a guard, not a default
            raise ModelError(f"detector {ran.ref.name}:{ran.ref.version} has no thresholds")
        shadow = None
        if shadow_resp is not None:
            shadow = await self._shadow(shadow_resp, prepared, gland_out, request)
        return InferenceOutput(
            prediction,
            ran.ref,
            ran.thresholds,
            {"gland": gland_answer.item.batch_size, "detector": detector_answer.item.batch_size},
            shadow,
            gland_answer.model.ref,
        )

    async def _shadow(
        self,
        response: DeploymentResponse[Any] | DeploymentResponseGenerator[Any],
        prepared: PreparedCase,
        gland_out: np.ndarray,
        request: InferenceRequest,
    ) -> ShadowOutput:
        """The shadow detector's case likelihood; a failure is reported, never propagated."""
        ref: ModelRef | None = None
        try:
            answer: ModelAnswer = await response
            ref = answer.model.ref
            out = answer.item.raise_for_error()["output"]
            pred: Prediction = await self.post.finish.remote(prepared, gland_out, out)
            return ShadowOutput(ref, pred.case_likelihood, len(pred.lesions))
        except Exception as exc:
            log_event(
                log,
                "shadow failed",
                logging.WARNING,
                study_instance_uid=request.study_instance_uid,
                error=f"{type(exc).__name__}: {exc}",
            )
            return ShadowOutput(ref, error=f"{type(exc).__name__}: {exc}")

    async def current_detector(self) -> ModelRef:
        return await self.detector.ref.remote()  # type: ignore[no-any-return]

    async def models(self) -> dict[str, Any]:
        roles = {"gland": self.gland, "detector": self.detector}
        if self.shadow is not None:
            roles["shadow"] = self.shadow
        return {role: await h.info.remote() for role, h in roles.items()}


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
    initial = settings.models.role_refs()
    refs = refs or initial
    s = settings.serving
    repo = str(settings.models.repository) if settings.models.repository else None
    threads = max(1, round(s.num_cpus_per_replica))

    def actor(num_cpus: float) -> dict[str, Any]:
        return {"num_cpus": num_cpus, "resources": dict(s.resources)}

    def model(role: str) -> Any:
        return OnnxModelDeployment.options(
            name=role,
            num_replicas=s.replicas,
            ray_actor_options=actor(s.num_cpus_per_replica),
            user_config=refs,
            max_ongoing_requests=max(16, 4 * s.max_batch_size),
        ).bind(
            role, repo, initial[role], s.device, threads, s.max_batch_size, s.batch_wait_timeout_s
        )

    stage_args = (repo, initial["detector"], initial["gland"])
    stage = actor(STAGE_CPUS / 3)
    pre = Preprocessor.options(user_config=refs, ray_actor_options=stage).bind(*stage_args)
    post = Postprocessor.options(user_config=refs, ray_actor_options=stage).bind(*stage_args)
    shadow = model("shadow") if "shadow" in refs else None
    return TriageIngress.options(ray_actor_options=stage).bind(
        pre,
        model("gland"),
        model("detector"),
        post,
        shadow,
    )
