"""`core.engine.InferenceEngine` over a Ray Serve application handle (`serving.deployments`).

The DICOM node calls `predict` from its analysis worker threads; only the request's volumes go
to the cluster and only the prediction comes back, so the cluster may be remote and share no
file system with the node.
"""

from __future__ import annotations

from typing import Any

from ray.serve.handle import DeploymentHandle

from core.domain import ModelRef
from core.engine import InferenceOutput, InferenceRequest

#: How long one study may wait for the cluster before the node retries it later.
PREDICT_TIMEOUT_S = 600.0


class ServeEngine:
    """Calls `TriageIngress.predict` through a handle (deployed here or attached by name)."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float = PREDICT_TIMEOUT_S) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def current_detector(self) -> ModelRef:
        return self.handle.current_detector.remote().result(timeout_s=60.0)  # type: ignore[no-any-return]

    def predict(self, request: InferenceRequest) -> InferenceOutput:
        return self.handle.predict.remote(request).result(timeout_s=self.timeout_s)  # type: ignore[no-any-return]

    def loaded(self, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
        """Name, version, sha256 and providers of each model the app serves."""
        return self.handle.models.remote().result(timeout_s=timeout_s)  # type: ignore[no-any-return]
