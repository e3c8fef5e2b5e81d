"""`radtriage models import-picai-unet DIR`: the PI-CAI baseline U-Net's fold checkpoints as one
ensemble model version with the PI-CAI algorithm's declared pipeline.

DIR holds `unet_F0.pt` ... `unet_F4.pt` (each `{"model_state_dict": ...}` of picai_baseline's
default U-Net, `models.networks.picai_unet`). Missing folds are allowed and recorded; any other
`.pt` file, a checkpoint without `model_state_dict`, or one whose keys or shapes differ from the
architecture is refused before anything is written. Each fold is exported to ONNX, parity-checked
against eager PyTorch and written as one ensemble member with its checkpoint's sha256.

The declared pipeline is the published algorithm (picai_unet_semi_supervised_gc_algorithm):
picai_prep alignment, resampling (B-spline) and centre crop to 20x256x256 at 3.0x0.5x0.5 mm,
per-channel z-score after a 99.5th-percentile clip, horizontal-flip test-time augmentation,
sigmoid of class 1, Gaussian blur (sigma 1.5) per augmentation, mean over augmentations and
folds, zero-padded back and resampled (B-spline) onto the T2W grid, report_guided_annotation's
dynamic lesion candidates, candidates below a fifth of the highest dropped, case = max.
"""

from __future__ import annotations

import re
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

from core.errors import InputError, ModelNotFoundError, ModelSignatureError
from models.metadata import (
    METADATA_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    EnsembleMember,
    GridSpec,
    InferenceSpec,
    InputSpec,
    LesionSpec,
    ModelMetadata,
    Normalisation,
    ParityCheck,
    PostprocessingSpec,
    TensorSpec,
    write_metadata,
)
from models.networks import PICAI_UNET, picai_unet
from models.repository import ModelRepository, ModelVersion, parse_ref, sha256_bytes, sha256_file
from training.bundle_import import IMPORTED_DISCLAIMER, _thresholds
from training.export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, optimise_offline

FOLDS = range(5)
_CHECKPOINT = re.compile(r"^unet_F(\d)\.pt$")
SHAPE_ZYX = (20, 256, 256)
SPACING_XYZ = (0.5, 0.5, 3.0)
PARITY_TOLERANCE = 1e-3


def picai_metadata_fields() -> dict[str, Any]:
    """The PI-CAI baseline's declared input grid, inference and lesion extraction."""
    return {
        "input_spec": InputSpec(
            spacing_xyz=SPACING_XYZ,
            shape_zyx=SHAPE_ZYX,
            channels=("t2w", "adc", "hbv"),
            normalisation=tuple(
                Normalisation(channel=c, method="zscore", clip=None, percentile=99.5)
                for c in ("t2w", "adc", "hbv")
            ),
            grid=GridSpec(
                kind="picai_prep", interpolation="bspline", revert_interpolation="bspline"
            ),
        ),
        "lesions": LesionSpec(method="report_guided_dynamic", min_peak_fraction=0.2),
        "postprocessing": PostprocessingSpec(gland_margin_mm=None),
    }


