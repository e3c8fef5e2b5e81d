"""Prometheus metrics of one serving process, on their own registry (no module globals)."""

from __future__ import annotations

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
            "radtriage_queue_depth", "Studies waiting for or in analysis", registry=r
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

    def observe_result(self, result: TriageResult) -> None:
        self.studies.labels(result.status.value, result.priority.value).inc()
        total = result.timings_ms.get("total")
        if total is not None:
            self.analysis_seconds.observe(total / 1000.0)
        inference = result.timings_ms.get("inference")
        if inference is not None:
            self.inference_seconds.observe(inference / 1000.0)

    def set_models(self, models: dict[str, ModelRef]) -> None:
        """Replace the loaded-model gauge with `models` (role -> ref)."""
        self.model_info.clear()
        for role, ref in models.items():
            self.model_info.labels(role, ref.name, ref.version, ref.sha256[:12]).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
