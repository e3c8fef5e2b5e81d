"""Network descriptions: the pooled U-Net takes and returns the full model grid."""

from __future__ import annotations

import pytest
import torch

from models.networks import (
    NetworkConfig,
    PooledNet,
    build_network,
    coarse_target,
    detector_config,
    gland_config,
)


def test_input_pool_round_trips_and_scales_the_divisor() -> None:
    config = detector_config(
        channels=(4, 8, 16), strides=((1, 2, 2), (2, 2, 2)), input_pool=[1, 2, 2]
    )
    assert config.input_pool == (1, 2, 2)
    assert config.divisor_zyx() == (2, 8, 8)
    assert NetworkConfig.from_dict(config.as_dict()) == config
    # Metadata written before input_pool existed still loads, unpooled.
    old = {k: v for k, v in config.as_dict().items() if k != "input_pool"}
    assert NetworkConfig.from_dict(old).input_pool == (1, 1, 1)


def test_pooled_network_returns_the_input_grid() -> None:
    net = build_network(
        gland_config(channels=(4, 8), strides=((2, 2, 2),), input_pool=(1, 2, 2))
    ).eval()
    assert isinstance(net.net, PooledNet)
    with torch.no_grad():
        out = net(torch.randn(1, 1, 4, 32, 32))
    assert out.shape == (1, 3, 4, 32, 32)
    assert torch.allclose(out.sum(dim=1), torch.ones(1, 4, 32, 32), atol=1e-5)


def test_input_pool_is_validated() -> None:
    with pytest.raises(ValueError, match="input_pool"):
        detector_config(input_pool=(1, 0, 2))


def test_coarse_training_targets_keep_small_lesions() -> None:
    y = torch.zeros(1, 1, 2, 8, 8)
    y[0, 0, 1, 3, 5] = 1.0  # one voxel: survives max-pooling
    lesions = coarse_target(y, (1, 2, 2), binary=True)
    assert lesions.shape == (1, 1, 2, 4, 4) and float(lesions.sum()) == 1.0
    zones = torch.arange(64, dtype=torch.float32).reshape(1, 1, 1, 8, 8)
    assert coarse_target(zones, (1, 2, 2), binary=False)[0, 0, 0, 1, 1] == zones[0, 0, 0, 2, 2]
    net = build_network(
        detector_config(channels=(4, 8), strides=((2, 2, 2),), input_pool=(1, 2, 2))
    )
    assert net.input_pool == (1, 2, 2)
    assert net.coarse_logits(torch.randn(1, 3, 4, 16, 16)).shape == (1, 1, 4, 8, 8)
