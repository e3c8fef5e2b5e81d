"""MONAI networks for the two demo models, wrapped so the exported graph outputs probabilities.

- csPCa detector: 3 channels (t2w, adc, hbv) -> 1 channel voxel-wise csPCa likelihood (sigmoid).
- Prostate gland: channels -> 3 channels softmax (background, PZ, TZ); gland = PZ + TZ.

Both are small 3D U-Nets with anisotropic first stride (MRI slices are ~3x thicker than pixels).
The architecture is described by a `NetworkConfig` so training configs and metadata name it.
`input_pool` (z, y, x) average-pools the input before the U-Net and resizes its logits back
(trilinear) to the input size: the graph takes and returns the full model grid (PI-CAI's
20 x 256 x 256 at 0.5 mm) while the U-Net runs at 1 mm in-plane, which CPU training affords.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from monai.networks.nets import UNet
from torch import nn


@dataclass(frozen=True)
class NetworkConfig:
    """A MONAI `UNet` description, stored in training configs and model metadata."""

    in_channels: int
    out_channels: int
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    num_res_units: int = 1
    norm: str = "instance"
    dropout: float = 0.0
    activation: Literal["sigmoid", "softmax"] = "sigmoid"
    input_pool: tuple[int, int, int] = (1, 1, 1)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides needs len(channels) - 1 = {len(self.channels) - 1} entries, "
                f"got {len(self.strides)}"
            )
        if self.activation == "sigmoid" and self.out_channels != 1:
            raise ValueError("activation 'sigmoid' is for a single output channel")
        if len(self.input_pool) != 3 or any(int(k) < 1 for k in self.input_pool):
            raise ValueError(f"input_pool must be 3 factors >= 1, got {self.input_pool}")
        object.__setattr__(self, "input_pool", tuple(int(k) for k in self.input_pool))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["architecture"] = "monai.networks.nets.UNet"
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        d = {k: v for k, v in data.items() if k != "architecture"}
        d["channels"] = tuple(d.get("channels", cls.channels))
        if "strides" in d:
            d["strides"] = tuple(tuple(s) for s in d["strides"])
        if "input_pool" in d:
            d["input_pool"] = tuple(int(k) for k in d["input_pool"])
        return cls(**d)

    def divisor_zyx(self) -> tuple[int, int, int]:
        """The input shape must be divisible by this along (z, y, x)."""
        out = [int(k) for k in self.input_pool]
        for s in self.strides:
            for i in range(3):
                out[i] *= s[i]
        return (out[0], out[1], out[2])


class PooledNet(nn.Module):
    """`net` on an average-pooled input, its output resized back to the input's size."""

    def __init__(self, net: nn.Module, pool: tuple[int, int, int]) -> None:
        super().__init__()
        self.pool = nn.AvgPool3d(pool, stride=pool)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(self.pool(x))
        # A constant scale (not the input's size) keeps the exported output shape static.
        scale = tuple(float(k) for k in self.pool.kernel_size)  # type: ignore[union-attr]
        return nn.functional.interpolate(
            y, scale_factor=scale, mode="trilinear", align_corners=False
        )


class ProbabilityNet(nn.Module):
    """A logits network followed by its output activation: what we export to ONNX."""

    def __init__(self, net: nn.Module, activation: str) -> None:
        super().__init__()
        self.net = net
        self.activation = activation

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def input_pool(self) -> tuple[int, int, int]:
        return self.net.pool.kernel_size if isinstance(self.net, PooledNet) else (1, 1, 1)  # type: ignore[return-value]

    def coarse_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Training: the U-Net's logits at the pooled resolution (no resize back), for a loss
        against `coarse_target` labels; the exported graph is `forward`."""
        if isinstance(self.net, PooledNet):
            return self.net.net(self.net.pool(x))
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if self.activation == "softmax":
            return torch.softmax(y, dim=1)
        return torch.sigmoid(y)


def coarse_target(y: torch.Tensor, pool: tuple[int, int, int], *, binary: bool) -> torch.Tensor:
    """Labels (B, 1, Z, Y, X) on the pooled grid: max-pooled when binary (a lesion smaller than
    a pooled voxel stays), else the label at each pooling window's first voxel (zones)."""
    if tuple(pool) == (1, 1, 1):
        return y
    if binary:
        return torch.nn.functional.max_pool3d(y, pool, stride=pool)
    return y[..., :: pool[0], :: pool[1], :: pool[2]]


def build_network(config: NetworkConfig) -> ProbabilityNet:
    """The torch module for `config` (weights initialised by MONAI/torch defaults)."""
    net = UNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        channels=config.channels,
        strides=config.strides,  # type: ignore[arg-type]  # per-axis strides are supported
        num_res_units=config.num_res_units,
        norm=config.norm,
        dropout=config.dropout,
    )
    pool = tuple(int(k) for k in config.input_pool)
    if pool != (1, 1, 1):
        return ProbabilityNet(PooledNet(net, pool), config.activation)  # type: ignore[arg-type]
    return ProbabilityNet(net, config.activation)


def detector_config(**overrides: Any) -> NetworkConfig:
    base: dict[str, Any] = {"in_channels": 3, "out_channels": 1, "activation": "sigmoid"}
    return NetworkConfig(**{**base, **overrides})


def gland_config(**overrides: Any) -> NetworkConfig:
    base: dict[str, Any] = {"in_channels": 1, "out_channels": 3, "activation": "softmax"}
    return NetworkConfig(**{**base, **overrides})


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


#: picai_baseline's default U-Net (its `unet_hyperparam`, 3 channels, 2 classes): MONAI's UNet
#: with its defaults (no residual units, PReLU, instance norm), so the state dicts of its
#: published fold checkpoints load unchanged (tests/models/test_picai_parity.py proves it
#: against picai_baseline's own definition).
PICAI_UNET: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 3,
    "out_channels": 2,
    "channels": (32, 64, 128, 256, 512, 1024),
    "strides": ((2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2)),
}


def picai_unet() -> nn.Module:
    """The PI-CAI baseline U-Net: (N, 3, 20, 256, 256) t2w/adc/hbv -> (N, 2, ...) logits."""
    return UNet(**PICAI_UNET)
