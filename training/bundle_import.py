"""`radtriage models import`: bring a model trained elsewhere into the model repository.

Sources:
- a MONAI bundle folder: `configs/metadata.json` (MONAI's `network_data_format`), a checkpoint
  `models/model.ts` (TorchScript) or `models/model.pt` (state dict, read with
  `torch.load(weights_only=True)` into the `network_def` of `configs/inference.json`);
- an ONNX file plus a metadata JSON of the same shape as a bundle's `configs/metadata.json`.

The model must fit a model already in the repository (`like`, default the promoted detector):
its channels (order and names), grid (shape; spacing when the bundle states one) and task. What
does not fit is refused with the reason, before anything is written. The model is then exported
to ONNX (opset 17, dynamic batch), optimised, parity-checked against its source on prepared
inputs, and written with metadata (sha256), a model card and the import provenance.

Bundle extensions, all optional, under `"radtriage"` in the metadata JSON: `name`, `version`,
`activation` (sigmoid|softmax|none), `output_channel` (softmax channel of csPCa, default 1),
`axis_order` (`xyz`, MONAI's LoadImage order, the default; or `zyx`), `spacing_xyz`,
`thresholds` ({urgent, soon}; default: --like's, marked provisional),
`description`, `intended_use`, `clinical_use`, `training_data`. Nothing is evaluated: `$`
expressions are refused and `network_def` may only name a MONAI network with literal arguments.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from core.errors import InputError, ModelSignatureError
from models.metadata import (
    METADATA_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    ModelMetadata,
    TensorSpec,
    ThresholdSpec,
    write_metadata,
)
from models.repository import ModelRepository, ModelVersion, parse_ref, sha256_bytes, sha256_file
from training.export import (
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAME,
    PARITY_TOLERANCE,
    model_card,
    optimise_offline,
    parity_check,
)

IMPORTED_DISCLAIMER = (
    "NOT FOR CLINICAL USE: imported model, not validated by radtriage evaluate on local data."
)
_SYNTHETIC_LIMITATION = (
    "- Trained on synthetic phantoms only; real MRI differs in anatomy, noise and artefacts."
)
_IMPORTED_LIMITATION = (
    "- Trained elsewhere (see Imported, Training data): validate on local data before use."
)
ALLOWED_NETWORKS = ("UNet", "BasicUNet", "DynUNet", "SegResNet", "AttentionUnet", "UNETR")
_CHANNEL_NAMES = {
    "t2w": "t2w",
    "t2": "t2w",
    "t2-weighted": "t2w",
    "adc": "adc",
    "hbv": "hbv",
    "dwi": "hbv",
    "highb": "hbv",
    "high-b": "hbv",
    "hbv-dwi": "hbv",
}


@dataclass(frozen=True)
class BundleSpec:
    """What a bundle's metadata says about its inputs and outputs."""

    metadata: dict[str, Any]
    extension: dict[str, Any]
    num_channels: int
    channels: tuple[str, ...] | None
    spatial_shape: tuple[Any, ...] | None
    out_channels: int | None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError(f"{path} must hold a JSON object")
    return doc


def _channel_name(raw: Any) -> str:
    key = str(raw).strip().lower().replace(" ", "")
    if key not in _CHANNEL_NAMES:
        raise ModelSignatureError(
            f"input channel {raw!r} is not one radtriage provides (t2w, adc, hbv)"
        )
    return _CHANNEL_NAMES[key]


