"""Prometheus metrics of one serving process, on their own registry (no module globals)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from core.domain import ModelRef, TriageResult

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)
LIKELIHOOD_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    """Studies by status/priority, latencies, batch sizes, queue depth and model versions."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.studies = Counter(
            "radtriage_studies",
            "Studies analysed, by status and priority",
            ["status", "priority"],
            registry=r,
        )
        self.analysis_seconds = Histogram(
            "radtriage_analysis_seconds",
            "Whole analysis of one study (load to SR)",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "radtriage_inference_seconds",
            "Model inference of one study (prepare to prediction)",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "radtriage_batch_size",
            "Studies per ONNX Runtime batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "radtriage_queue_depth",
            "Studies waiting for or in analysis (received, complete, analysing)",
            registry=r,
        )
        self.model_info = Gauge(
            "radtriage_model_info",
            "Loaded model versions (value 1)",
            ["role", "name", "version", "sha256"],
            registry=r,
        )
        self.shadow_delta = Histogram(
            "radtriage_shadow_likelihood_delta",
            "|primary - shadow| case likelihood on the same study",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )

        self.model_likelihood = Histogram(
            "radtriage_case_likelihood",
            "Case csPCa likelihood reported, by model NAME:VERSION (drift monitoring)",
            ["model"],
            buckets=LIKELIHOOD_BUCKETS,
            registry=r,
        )
        self.model_priority = Counter(
            "radtriage_model_priority",
            "Studies by the model NAME:VERSION that analysed them and the priority given",
            ["model", "priority"],
            registry=r,
        )
        self.not_analysed = Counter(
            "radtriage_not_analysed",
            "Studies not analysed, by reason code (a bounded, coded set)",
            ["reason"],
            registry=r,
        )
        self.shadow_studies = Counter(
            "radtriage_shadow_studies",
            "Studies run by the shadow model (stored, never sent), by outcome",
            ["shadow_model", "outcome"],
            registry=r,
        )

    def observe_result(self, result: TriageResult) -> None:
        self.studies.labels(result.status.value, result.priority.value).inc()
        model = f"{result.model.name}:{result.model.version}" if result.model else "none"
        self.model_priority.labels(model, result.priority.value).inc()
        if result.case_likelihood is not None:
            self.model_likelihood.labels(model).observe(result.case_likelihood)
        if result.priority.value == "not_analysed":
            self.not_analysed.labels((result.reason or {}).get("code") or "unknown").inc()
        total = result.timings_ms.get("total")
        if total is not None:
            self.analysis_seconds.observe(total / 1000.0)
        inference = result.timings_ms.get("inference")
        if inference is not None:
            self.inference_seconds.observe(inference / 1000.0)

    def observe_shadow(self, shadow_model: str, delta: float | None) -> None:
        """One shadow run: `delta` = |primary - shadow| likelihood, None when it failed."""
        self.shadow_studies.labels(shadow_model, "error" if delta is None else "ok").inc()
        if delta is not None:
            self.shadow_delta.observe(delta)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Read `queue_depth` from the node's work queue at every scrape."""
        self.queue_depth.set_function(depth)

    def set_models(self, models: dict[str, ModelRef]) -> None:
        """Replace the loaded-model gauge with `models` (role -> ref)."""
        self.model_info.clear()
        for role, ref in models.items():
            self.model_info.labels(role, ref.name, ref.version, ref.sha256[:12]).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
