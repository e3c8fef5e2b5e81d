"""Network descriptions: the pooled U-Net takes and returns the full model grid."""

from __future__ import annotations

import pytest
import torch

from models.networks import NetworkConfig, PooledNet, build_network, detector_config, gland_config


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
