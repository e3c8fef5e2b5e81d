"""The CUDA path of ONNX Runtime.

The CPU-side checks run everywhere. The `gpu` test runs where onnxruntime-gpu sees a CUDA device
(`make install GPU=1` on a GPU host); elsewhere it skips and says so.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from core.errors import ModelError
from models.onnx_runner import OnnxModel, select_providers

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_auto_falls_back_to_cpu_and_cpu_is_explicit() -> None:
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    providers = select_providers("auto")
    assert providers[-1] == "CPUExecutionProvider"
    assert (providers[0] == "CUDAExecutionProvider") == HAS_CUDA


@pytest.mark.skipif(HAS_CUDA, reason="this ONNX Runtime has CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="onnxruntime-gpu"):
        select_providers("cuda")
    with pytest.raises(ModelError, match="unknown device"):
        select_providers("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDAExecutionProvider (CPU-only onnxruntime)")
def test_bundled_detector_on_cuda_matches_cpu() -> None:
    cuda = OnnxModel.load(None, "cspca_detector", device="cuda")
    cpu = OnnxModel.load(None, "cspca_detector", device="cpu")
    assert cuda.providers[0] == "CUDAExecutionProvider"
    spec = cpu.metadata.input_spec
    shape = (2, len(spec.channels), *spec.shape_zyx)
    batch = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(cuda.run(batch), cpu.run(batch), atol=1e-3)
