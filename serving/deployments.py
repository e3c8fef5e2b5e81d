"""Ray Serve deployments: preprocess -> (gland, detector: batched ONNX Runtime) -> postprocess,
behind an ingress whose one job is `predict(InferenceRequest) -> InferenceOutput` (`core.engine`):
volumes in, prediction out. Reading DICOM, deciding the priority and writing SR/SEG happen on the
DICOM node (`triage.analysis`), so no Ray worker needs the node's files.

    TriageIngress ──> Preprocessor (CPU: resample + normalise, models.preprocessing)
                  ├─> OnnxModelDeployment "gland"     @serve.batch, one result or error per item
                  ├─> OnnxModelDeployment "detector"  @serve.batch
                  ├─> OnnxModelDeployment "shadow"    optional: returned apart, never sets a flag
                  └─> Postprocessor (CPU: lesions, zones, gland volume; models.postprocessing)

Model versions travel in `user_config` ({"detector": "name:version", "gland": ...}) and swap as
one unit: the ingress resolves and verifies the whole set (seal, sha256 of every file, the pair's
pipeline) and pins every request to the set it held when the request came in, passing the exact
versions to each stage. Pre/postprocessing keep the steps, and model replicas the loaded
networks, of the versions requests still pin (loading a pinned one on demand), so no request
mixes one version's detector with another's calibration, gate or grid. A set that fails
verification is refused whole and the old set keeps serving (`info()["last_error"]`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

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
from models.pipeline import PipelineSteps, PreparedPair, model_maps
from models.preprocessing import PreparedCase
from models.repository import ModelRepository
from serving.batching import BatchItemResult, run_batch

log = logging.getLogger(__name__)

APP_NAME = "radtriage"
DETECTOR_ROLES = frozenset({"detector", "shadow"})  # roles whose outputs set a priority
#: Versions a replica keeps ready: the current set, the one before (requests in flight) and one
#: more, so a rollout never evicts what a pinned request still needs.
KEEP_VERSIONS = 3

Pair = tuple[str, str]  # exact ("detector NAME:VERSION", "gland NAME:VERSION")
K = TypeVar("K")
V = TypeVar("V")


class _KeptVersions(Generic[K, V]):
    """What a replica keeps per pinned version: the last `KEEP_VERSIONS` used, one loaded on
    demand (thread-safe: model loads happen on worker threads)."""

    def __init__(self, load: Callable[[K], V]) -> None:
        self._load = load
        self._kept: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V:
        with self._lock:
            value = self._kept.get(key)
            if value is None:
                value = self._load(key)
                self._kept[key] = value
                while len(self._kept) > KEEP_VERSIONS:
                    self._kept.popitem(last=False)
            self._kept.move_to_end(key)
            return value


def pin_versions(repository: Path | None, refs: dict[str, str]) -> dict[str, str]:
    """Role -> exact NAME:VERSION for a set of references, verified as one unit: each version's
    seal and files, and the detector/gland pair's pipeline. Raises `ModelError` (the set is then
    refused whole)."""
    repo = ModelRepository(repository)
    pinned = {role: repo.exact(ref) for role, ref in refs.items()}
    for ref in pinned.values():
        repo.verify(ref)
    _steps(repository, (pinned["detector"], pinned["gland"]))
    return pinned


def _steps(repository: Path | None, pair: Pair) -> PipelineSteps:
    """Pre/post-processing of a model pair from their verified metadata (no network loaded)."""
    repo = ModelRepository(repository)
    return PipelineSteps(repo.resolve(pair[0]).metadata, repo.resolve(pair[1]).metadata)


class _PipelineStage:
    """Keeps the steps of the last `KEEP_VERSIONS` pairs requests pinned; loads one on demand."""

    def __init__(self, repository: str | None, detector: str, gland: str) -> None:
        self.repository = Path(repository) if repository else None
        self._steps: _KeptVersions[Pair, PipelineSteps] = _KeptVersions(
            lambda pair: _steps(self.repository, pair)
        )
        repo = ModelRepository(self.repository)
        self.steps_for((repo.exact(detector), repo.exact(gland)))

    def steps_for(self, pair: Pair) -> PipelineSteps:
        return self._steps.get(pair)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Warm the steps of the configured pair; requests still say which pair they need."""
        try:
            repo = ModelRepository(self.repository)
            self.steps_for((repo.exact(config["detector"]), repo.exact(config["gland"])))
        except (KeyError, ModelError) as exc:
            log_event(log, "model update not prepared", logging.WARNING, error=str(exc))


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Preprocessor(_PipelineStage):
    """Volumes -> the model-grid case and each model's (C, Z, Y, X) input, for a pinned pair."""

    def prepare(
        self, pair: Pair, t2w: Volume, adc: Volume, hbv: Volume
    ) -> tuple[PreparedCase | PreparedPair, np.ndarray, np.ndarray]:
        steps = self.steps_for(pair)
        prepared = steps.prepare(t2w, adc, hbv)
        return prepared, steps.gland_input(prepared), steps.detector_input(prepared)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Postprocessor(_PipelineStage):
    """Model outputs -> `Prediction` on the T2W grid, with the pinned pair's calibration and
    gate."""

    def finish(
        self,
        pair: Pair,
        prepared: PreparedCase | PreparedPair,
        gland_out: np.ndarray,
        detector_out: np.ndarray,
    ) -> Prediction:
        return self.steps_for(pair).finish(prepared, gland_out, detector_out)


