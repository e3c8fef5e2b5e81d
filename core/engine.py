"""The engine port: three volumes of one study in, a prediction out.

The DICOM node's analysis step (`triage.analysis`) calls an `InferenceEngine`; the
composition root picks the implementation:

- `models.engine.LocalEngine`: ONNX Runtime in this process (`infer`, `evaluate`, tests, small
  installs with ``--local``);
- `serving.serve_engine.ServeEngine`: a Ray Serve handle, possibly on a remote cluster.

Only what is defined here (numpy volumes and small frozen objects) crosses the port, so a Ray
worker never needs a file path, a pydicom dataset or the node's disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from core.domain import ModelRef, Prediction, Volume
from core.priority import Thresholds


@dataclass(frozen=True)
class InferenceRequest:
    """One study's model inputs on their native grids, plus the study it concerns (for logs and
    error messages only)."""

    study_instance_uid: str
    t2w: Volume
    adc: Volume
    hbv: Volume

    def __post_init__(self) -> None:
        for role in ("t2w", "adc", "hbv"):
            if not isinstance(getattr(self, role), Volume):
                raise TypeError(f"{role} must be a Volume, got {type(getattr(self, role))}")


@dataclass(frozen=True)
class ShadowOutput:
    """What a candidate detector run in shadow said on the same inputs: stored, never sent."""

    model: ModelRef | None
    case_likelihood: float | None = None
    lesions: int = 0
    error: str | None = None


@dataclass(frozen=True)
class InferenceOutput:
    """A prediction with the detector version that made it and that version's thresholds (one
    consistent triple, even while a new version rolls out), batch sizes for metrics, and the
    shadow detector's answer when one is configured."""

    prediction: Prediction
    detector: ModelRef
    thresholds: Thresholds
    batch_sizes: dict[str, int] = field(default_factory=dict)
    shadow: ShadowOutput | None = None
    gland: ModelRef | None = None  # the gland model version that answered


class InferenceEngine(Protocol):
    """Turns the volumes of one study into a prediction (in process or via Ray Serve)."""

    def current_detector(self) -> ModelRef:
        """The detector version a prediction would use now (named in "not analysed" SRs)."""
        ...

    def predict(self, request: InferenceRequest) -> InferenceOutput:
        """Raise `core.errors.InferenceError` or `ModelError` when the models cannot answer."""
        ...
