"""ONNX Runtime session for one verified model version.

`OnnxModel.load` resolves the reference, checks model.onnx against the sha256 in metadata.json,
hands ONNX Runtime exactly the bytes it checked, and compares the graph's inputs and outputs
with the metadata (names, ranks, fixed dimensions, dtypes) before anything runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.domain import ModelRef
from core.errors import InferenceError, ModelError, ModelSignatureError
from models.metadata import ModelMetadata, TensorSpec
from models.repository import ModelRepository

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": "float32"}


def select_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for "auto" | "cpu" | "cuda"."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ModelError(
                "device 'cuda' requested but this ONNX Runtime has no CUDAExecutionProvider "
                f"(available: {available}); install onnxruntime-gpu or use device 'cpu'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda")
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _check_tensors(
    kind: str, actual: list[ort.NodeArg], expected: tuple[TensorSpec, ...], where: str
) -> None:
    if [a.name for a in actual] != [e.name for e in expected]:
        raise ModelSignatureError(
            f"{where}: ONNX {kind} are {[a.name for a in actual]}, metadata.json says "
            f"{[e.name for e in expected]}; the model and its metadata do not belong together"
        )
    for a, e in zip(actual, expected, strict=True):
        dtype = _ORT_DTYPES.get(a.type, a.type)
        if dtype != e.dtype:
            raise ModelSignatureError(
                f"{where}: ONNX {kind[:-1]} {a.name!r} has type {a.type}, metadata says {e.dtype}"
            )
        shape = list(a.shape)
        same_rank = len(shape) == len(e.shape)
        fixed_ok = same_rank and all(
            not isinstance(want, int) or got == want
            for got, want in zip(shape, e.shape, strict=True)
        )
        if not fixed_ok:
            raise ModelSignatureError(
                f"{where}: ONNX {kind[:-1]} {a.name!r} has shape {shape}, metadata says "
                f"{list(e.shape)}"
            )


class OnnxModel:
    """A loaded, verified model: `run` maps an (N, C, Z, Y, X) batch to its output batch."""

    def __init__(
        self,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        path: Path,
        members: list[ort.InferenceSession] | None = None,
    ) -> None:
        self.session = session
        self.members = members or [session]
        self.metadata = metadata
        self.path = path
        self.ref: ModelRef = metadata.model_ref()
        self.providers: list[str] = list(session.get_providers())
        self._input = metadata.inputs[0]
        self._output_names = [o.name for o in metadata.outputs]

    @classmethod
    def load(
        cls,
        repository: Path | None,
        ref: str,
        *,
        device: str = "auto",
        threads: int | None = None,
    ) -> OnnxModel:
        """Resolve `ref` ("NAME" or "NAME:VERSION") in `repository` (None = bundled), verify it
        and open an ONNX Runtime session. Raises ModelNotFoundError, ModelIntegrityError,
        ModelSignatureError or ModelError."""
        version = ModelRepository(repository).resolve(ref)
        data = version.read_verified()
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # Exported files are already optimised offline (basic level, portable); extended
        # optimisations here are provider-specific and happen at session creation.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(data, options, providers=select_providers(device))
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise ModelError(f"ONNX Runtime cannot load {version.onnx_path}: {exc}") from exc
        where = str(version.onnx_path)
        _check_tensors("inputs", session.get_inputs(), version.metadata.inputs, where)
        _check_tensors("outputs", session.get_outputs(), version.metadata.outputs, where)
        members = [session]
        for member in version.metadata.inference.members:
            if member.file == version.onnx_path.name:
                continue  # model.onnx: the first member, checked above
            member_data = version.read_verified_member(member.file, member.sha256)
            try:
                extra = ort.InferenceSession(
                    member_data, options, providers=select_providers(device)
                )
            except Exception as exc:  # onnxruntime's own exception types
                raise ModelError(f"ONNX Runtime cannot load {member.file}: {exc}") from exc
            _check_tensors("inputs", extra.get_inputs(), version.metadata.inputs, member.file)
            _check_tensors("outputs", extra.get_outputs(), version.metadata.outputs, member.file)
            members.append(extra)
        log.info(
            "loaded %s:%s from %s on %s",
            version.metadata.name,
            version.metadata.version,
            where,
            session.get_providers(),
        )
        return cls(session, version.metadata, version.onnx_path, members)

    def member_runs(self) -> list[Callable[[np.ndarray], np.ndarray]]:
        """One `run` per ensemble member (a single-network model has one)."""
        return [partial(self.run, member=i) for i in range(len(self.members))]

    def run(self, batch: np.ndarray, member: int = 0) -> np.ndarray:
        """(N, C, Z, Y, X) float32 -> the first output, (N, C_out, Z, Y, X) float32."""
        expected = tuple(self._input.shape[1:])
        fixed = all(
            not isinstance(want, int) or got == want
            for got, want in zip(batch.shape[1:], expected, strict=False)
        )
        if batch.ndim != 5 or not fixed:
            raise InferenceError(
                f"{self.ref.name}:{self.ref.version} expects batches of shape (N, "
                f"{', '.join(map(str, expected))}), got {tuple(batch.shape)}"
            )
        x = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            (out,) = self.members[member].run(self._output_names[:1], {self._input.name: x})
        except Exception as exc:  # onnxruntime's own exception types
            raise InferenceError(
                f"ONNX Runtime failed running {self.ref.name}:{self.ref.version}: {exc}"
            ) from exc
        return np.asarray(out, dtype=np.float32)
