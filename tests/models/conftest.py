"""Fixtures for model tests: a tiny exported model pair in a temporary repository."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.metadata import InputSpec, Normalisation, ThresholdSpec
from models.networks import NetworkConfig, build_network
from training.export import export_model

SPEC_ZYX = (8, 32, 32)


def tiny_spec(channels: tuple[str, ...]) -> InputSpec:
    return InputSpec(
        spacing_xyz=(2.5, 2.5, 3.0),
        shape_zyx=SPEC_ZYX,
        channels=channels,
        normalisation=tuple(Normalisation(channel=c) for c in channels),  # type: ignore[arg-type]
    )


def export_tiny(repo: Path, name: str, version: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    detector = name == "cspca_detector"
    channels = ("t2w", "adc", "hbv") if detector else ("t2w",)
    config = NetworkConfig(
        in_channels=len(channels),
        out_channels=1 if detector else 3,
        channels=(4, 8),
        strides=((2, 2, 2),),
        num_res_units=0,
        activation="sigmoid" if detector else "softmax",
    )
    rng = np.random.default_rng(seed)
    parity = rng.normal(size=(2, len(channels), *SPEC_ZYX)).astype(np.float32)
    version_dir = export_model(
        build_network(config),
        repository=repo,
        name=name,
        version=version,
        task="cspca_detection" if detector else "gland_segmentation",
        network=config,
        input_spec=tiny_spec(channels),
        output_channels=("csPCa likelihood",) if detector else ("background", "PZ", "TZ"),
        parity_inputs=parity,
        thresholds=ThresholdSpec(urgent=0.6, soon=0.3, source="test") if detector else None,
        training_data={"source": "random", "synthetic": True},
    )
    return version_dir.path


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """Two detector versions and one gland version (random weights), none promoted."""
    repo = tmp_path / "repo"
    export_tiny(repo, "cspca_detector", "1.0.0", seed=1)
    export_tiny(repo, "cspca_detector", "1.1.0", seed=2)
    export_tiny(repo, "prostate_gland", "1.0.0", seed=3)
    return repo