def read_bundle_spec(metadata_path: Path) -> BundleSpec:
    """The `network_data_format` of a MONAI bundle metadata.json, with radtriage extensions."""
    md = _read_json(metadata_path)
    fmt = md.get("network_data_format")
    if not isinstance(fmt, dict):
        raise InputError(f"{metadata_path}: no network_data_format (MONAI bundle metadata)")
    inputs, outputs = fmt.get("inputs") or {}, fmt.get("outputs") or {}
    if len(inputs) != 1:
        raise ModelSignatureError(
            f"{metadata_path}: the model takes {len(inputs)} inputs {sorted(inputs)}; radtriage "
            "feeds one multi-channel image"
        )
    image = next(iter(inputs.values()))
    try:
        num_channels = int(image["num_channels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{metadata_path}: inputs need an integer num_channels") from exc
    channel_def = image.get("channel_def")
    channels = None
    if isinstance(channel_def, dict) and channel_def:
        if not all(str(k).isdigit() for k in channel_def):
            raise InputError(f"{metadata_path}: channel_def keys must be channel indices")
        ordered = [channel_def[k] for k in sorted(channel_def, key=lambda k: int(k))]
        channels = tuple(_channel_name(c) for c in ordered)
    shape = image.get("spatial_shape")
    out: dict[str, Any] = next(iter(outputs.values()), {}) if outputs else {}
    out_channels = out.get("num_channels")
    ext = md.get("radtriage") or {}
    if not isinstance(ext, dict):
        raise InputError(f"{metadata_path}: 'radtriage' must be an object")
    return BundleSpec(
        metadata=md,
        extension=ext,
        num_channels=num_channels,
        channels=channels,
        spatial_shape=tuple(shape) if isinstance(shape, list) else None,
        out_channels=int(out_channels) if out_channels is not None else None,
    )


def _check_fit(spec: BundleSpec, target: ModelMetadata, where: str) -> str:
    """Refuse a bundle whose inputs do not fit `target`'s grid; returns the axis order."""
    ts = target.input_spec
    want = ts.channels
    if spec.num_channels != len(want):
        raise ModelSignatureError(
            f"{where}: the model takes {spec.num_channels} input channel(s); "
            f"{target.name}:{target.version} is fed {len(want)} ({', '.join(want)})"
        )
    if spec.channels is not None and spec.channels != want:
        raise ModelSignatureError(
            f"{where}: channel_def orders the inputs {list(spec.channels)}; radtriage feeds "
            f"{list(want)} (retrain or re-order the channels)"
        )
    order = str(spec.extension.get("axis_order", "xyz"))
    if order not in ("xyz", "zyx"):
        raise InputError(f"{where}: radtriage.axis_order must be 'xyz' or 'zyx', not {order!r}")
    grid = ts.shape_zyx if order == "zyx" else tuple(reversed(ts.shape_zyx))
    if spec.spatial_shape is not None:
        if len(spec.spatial_shape) != 3:
            raise ModelSignatureError(f"{where}: spatial_shape must have 3 axes")
        for axis, (got, need) in enumerate(zip(spec.spatial_shape, grid, strict=True)):
            if isinstance(got, int) and got != need:
                raise ModelSignatureError(
                    f"{where}: spatial_shape {list(spec.spatial_shape)} ({order}) does not match "
                    f"the model grid {list(grid)} ({order}) of {target.name}:{target.version} "
                    f"(axis {axis}); retrain on the grid or import next to a model on yours"
                )
    spacing = spec.extension.get("spacing_xyz")
    if spacing is not None and tuple(float(v) for v in spacing) != ts.spacing_xyz:
        raise ModelSignatureError(
            f"{where}: spacing {list(spacing)} mm differs from the grid's {list(ts.spacing_xyz)} mm"
        )
    return order


def _literal(value: Any, config: dict[str, Any], where: str) -> Any:
    if isinstance(value, str) and value[:1] in ("$", "%"):
        raise InputError(f"{where}: {value!r} is an expression; radtriage never evaluates them")
    if isinstance(value, str) and value.startswith("@"):
        ref = config.get(value[1:])
        if ref is None or (isinstance(ref, str) and ref[:1] in ("$", "@", "%")):
            raise InputError(f"{where}: {value!r} must refer to a literal top-level value")
        return ref
    if isinstance(value, list):
        return [_literal(v, config, where) for v in value]
    if isinstance(value, dict):
        return {k: _literal(v, config, where) for k, v in value.items()}
    return value


def build_network_def(config: dict[str, Any], where: str) -> tuple[nn.Module, dict[str, Any]]:
    """The MONAI network named by `network_def` (literal arguments only)."""
    import monai.networks.nets as nets

    definition = config.get("network_def")
    if not isinstance(definition, dict) or "_target_" not in definition:
        raise InputError(f"{where}: needs a network_def with a _target_ (a MONAI network)")
    target = str(definition["_target_"]).removeprefix("monai.networks.nets.")
    if target not in ALLOWED_NETWORKS:
        raise InputError(
            f"{where}: network {definition['_target_']!r} is not one of {ALLOWED_NETWORKS}; "
            "save the model as TorchScript (models/model.ts) instead"
        )
    args = {k: _literal(v, config, where) for k, v in definition.items() if not k.startswith("_")}
    try:
        return getattr(nets, target)(**args), {
            "architecture": f"monai.networks.nets.{target}",
            **args,
        }
    except TypeError as exc:
        raise InputError(f"{where}: cannot build {target} from {args}: {exc}") from exc


class ImportedNet(nn.Module):
    """The bundle's network seen as radtriage serves it: (N, C, Z, Y, X) in, one probability
    channel out (axis order and activation handled here, so they are in the ONNX graph)."""

    def __init__(self, net: nn.Module, activation: str, output_channel: int, order: str) -> None:
        super().__init__()
        self.net = net
        self.activation = activation
        self.output_channel = output_channel
        self.xyz = order == "xyz"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.xyz:
            x = x.permute(0, 1, 4, 3, 2)
        y = self.net(x)
        if self.activation == "sigmoid":
            y = torch.sigmoid(y)
        elif self.activation == "softmax":
            y = torch.softmax(y, dim=1)[:, self.output_channel : self.output_channel + 1]
        if self.xyz:
            y = y.permute(0, 1, 4, 3, 2)
        return y


def _load_checkpoint(bundle: Path, where: str) -> tuple[nn.Module, dict[str, Any], Path]:
    ts, pt = bundle / "models" / "model.ts", bundle / "models" / "model.pt"
    if ts.is_file():
        module = torch.jit.load(str(ts), map_location="cpu")
        return module, {"architecture": "torchscript"}, ts
    if not pt.is_file():
        raise InputError(f"{where}: no models/model.ts (TorchScript) or models/model.pt")
    config_path = bundle / "configs" / "inference.json"
    net, network = build_network_def(_read_json(config_path), str(config_path))
    try:
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with code, corrupt file: refuse, never fall back
        raise InputError(f"{pt}: not a weights-only state dict ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{pt}: expected a state dict, got {type(state).__name__}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelSignatureError(
            f"{pt} does not fit network_def in {config_path}: {str(exc).splitlines()[0]}"
        ) from exc
    return net, network, pt


def _activation(spec: BundleSpec, out_channels: int, where: str) -> tuple[str, int]:
    default = "sigmoid" if out_channels == 1 else "softmax"
    activation = str(spec.extension.get("activation", default))
    channel = int(spec.extension.get("output_channel", 1))
    if activation not in ("sigmoid", "softmax", "none"):
        raise InputError(f"{where}: radtriage.activation must be sigmoid, softmax or none")
    if activation == "softmax" and not 0 <= channel < out_channels:
        raise ModelSignatureError(
            f"{where}: output_channel {channel} is outside the {out_channels} output channels"
        )
    if activation != "softmax" and out_channels != 1:
        raise ModelSignatureError(
            f"{where}: {out_channels} output channels need activation softmax and an "
            "output_channel naming csPCa"
        )
    return activation, channel


def parity_inputs(target: ModelMetadata, n: int = 2, seed: int = 0) -> np.ndarray:
    """Prepared phantom cases on the target grid (real-looking intensities, not noise)."""
    from training.datasets import phantom_case

    cases = [phantom_case(100_000 + seed + i, target.input_spec) for i in range(n)]
    return np.stack([c.image for c in cases]).astype(np.float32)


def _check_runs(model: nn.Module, x: np.ndarray, where: str) -> None:
    with torch.no_grad():
        try:
            y = model(torch.from_numpy(x[:1]))
        except Exception as exc:
            raise ModelSignatureError(
                f"{where}: the network fails on the model grid {list(x.shape[1:])}: {exc}"
            ) from exc
    want = (1, 1, *x.shape[2:])
    if tuple(y.shape) != want:
        raise ModelSignatureError(
            f"{where}: output shape {tuple(y.shape)} on the grid, radtriage needs {want}"
        )


def _target_model(repository: ModelRepository, like: str) -> ModelMetadata:
    md = repository.resolve(like).metadata
    if md.task != "cspca_detection":
        raise InputError(f"--like {like} is a {md.task} model; import detectors next to one")
    return md


def import_bundle(
    bundle: Path,
    *,
    repository: Path | None = None,
    like: str = "cspca_detector",
    name: str | None = None,
    version: str | None = None,
    overwrite: bool = False,
    tolerance: float = PARITY_TOLERANCE,
) -> ModelVersion:
    """Import a MONAI bundle folder as a csPCa detector version; see the module docstring."""
    repo = ModelRepository(repository)
    meta_path = bundle / "configs" / "metadata.json"
    spec = read_bundle_spec(meta_path)
    target = _target_model(repo, like)
    order = _check_fit(spec, target, str(bundle))
    net, network, checkpoint = _load_checkpoint(bundle, str(bundle))
    x = parity_inputs(target)
    out_channels = spec.out_channels
    if out_channels is None:  # not declared: ask the network
        with torch.no_grad():
            probe = torch.from_numpy(x[:1])
            probe = probe.permute(0, 1, 4, 3, 2) if order == "xyz" else probe
            out_channels = int(net.eval()(probe).shape[1])
    activation, channel = _activation(spec, out_channels, str(meta_path))
    model: nn.Module = ImportedNet(net.eval(), activation, channel, order).eval()
    if isinstance(net, torch.jit.ScriptModule):  # a traced wrapper cannot call a script module
        model = torch.jit.script(model)
    _check_runs(model, x, str(bundle))
    provenance = {
        "imported_from": "monai_bundle",
        "bundle_name": str(spec.metadata.get("name", "")),
        "bundle_version": str(spec.metadata.get("version", "")),
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "axis_order": order,
        "activation": activation,
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    onnx_bytes = _export(model, x)
    parity = parity_check(model, onnx_bytes, x, tolerance)  # type: ignore[arg-type]
    return _write(
        repo,
        onnx_bytes,
        target,
        spec,
        name=name or str(spec.extension.get("name") or target.name),
        version=version or str(spec.extension.get("version") or spec.metadata.get("version", "")),
        network=network,
        provenance=provenance,
        parity=parity,
        overwrite=overwrite,
    )


def _export(model: nn.Module, x: np.ndarray) -> bytes:
    with tempfile.TemporaryDirectory(prefix="radtriage-import-") as tmp:
        raw, optimised = Path(tmp) / "raw.onnx", Path(tmp) / MODEL_FILE
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                model,
                (torch.from_numpy(x[:1]),),
                str(raw),
                dynamo=False,
                opset_version=DEFAULT_OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        onnx.checker.check_model(str(raw), full_check=True)
        optimise_offline(raw, optimised)
        return optimised.read_bytes()


class _OnnxReference(nn.Module):
    """The source ONNX file run by ONNX Runtime, as the parity check's reference."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.session.get_inputs()[0].name: x.numpy()}
        (y,) = self.session.run([self.session.get_outputs()[0].name], feed)
        return torch.from_numpy(np.asarray(y))


def import_onnx(
    onnx_path: Path,
    metadata_path: Path,
    *,
    repository: Path | None = None,
    like: str = "cspca_detector",
    name: str | None = None,
    version: str | None = None,
    overwrite: bool = False,
    tolerance: float = PARITY_TOLERANCE,
) -> ModelVersion:
    """Import an ONNX detector: (N, C, Z, Y, X) in, one probability channel out, described by
    a bundle-style metadata JSON. It is checked, optimised and parity-checked against itself."""
    repo = ModelRepository(repository)
    spec = read_bundle_spec(metadata_path)
    target = _target_model(repo, like)
    if spec.extension.get("axis_order", "zyx") != "zyx":
        raise ModelSignatureError(
            f"{onnx_path}: ONNX models must take (N, C, Z, Y, X); re-export with that order"
        )
    zyx = replace(spec, extension={**spec.extension, "axis_order": "zyx"})
    _check_fit(zyx, target, str(onnx_path))
    source = onnx_path.read_bytes()
    try:
        graph = onnx.load_from_string(source)
        onnx.checker.check_model(graph, full_check=True)
    except Exception as exc:
        raise ModelSignatureError(f"{onnx_path} is not a valid ONNX model: {exc}") from exc
    if len(graph.graph.input) != 1 or len(graph.graph.output) < 1:
        raise ModelSignatureError(
            f"{onnx_path}: needs exactly one input (got {len(graph.graph.input)})"
        )
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 5 or not dims[0].dim_param:
        raise ModelSignatureError(
            f"{onnx_path}: the input must be (batch, C, Z, Y, X) with a dynamic batch axis "
            "(torch.onnx.export dynamic_axes={input: {0: 'batch'}}); serving batches studies"
        )
    reference = _OnnxReference(source)
    x = parity_inputs(target)
    _check_runs(reference, x, str(onnx_path))
    in_name = graph.graph.input[0].name
    out_name = graph.graph.output[0].name
    with tempfile.TemporaryDirectory(prefix="radtriage-import-") as tmp:
        raw, optimised = Path(tmp) / "raw.onnx", Path(tmp) / MODEL_FILE
        raw.write_bytes(source)
        optimise_offline(raw, optimised)
        data = optimised.read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([out_name], {in_name: x})[0]
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    diff = float(np.max(np.abs(got - want)))
    if not np.isfinite(diff) or diff > tolerance:
        raise ModelSignatureError(f"{onnx_path}: optimised graph differs by {diff:.3g}")
    from models.metadata import ParityCheck

    parity = ParityCheck(
        max_abs_diff=diff, tolerance=tolerance, inputs=len(x), reference="source ONNX (ORT, CPU)"
    )
    provenance = {
        "imported_from": "onnx",
        "source_sha256": sha256_bytes(source),
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return _write(
        repo,
        data,
        target,
        spec,
        name=name or str(spec.extension.get("name") or target.name),
        version=version or str(spec.extension.get("version") or spec.metadata.get("version", "")),
        network={"architecture": "onnx"},
        provenance=provenance,
        parity=parity,
        overwrite=overwrite,
        io_names=(in_name, out_name),
    )


def _write(
    repo: ModelRepository,
    data: bytes,
    target: ModelMetadata,
    spec: BundleSpec,
    *,
    name: str,
    version: str,
    network: dict[str, Any],
    provenance: dict[str, Any],
    parity: Any,
    overwrite: bool,
    io_names: tuple[str, str] = (INPUT_NAME, OUTPUT_NAME),
) -> ModelVersion:
    parse_ref(f"{name}:{version}")  # refuses names that are not safe folder names
    if not version:
        raise InputError("the bundle states no version; pass --version")
    dest = repo.root / name / version
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} already exists; choose another --version")
    ext = spec.extension
    clinical = bool(ext.get("clinical_use", False))
    grid = target.input_spec
    md = ModelMetadata(
        name=name,
        version=version,
        task="cspca_detection",
        description=str(ext.get("description") or spec.metadata.get("description", "")),
        inputs=(
            TensorSpec(name=io_names[0], shape=("batch", len(grid.channels), *grid.shape_zyx)),
        ),
        outputs=(TensorSpec(name=io_names[1], shape=("batch", 1, *grid.shape_zyx)),),
        input_spec=grid,
        output_channels=("csPCa likelihood",),
        postprocessing=target.postprocessing,
        thresholds=_thresholds(ext, target),
        clinical_use=clinical,
        intended_use=str(ext.get("intended_use", "")),
        disclaimer=None if clinical else IMPORTED_DISCLAIMER,
        training_data=dict(ext.get("training_data") or {"source": "stated by the bundle"}),
        training={"import": provenance},
        network=network,
        parity=parity,
        opset=DEFAULT_OPSET,
        sha256=sha256_bytes(data),
        size_bytes=len(data),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        software={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
    )
    with tempfile.TemporaryDirectory(prefix="radtriage-import-") as tmp:
        staging = Path(tmp) / "version"
        staging.mkdir()
        (staging / MODEL_FILE).write_bytes(data)
        write_metadata(staging / METADATA_FILE, md)
        card = model_card(md).replace(_SYNTHETIC_LIMITATION, _IMPORTED_LIMITATION)
        card += _provenance_card(provenance, target)
        (staging / MODEL_CARD_FILE).write_text(card, encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, dest)
    return repo.verify(f"{name}:{version}")


def _thresholds(ext: dict[str, Any], target: ModelMetadata) -> ThresholdSpec | None:
    """The bundle's stated thresholds, else --like's marked provisional (serving needs some;
    `radtriage evaluate --write-thresholds` replaces them with ones chosen on local data)."""
    stated = ext.get("thresholds")
    if isinstance(stated, dict):
        return ThresholdSpec(
            urgent=float(stated["urgent"]),
            soon=float(stated["soon"]),
            source=str(stated.get("source", "stated by the imported bundle")),
        )
    if target.thresholds is None:
        return None
    return ThresholdSpec(
        urgent=target.thresholds.urgent,
        soon=target.thresholds.soon,
        source=f"provisional: copied from {target.name}:{target.version} at import; choose on "
        "local data with radtriage evaluate --write-thresholds",
    )


def _provenance_card(provenance: dict[str, Any], target: ModelMetadata) -> str:
    lines = ["", "## Imported", f"- fits the grid of {target.name}:{target.version}"]
    lines += [f"- {k}: {v}" for k, v in provenance.items()]
    lines += [
        "- thresholds: provisional until chosen on local data "
        "(`radtriage evaluate --data ... --write-thresholds`)",
        "",
    ]
    return "\n".join(lines)
