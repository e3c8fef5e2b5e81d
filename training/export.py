"""torch -> ONNX export into the model repository, with graph optimisation and a parity check.

Steps: TorchScript-based exporter (opset 17, dynamic batch axis; MONAI's U-Net exports cleanly and
the result needs no onnxscript functions at load), `onnx.checker`, ONNX Runtime *offline*
optimisation at the basic level (constant folding, redundant-node removal: portable across CPU and
CUDA providers, unlike the extended level), then the parity check: the optimised graph vs eager
PyTorch on real prepared inputs, batched (exercises the dynamic axis). Max abs difference goes into
metadata; above the tolerance the export fails and nothing is written to the repository.

Next to the ONNX file goes `weights.pt`, the exported network's state dict (what
`radtriage train --init-from NAME:VERSION` fine-tunes from), its sha256 and size in metadata's
``training.weights``. Serving never reads it; `load_weights` checks it and loads it with
``torch.load(..., weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import io
import platform
import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from core.errors import ModelError, ModelIntegrityError
from models.metadata import (
    METADATA_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    NOT_FOR_CLINICAL_USE,
    InputSpec,
    ModelMetadata,
    ParityCheck,
    PostprocessingSpec,
    TensorSpec,
    ThresholdSpec,
    write_metadata,
)
from models.networks import NetworkConfig, ProbabilityNet
from models.repository import ModelRepository, ModelVersion, sha256_bytes

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-3
WEIGHTS_FILE = "weights.pt"  # the torch state dict, for `radtriage train --init-from`


class ParityError(ModelError):
    """The exported graph disagrees with PyTorch beyond the tolerance."""

    reason_code = "export_parity"


def _export_raw(net: ProbabilityNet, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        # InstanceNorm always normalises with the input's statistics: "train=True" is expected.
        warnings.filterwarnings("ignore", message=".*instance_norm.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def optimise_offline(source: Path, target: Path) -> None:
    """ONNX Runtime offline graph optimisation (basic level: provider-independent)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def parity_check(
    net: ProbabilityNet, onnx_bytes: bytes, inputs: np.ndarray, tolerance: float
) -> ParityCheck:
    """Max abs difference between ONNX Runtime (CPU) and eager torch on `inputs` (N,C,Z,Y,X)."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    diff = float(np.max(np.abs(got - want)))
    if not np.isfinite(diff) or diff > tolerance:
        raise ParityError(
            f"ONNX export differs from PyTorch by {diff:.3g} (tolerance {tolerance:g}) on "
            f"{len(x)} real inputs: the export is wrong; not writing it to the repository"
        )
    return ParityCheck(max_abs_diff=diff, tolerance=tolerance, inputs=len(x))


def model_card(md: ModelMetadata) -> str:
    """A short markdown model card written next to the model."""
    t = md.thresholds
    lines = [
        f"# {md.name} {md.version}",
        "",
        f"**{md.disclaimer}**" if md.disclaimer else "",
        "",
        f"Task: {md.task}. {md.description}",
        "",
        "## Intended use",
        md.intended_use or "Not stated.",
        "",
        "## Inputs",
        f"- channels: {', '.join(md.input_spec.channels)}",
        f"- grid: {list(md.input_spec.shape_zyx)} voxels (z, y, x) at "
        f"{list(md.input_spec.spacing_xyz)} mm (x, y, z), centred on the T2W field of view",
        "- normalisation: "
        + "; ".join(f"{n.channel} {n.method} clip {n.clip}" for n in md.input_spec.normalisation),
        "",
        "## Outputs",
        f"- {OUTPUT_NAME}: {', '.join(md.output_channels)}",
        "",
        "## Training data",
        *(f"- {k}: {v}" for k, v in md.training_data.items()),
        *_parent_lines(md.training.get("init_from")),
        "",
        "## Metrics",
        *(f"- {k}: {v}" for k, v in md.metrics.items()),
        "",
        "## Operating thresholds",
        f"- urgent >= {t.urgent}, soon >= {t.soon} (source: {t.source})" if t else "- none",
        "",
        "## Limitations",
        "- Trained on synthetic phantoms only; real MRI differs in anatomy, noise and artefacts."
        if md.training_data.get("synthetic", True)
        else "- Labels come from AI lesions radiologists accepted on biopsy-positive studies: "
        "missed lesions stay unlabelled.",
        "- Never a PI-RADS score: lesion categories are the AI's own (ai_high/intermediate/low).",
        "",
        f"ONNX opset {md.opset}; parity vs PyTorch max abs diff {md.parity.max_abs_diff:.2e}."
        if md.parity
        else "",
        f"sha256 of {MODEL_FILE}: `{md.sha256}`",
        "",
    ]
    return "\n".join(lines)


def _parent_lines(parent: Any) -> list[str]:
    if not isinstance(parent, dict):
        return []
    weights = parent.get("weights_sha256")
    return [f"- fine-tuned from: {parent.get('ref')} (weights sha256 {weights})"]


def export_model(
    net: ProbabilityNet,
    *,
    repository: Path,
    name: str,
    version: str,
    task: str,
    network: NetworkConfig,
    input_spec: InputSpec,
    output_channels: tuple[str, ...],
    parity_inputs: np.ndarray,
    thresholds: ThresholdSpec | None = None,
    postprocessing: PostprocessingSpec | None = None,
    description: str = "",
    intended_use: str = "",
    training_data: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    clinical_use: bool = False,
    opset: int = DEFAULT_OPSET,
    tolerance: float = PARITY_TOLERANCE,
    overwrite: bool = False,
) -> ModelVersion:
    """Export `net` to `<repository>/<name>/<version>/` and return the verified version."""
    if opset < 17:
        raise ModelError(f"opset {opset} is too old; use 17 or newer")
    if parity_inputs.ndim != 5 or len(parity_inputs) < 1:
        raise ModelError("parity_inputs must be a non-empty (N, C, Z, Y, X) batch of real cases")
    target = Path(repository) / name / version
    if target.exists() and not overwrite:
        raise ModelError(f"{target} already exists; choose a new version or pass overwrite")
    net = net.eval().cpu()
    example = torch.from_numpy(np.ascontiguousarray(parity_inputs[:1], dtype=np.float32))
    with tempfile.TemporaryDirectory(prefix="radtriage-export-") as tmp:
        raw, optimised = Path(tmp) / "raw.onnx", Path(tmp) / MODEL_FILE
        _export_raw(net, example, raw, opset)
        onnx.checker.check_model(str(raw), full_check=True)
        optimise_offline(raw, optimised)
        data = optimised.read_bytes()
        parity = parity_check(net, data, parity_inputs, tolerance)
        weights = state_dict_bytes(net)
        shape = ("batch", len(input_spec.channels), *input_spec.shape_zyx)
        out_shape = ("batch", len(output_channels), *input_spec.shape_zyx)
        md = ModelMetadata(
            name=name,
            version=version,
            task=task,  # type: ignore[arg-type]
            description=description,
            inputs=(TensorSpec(name=INPUT_NAME, shape=shape),),
            outputs=(TensorSpec(name=OUTPUT_NAME, shape=out_shape),),
            input_spec=input_spec,
            output_channels=output_channels,
            postprocessing=postprocessing or PostprocessingSpec(),
            thresholds=thresholds,
            clinical_use=clinical_use,
            intended_use=intended_use,
            disclaimer=None if clinical_use else NOT_FOR_CLINICAL_USE,
            training_data=training_data or {},
            training={
                **(training or {}),
                "weights": {
                    "file": WEIGHTS_FILE,
                    "sha256": sha256_bytes(weights),
                    "size_bytes": len(weights),
                },
            },
            metrics=metrics or {},
            network=network.as_dict(),
            parity=parity,
            opset=opset,
            sha256=sha256_bytes(data),
            size_bytes=len(data),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            software={
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
            },
        )
        staging = Path(tmp) / "version"
        staging.mkdir()
        shutil.copyfile(optimised, staging / MODEL_FILE)
        (staging / WEIGHTS_FILE).write_bytes(weights)
        write_metadata(staging / METADATA_FILE, md)
        (staging / MODEL_CARD_FILE).write_text(model_card(md), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, target)
    return ModelRepository(repository).verify(f"{name}:{version}")


def state_dict_bytes(net: torch.nn.Module) -> bytes:
    """`net`'s state dict as `torch.save` writes it (tensors only, CPU, contiguous)."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_weights(version: ModelVersion) -> dict[str, torch.Tensor]:
    """The state dict a version was exported with, checked against metadata's
    ``training.weights`` sha256 and read with ``weights_only=True``.

    Raises `ModelError` when the version has no weights file listed (exported before weights
    were kept, or imported from a bundle/ONNX file) and `ModelIntegrityError` when the file is
    missing or differs from its sha256."""
    md = version.metadata
    listed = md.training.get("weights") if isinstance(md.training, dict) else None
    ref = f"{md.name}:{md.version}"
    if not isinstance(listed, dict) or listed.get("file") != WEIGHTS_FILE:
        raise ModelError(
            f"{ref} has no torch weights ({WEIGHTS_FILE} is not listed in its metadata: it was "
            "exported before weights were kept, or imported as ONNX/bundle); only a version "
            "exported by radtriage train can be fine-tuned"
        )
    path = version.path / WEIGHTS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelIntegrityError(f"{path} is missing; metadata lists it for {ref}") from exc
    if sha256_bytes(data) != listed.get("sha256"):
        raise ModelIntegrityError(
            f"{path} has sha256 {sha256_bytes(data)}, but metadata.json expects "
            f"{listed.get('sha256')}: refusing to fine-tune from it"
        )
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelIntegrityError(f"{path} is not a state dict of tensors")
    return state
