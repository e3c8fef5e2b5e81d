"""A tiny, hand-weighted model repository for serving tests (no training needed).

The "detector" is a fixed contrast filter, not a learned network: csPCa phantoms are bright on
high-b and dark on ADC, so a smoothed (hbv - adc) z-score through a sigmoid separates positive
from negative phantoms. The "gland" model calls every voxel transition zone. Both are exported
with the models helper's `training.export.export_model`, so metadata and sha256 are real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.metadata import InputSpec, Normalisation, PostprocessingSpec, ThresholdSpec
from models.networks import ProbabilityNet, detector_config, gland_config
from training.export import export_model

SPEC = InputSpec(
    spacing_xyz=(1.0, 1.0, 3.0),
    shape_zyx=(16, 64, 64),
    channels=("t2w", "adc", "hbv"),
    normalisation=tuple(Normalisation(channel=c) for c in ("t2w", "adc", "hbv")),
)
GLAND_SPEC = SPEC.model_copy(update={"channels": ("t2w",)})


class ContrastLogits(nn.Module):
    """logit = gain * (smoothed(hbv - adc) - offset); channels in t2w, adc, hbv order."""

    def __init__(self, gain: float = 3.0, offset: float = 3.6) -> None:
        super().__init__()
        self.gain, self.offset = gain, offset
        self.smooth_xy = nn.AvgPool3d((1, 5, 5), stride=1, padding=(0, 2, 2))
        self.smooth_z = nn.AvgPool3d((3, 1, 1), stride=1, padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x[:, 2:3] - x[:, 1:2]
        return self.gain * (self.smooth_z(self.smooth_xy(score)) - self.offset)


class EverythingTZ(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = x[:, :1] * 0.0
        return torch.cat([zero, zero, zero + 8.0], dim=1)


def build_fixture_repository(root: Path, *, detector_versions: tuple[str, ...] = ("1",)) -> Path:
    """Write cspca_detector:<versions> and prostate_gland:1 under `root`, promote the first."""
    from models.repository import ModelRepository

    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(1, 3, *SPEC.shape_zyx)).astype(np.float32)
    for i, version in enumerate(detector_versions):
        export_model(
            ProbabilityNet(ContrastLogits(offset=3.6 + 0.2 * i), "sigmoid"),
            repository=root,
            name="cspca_detector",
            version=version,
            task="cspca_detection",
            network=detector_config(extra={"fixture": "hand-weighted contrast filter"}),
            input_spec=SPEC,
            output_channels=("cspca_likelihood",),
            parity_inputs=inputs,
            thresholds=ThresholdSpec(urgent=0.5, soon=0.3, source="test fixture"),
            postprocessing=PostprocessingSpec(detection_threshold=0.3, gland_margin_mm=None),
            description="test fixture",
        )
    export_model(
        ProbabilityNet(EverythingTZ(), "softmax"),
        repository=root,
        name="prostate_gland",
        version="1",
        task="gland_segmentation",
        network=gland_config(extra={"fixture": "every voxel is TZ"}),
        input_spec=GLAND_SPEC,
        output_channels=("background", "pz", "tz"),
        parity_inputs=inputs[:, :1],
        description="test fixture",
    )
    repo = ModelRepository(root)
    repo.promote(f"cspca_detector:{detector_versions[0]}", reason="test fixture", user="test")
    repo.promote("prostate_gland:1", reason="test fixture", user="test")
    return root
