"""`core.engine.InferenceEngine` in this process: `models.pipeline.TriagePipeline` on ONNX Runtime.

Used by `radtriage infer`, `radtriage evaluate`, `radtriage serve --local` and the tests; the
Ray Serve implementation (`serving.serve_engine`) runs the very same pipeline steps in
deployments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.domain import ModelRef
from core.engine import InferenceOutput, InferenceRequest
from models.pipeline import TriagePipeline


class LocalEngine:
    """Direct calls into one loaded, verified `TriagePipeline`."""

    def __init__(self, pipeline: TriagePipeline) -> None:
        self.pipeline = pipeline

    @classmethod
    def load(
        cls,
        repository: Path | None,
        detector: str,
        gland: str,
        *,
        device: str = "auto",
        threads: int | None = None,
    ) -> LocalEngine:
        """Load and verify (sha256, ONNX signature, thresholds) both models."""
        return cls(
            TriagePipeline.from_repository(
                repository=repository,
                detector=detector,
                gland=gland,
                device=device,
                threads=threads,
            )
        )

    def current_detector(self) -> ModelRef:
        return self.pipeline.detector.ref

    def predict(self, request: InferenceRequest) -> InferenceOutput:
        prediction = self.pipeline.predict(request.t2w, request.adc, request.hbv)
        return InferenceOutput(
            prediction,
            self.pipeline.detector.ref,
            self.pipeline.thresholds,
            {"detector": 1, "gland": 1},
            gland=self.pipeline.gland.ref,
        )

    def loaded(self, timeout_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Name, version, sha256 and execution providers of each loaded model (`timeout_s`:
        for the Ray engine's signature; a local answer is immediate)."""
        del timeout_s
        return {
            role: {
                "name": m.ref.name,
                "version": m.ref.version,
                "sha256": m.ref.sha256,
                "providers": m.providers,
            }
            for role, m in (("detector", self.pipeline.detector), ("gland", self.pipeline.gland))
        }