def read_fold(path: Path) -> dict[str, torch.Tensor]:
    """The checked state dict of one fold checkpoint (refused with the reason otherwise)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise ModelSignatureError(f"{path} is not a PyTorch checkpoint: {exc}") from exc
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint)
        raise ModelSignatureError(
            f"{path}: a PI-CAI U-Net checkpoint is a dict with 'model_state_dict' (got {keys})"
        )
    state = checkpoint["model_state_dict"]
    expected = picai_unet().state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        raise ModelSignatureError(
            f"{path} does not fit picai_baseline's default U-Net "
            f"(channels {PICAI_UNET['channels']}): missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shapes {wrong[:3]}"
        )
    return dict(state)


def find_folds(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of unet_F0.pt ... unet_F4.pt")
    found: dict[int, Path] = {}
    for path in sorted(folder.glob("*.pt")):
        m = _CHECKPOINT.match(path.name)
        if m is None or int(m.group(1)) not in FOLDS:
            raise InputError(f"{path.name}: expected only unet_F0.pt ... unet_F4.pt in {folder}")
        found[int(m.group(1))] = path
    if not found:
        raise InputError(f"{folder} holds no unet_F0.pt ... unet_F4.pt fold checkpoint")
    return found


def export_fold(net: torch.nn.Module, seed: int = 0) -> tuple[bytes, ParityCheck]:
    """ONNX (opset 17, dynamic batch, optimised offline) of one fold, parity-checked."""
    net.eval()
    x = np.random.default_rng(seed).standard_normal((1, 3, *SHAPE_ZYX)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="radtriage-picai-") as tmp:
        raw, optimised = Path(tmp) / "raw.onnx", Path(tmp) / MODEL_FILE
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                net,
                (torch.from_numpy(x),),
                str(raw),
                dynamo=False,
                opset_version=DEFAULT_OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        optimise_offline(raw, optimised)
        data = optimised.read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    diff = float(np.max(np.abs(got - want)))
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
        raise ModelSignatureError(f"ONNX export differs from PyTorch by {diff:.3g}")
    return data, ParityCheck(max_abs_diff=diff, tolerance=PARITY_TOLERANCE, inputs=1)


def import_picai_unet(
    folder: Path,
    *,
    name: str,
    version: str,
    repository: Path | None = None,
    like: str = "cspca_detector",
    overwrite: bool = False,
) -> ModelVersion:
    """Import the fold checkpoints in `folder` as NAME:VERSION (see the module doc)."""
    parse_ref(f"{name}:{version}")
    repo = ModelRepository(repository)
    dest = repo.root / name / version
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} already exists; choose another --version")
    folds = find_folds(folder)
    states = {fold: read_fold(path) for fold, path in folds.items()}  # all checked first
    try:
        target = repo.resolve(like).metadata
    except ModelNotFoundError:  # a fresh site repository: the bundled detector's thresholds
        target = ModelRepository(None).resolve(like).metadata
    with tempfile.TemporaryDirectory(prefix="radtriage-picai-") as tmp:
        staging = Path(tmp) / "version"
        staging.mkdir()
        members = []
        for i, (fold, state) in enumerate(sorted(states.items())):
            net = picai_unet()
            net.load_state_dict(state)
            data, parity = export_fold(net)
            file = MODEL_FILE if i == 0 else f"unet_F{fold}.onnx"
            (staging / file).write_bytes(data)
            members.append(
                EnsembleMember(
                    file=file,
                    sha256=sha256_bytes(data),
                    fold=fold,
                    source_sha256=sha256_file(folds[fold]),
                    parity=parity,
                )
            )
        first = members[0]
        md = ModelMetadata(
            name=name,
            version=version,
            task="cspca_detection",
            description="PI-CAI baseline U-Net (picai_baseline), "
            f"{len(members)}-fold ensemble with the PI-CAI algorithm's pipeline",
            inputs=(TensorSpec(name=INPUT_NAME, shape=("batch", 3, *SHAPE_ZYX)),),
            outputs=(TensorSpec(name=OUTPUT_NAME, shape=("batch", 2, *SHAPE_ZYX)),),
            output_channels=("background logit", "csPCa logit"),
            inference=InferenceSpec(
                tta_flips=("x",),
                activation="sigmoid",
                channel=1,
                smoothing_sigma=1.5,
                members=tuple(members),
            ),
            thresholds=_thresholds({}, target),
            disclaimer=IMPORTED_DISCLAIMER,
            training_data={"source": "PI-CAI (stated by the checkpoint provider)"},
            training={
                "import": {
                    "imported_from": "picai_baseline U-Net fold checkpoints",
                    "folds_found": sorted(folds),
                    "folds_missing": [f for f in FOLDS if f not in folds],
                    "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            },
            network={"architecture": "monai.networks.nets.UNet", **PICAI_UNET},
            parity=first.parity,
            opset=DEFAULT_OPSET,
            sha256=first.sha256,
            size_bytes=sum((staging / m.file).stat().st_size for m in members),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            software={"torch": torch.__version__, "onnx": onnx.__version__},
            **picai_metadata_fields(),
        )
        write_metadata(staging / METADATA_FILE, md)
        (staging / MODEL_CARD_FILE).write_text(_card(md), encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, dest)
    return repo.verify(f"{name}:{version}")


def _card(md: ModelMetadata) -> str:
    folds = md.training["import"]
    return "\n".join(
        [
            f"# {md.name}:{md.version}",
            "",
            md.description,
            "",
            f"- {IMPORTED_DISCLAIMER}",
            f"- folds: {folds['folds_found']} (missing: {folds['folds_missing'] or 'none'})",
            *(
                f"- fold {m.fold}: {m.file} sha256 {m.sha256}, checkpoint sha256 "
                f"{m.source_sha256}, ONNX parity {m.parity.max_abs_diff:.1e}"
                for m in md.inference.members
                if m.parity is not None
            ),
            "- pipeline: see metadata.json (input_spec.grid, inference, lesions); thresholds "
            "provisional until `radtriage evaluate --write-thresholds`",
            "",
        ]
    )