@dataclass(frozen=True)
class ModelRun:
    """The model version that answered, with its priority thresholds (detectors have them)."""

    ref: ModelRef
    thresholds: Thresholds | None


@dataclass(frozen=True)
class ModelAnswer:
    """One batch item's result and the version that produced it (None: it could not load)."""

    item: BatchItemResult
    model: ModelRun | None


@serve.deployment(ray_actor_options={"num_cpus": 1})
class OnnxModelDeployment:
    """Verified ONNX model versions of one role; dynamic batching across studies.

    `infer` takes (exact NAME:VERSION, (C, Z, Y, X) input) items: each batch runs per version, a
    declared ensemble's members once for all studies of the batch (`models.pipeline.model_maps`).
    """

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
        self._models: _KeptVersions[str, OnnxModel] = _KeptVersions(self._load)
        self.requested = ref
        self.last_error: dict[str, str] | None = None
        self.model = self.model_for(ModelRepository(self.repository).exact(ref))
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def model_for(self, exact: str) -> OnnxModel:
        """The loaded, verified version `exact` (NAME:VERSION), loading it when not kept."""
        return self._models.get(exact)

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
            digest=model.ref.digest,
            providers=model.providers,
            threads=self.threads,
        )
        return model

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Load and warm the configured version ahead of the requests the ingress pins to it."""
        ref = config.get(self.role)
        if not ref or ref == self.requested:
            return
        try:
            self.model = self.model_for(ModelRepository(self.repository).exact(ref))
            self.requested, self.last_error = ref, None
        except ModelError as exc:  # keep serving the verified version we have
            self.last_error = exc.to_dict()
            log_event(log, "model update refused", logging.ERROR, role=self.role, **exc.to_dict())

    def info(self, exact: str | None = None) -> dict[str, Any]:
        model = self.model_for(exact) if exact else self.model
        ref: ModelRef = model.ref
        return {
            "role": self.role,
            "name": ref.name,
            "version": ref.version,
            "sha256": ref.sha256,
            "digest": ref.digest,
            "requested": self.requested,
            "providers": model.providers,
            "threads": self.threads,
            "thresholds": (
                model.metadata.thresholds.model_dump() if model.metadata.thresholds else None
            ),
            "last_error": self.last_error,
        }

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def infer(self, items: list[tuple[str, np.ndarray]]) -> list[ModelAnswer]:
        answers: list[ModelAnswer | None] = [None] * len(items)
        by_version: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                error = {"code": "model_failure", "message": "item must be (NAME:VERSION, array)"}
                answers[i] = ModelAnswer(BatchItemResult(error=error, batch_size=0), None)
                continue
            by_version.setdefault(item[0], []).append(i)
        for exact, indices in by_version.items():
            try:  # one version for its items, even while a rollout loads the next
                model = await asyncio.to_thread(self.model_for, exact)
            except ModelError as exc:
                for i in indices:
                    failed = BatchItemResult(error=exc.to_dict(), batch_size=0)
                    answers[i] = ModelAnswer(failed, None)
                continue
            thresholds = model.metadata.thresholds
            ran = ModelRun(model.ref, thresholds.as_thresholds() if thresholds else None)

            def run(inputs: dict[str, np.ndarray], model: OnnxModel = model) -> dict[str, Any]:
                return {"output": model_maps(model, inputs["input"])}

            results = await asyncio.to_thread(
                run_batch, run, [{"input": items[i][1]} for i in indices]
            )
            for i, result in zip(indices, results, strict=True):
                answers[i] = ModelAnswer(result, ran)
        return [a for a in answers if a is not None]


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
        repository: str | None = None,
        refs: dict[str, str] | None = None,
    ) -> None:
        self.pre, self.gland, self.detector, self.post = pre, gland, detector, post
        self.shadow = shadow
        self.repository = Path(repository) if repository else None
        self.last_error: dict[str, str] | None = None
        self.pinned = pin_versions(self.repository, refs or {})

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Swap to the configured version set as one unit, or refuse it whole."""
        try:
            pinned = pin_versions(self.repository, config)
        except ModelError as exc:
            self.last_error = exc.to_dict()
            log_event(log, "model set refused", logging.ERROR, refs=config, **exc.to_dict())
            return
        if pinned != self.pinned:
            log_event(log, "model set swapped", old=self.pinned, new=pinned)
        self.pinned, self.last_error = pinned, None

    async def predict(self, request: InferenceRequest) -> InferenceOutput:
        pinned = self.pinned  # this request's versions, whatever a rollout does meanwhile
        pair = (pinned["detector"], pinned["gland"])
        prepared, gland_in, detector_in = await self.pre.prepare.remote(
            pair, request.t2w, request.adc, request.hbv
        )
        gland_resp = self.gland.infer.remote((pinned["gland"], gland_in))
        detector_resp = self.detector.infer.remote((pinned["detector"], detector_in))
        shadow_resp = None
        if self.shadow is not None and "shadow" in pinned:
            shadow_resp = self.shadow.infer.remote((pinned["shadow"], detector_in))
        gland_answer: ModelAnswer = await gland_resp
        detector_answer: ModelAnswer = await detector_resp
        gland_out = gland_answer.item.raise_for_error()["output"]
        detector_out = detector_answer.item.raise_for_error()["output"]
        for role, answer in (("gland", gland_answer), ("detector", detector_answer)):
            _check_pinned(role, answer, pinned[role])
        prediction: Prediction = await self.post.finish.remote(
            pair, prepared, gland_out, detector_out
        )
        ran, gland_ran = detector_answer.model, gland_answer.model
        # guards: _check_pinned saw both answer; a detector without thresholds is refused at load
        if ran is None or gland_ran is None or ran.thresholds is None:
            raise ModelError(f"detector {pinned['detector']} has no thresholds")
        shadow = None
        if shadow_resp is not None:
            shadow_pair = (pinned["shadow"], pinned["gland"])  # its own calibration and gate
            shadow = await self._shadow(shadow_resp, shadow_pair, prepared, gland_out, request)
        return InferenceOutput(
            prediction,
            ran.ref,
            ran.thresholds,
            {"gland": gland_answer.item.batch_size, "detector": detector_answer.item.batch_size},
            shadow,
            gland_ran.ref,
        )

    async def _shadow(
        self,
        response: DeploymentResponse[Any] | DeploymentResponseGenerator[Any],
        pair: Pair,
        prepared: PreparedCase | PreparedPair,
        gland_out: np.ndarray,
        request: InferenceRequest,
    ) -> ShadowOutput:
        """The shadow detector's case likelihood, finished with its own pair's steps (its
        calibration and gate, on the inputs prepared for the live pair: a shadow must share the
        live detector's grid); a failure is reported, never propagated."""
        ref: ModelRef | None = None
        try:
            answer: ModelAnswer = await response
            ref = answer.model.ref if answer.model is not None else None
            out = answer.item.raise_for_error()["output"]
            pred: Prediction = await self.post.finish.remote(pair, prepared, gland_out, out)
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
        info = await self.detector.info.remote(self.pinned["detector"])
        return ModelRef(info["name"], info["version"], info["sha256"], digest=info["digest"])

    async def models(self) -> dict[str, Any]:
        """Each role's pinned version (what the next request runs); `last_error` is why the
        last configured set was refused, when it was."""
        pinned = self.pinned
        roles = {"gland": self.gland, "detector": self.detector}
        if self.shadow is not None and "shadow" in pinned:
            roles["shadow"] = self.shadow
        out = {}
        for role, handle in roles.items():
            info = await handle.info.remote(pinned[role])
            out[role] = {**info, "last_error": self.last_error or info["last_error"]}
        return out


def _check_pinned(role: str, answer: ModelAnswer, pinned: str) -> None:
    """A guard: the version that answered is the one the request was pinned to."""
    ran = answer.model
    if ran is None or f"{ran.ref.name}:{ran.ref.version}" != pinned:
        got = f"{ran.ref.name}:{ran.ref.version}" if ran is not None else "none"
        raise ModelError(f"{role} answered with {got}, but the request was pinned to {pinned}")


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
    return TriageIngress.options(ray_actor_options=stage, user_config=refs).bind(
        pre, model("gland"), model("detector"), post, shadow, repo, initial
    )
