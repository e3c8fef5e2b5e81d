"""`radtriage models import MODEL.onnx --pipeline FILE.toml`: an ONNX model from the field with
its declared pipeline (e.g. configs/models/taps.toml).

The TOML holds the metadata fields of the pipeline (task, output_channels, input_spec with its
grid and normalisation, inference, lesions, postprocessing, description, intended_use,
training_data); `clip = false` in a normalisation means no clipping. The ONNX file is checked
(valid graph, one 5-D input with a dynamic batch axis), optimised offline, parity-checked
against itself on a random window, and written with metadata (sha256) and a model card.
"""

from __future__ import annotations

import shutil
import tempfile
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import ValidationError

from core.errors import InputError, ModelSignatureError
from models.metadata import (
    METADATA_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    ModelMetadata,
    ParityCheck,
    TensorSpec,
    write_metadata,
)
from models.repository import ModelRepository, ModelVersion, parse_ref, sha256_bytes
from training.bundle_import import IMPORTED_DISCLAIMER
from training.export import optimise_offline

PIPELINE_KEYS = {
    "task",
    "description",
    "intended_use",
    "output_channels",
    "training_data",
    "input_spec",
    "inference",
    "lesions",
    "postprocessing",
    "thresholds",
}
PARITY_TOLERANCE = 1e-4


def read_pipeline(path: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: cannot read the pipeline TOML ({exc})") from exc
    unknown = sorted(set(doc) - PIPELINE_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown keys {unknown}; allowed: {sorted(PIPELINE_KEYS)}")
    for rule in doc.get("input_spec", {}).get("normalisation", []):
        if rule.get("clip") is False:
            rule["clip"] = None
    return doc


def _tensor(value: onnx.ValueInfoProto) -> TensorSpec:
    dims = value.type.tensor_type.shape.dim
    return TensorSpec(name=value.name, shape=tuple(d.dim_param or d.dim_value for d in dims))


def import_declared_onnx(
    onnx_path: Path,
    pipeline_path: Path,
    *,
    name: str,
    version: str,
    repository: Path | None = None,
    overwrite: bool = False,
) -> ModelVersion:
    parse_ref(f"{name}:{version}")
    repo = ModelRepository(repository)
    dest = repo.root / name / version
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} already exists; choose another --version")
    declared = read_pipeline(pipeline_path)
    source = onnx_path.read_bytes()
    try:
        graph = onnx.load_from_string(source)
        onnx.checker.check_model(graph)
    except Exception as exc:  # onnx raises its own types
        raise ModelSignatureError(f"{onnx_path} is not a valid ONNX model: {exc}") from exc
    inputs = [_tensor(v) for v in graph.graph.input]
    outputs = [_tensor(v) for v in graph.graph.output]
    if len(inputs) != 1 or len(inputs[0].shape) != 5 or isinstance(inputs[0].shape[0], int):
        raise ModelSignatureError(
            f"{onnx_path}: needs one (batch, C, ...) input with a dynamic batch axis, got "
            f"{[t.shape for t in inputs]}"
        )
    with tempfile.TemporaryDirectory(prefix="radtriage-import-") as tmp:
        raw, optimised = Path(tmp) / "raw.onnx", Path(tmp) / MODEL_FILE
        raw.write_bytes(source)
        optimise_offline(raw, optimised)
        data = optimised.read_bytes()
    window = [d if isinstance(d, int) else 1 for d in inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(window).astype(np.float32)
    feed = {inputs[0].name: x}
    want = ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    diff = float(np.max(np.abs(got - want)))
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
        raise ModelSignatureError(f"{onnx_path}: the optimised graph differs by {diff:.3g}")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        md = ModelMetadata(
            name=name,
            version=version,
            inputs=(inputs[0],),
            outputs=tuple(outputs[:1]),
            disclaimer=IMPORTED_DISCLAIMER,
            training={
                "import": {
                    "imported_from": "onnx with a declared pipeline",
                    "pipeline": pipeline_path.name,
                    "source_sha256": sha256_bytes(source),
                    "imported_at": now,
                }
            },
            network={"architecture": "onnx"},
            parity=ParityCheck(
                max_abs_diff=diff,
                tolerance=PARITY_TOLERANCE,
                inputs=1,
                reference="source ONNX (ORT, CPU)",
            ),
            opset=max(o.version for o in graph.opset_import),
            sha256=sha256_bytes(data),
            size_bytes=len(data),
            created=now,
            software={"onnx": onnx.__version__, "onnxruntime": ort.__version__},
            **declared,
        )
    except ValidationError as exc:
        raise InputError(f"{pipeline_path} does not declare a valid pipeline: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="radtriage-import-") as tmp:
        staging = Path(tmp) / "version"
        staging.mkdir()
        (staging / MODEL_FILE).write_bytes(data)
        write_metadata(staging / METADATA_FILE, md)
        card = [
            f"# {name}:{version}",
            "",
            md.description,
            "",
            f"- {IMPORTED_DISCLAIMER}",
            f"- source sha256 {md.training['import']['source_sha256']}",
            f"- pipeline declared in {pipeline_path.name} (see metadata.json)",
            "",
        ]
        (staging / MODEL_CARD_FILE).write_text("\n".join(card), encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, dest)
    return repo.verify(f"{name}:{version}")
