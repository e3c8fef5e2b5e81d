"""`metadata.json` of one model version: the contract between training, export and serving.

Serving reads only this file and `model.onnx` (no code from training), so everything the runtime
needs to reproduce training-time pre/post-processing lives here: input grid (spacing, shape),
channels, normalisation, output meaning, postprocessing parameters and operating thresholds.

A version is immutable: `version_digest` is the sha256 of this file's canonical JSON without that
field (so it covers thresholds, calibration, the gate, the pipeline and, through `sha256` and the
members' sha256, every ONNX file). `write_metadata` seals it; `read_metadata` refuses a file
whose content no longer matches its seal. New thresholds make a new version
(`ModelRepository.derive`), and a study records the digest of exactly what scored it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from core.domain import ModelRef
from core.errors import ModelError, ModelIntegrityError
from core.priority import Thresholds
from models.calibration import CalibrationSpec
from models.ood_gate import OodGateSpec

METADATA_FILE = "metadata.json"
MODEL_FILE = "model.onnx"
MODEL_CARD_FILE = "model_card.md"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE: demonstration model trained on synthetic data."
CHANNELS = ("t2w", "adc", "hbv")
DIGEST_FIELD = "version_digest"

log = logging.getLogger(__name__)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ParityCheck(_Frozen):
    max_abs_diff: float
    tolerance: float
    inputs: int
    reference: str = "torch (eager, CPU)"


class Normalisation(_Frozen):
    """Per-channel intensity normalisation, computed over the model-grid crop.

    `zscore`: (x - mean) / std over the crop (std < 1e-6: divide by 1); `percentile` first clips
    intensities to [P(100 - p), P(p)] and a zero std then gives zeros (picai_baseline's
    `z_score_norm`). `zscore_nonzero`: mean and std of the non-zero voxels only, applied to those
    (MONAI `NormalizeIntensity(nonzero=True)`).
    """

    channel: Literal["t2w", "adc", "hbv"]
    method: Literal["zscore", "zscore_nonzero", "none"] = "zscore"
    clip: tuple[float, float] | None = Field(
        default=(-5.0, 5.0), description="Clip after normalisation (None = no clipping)"
    )
    percentile: float | None = Field(
        default=None, gt=50.0, le=100.0, description="Clip to this percentile before z-score"
    )


class GridSpec(_Frozen):
    """Where a model's voxels come from and how its outputs go back to the T2W grid.

    - `t2w_center`: a box of `shape_zyx` at `spacing_xyz`, oriented like the T2W series and
      centred on its field of view; each channel resampled once straight onto it (0.2.0 models).
    - `picai_prep`: picai_prep's `Sample.preprocess`: every series resampled to the spacing on
      its own origin, centre-cropped/padded in index space to `shape_zyx`, ADC/high-b then
      resampled onto the cropped T2W; outputs zero-padded back into the resampled T2W box and
      resampled onto the T2W grid.
    - `sliding_window`: the whole T2W field of view reoriented to `orientation`, at the spacing,
      cropped to the foreground (+ `foreground_margin` voxels); the network runs on `roi_zyx`
      windows with `overlap` and Gaussian blending.
    """

    kind: Literal["t2w_center", "picai_prep", "sliding_window"] = "t2w_center"
    interpolation: Literal["linear", "bspline"] = "linear"
    revert_interpolation: Literal["linear", "bspline"] = "linear"
    orientation: Literal["t2w", "RAS"] = "t2w"
    roi_zyx: tuple[int, int, int] | None = None
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    foreground_margin: int | None = None
    axis_order: Literal["zyx", "xyz"] = Field(
        default="zyx", description="the network's spatial axes: (N, C, Z, Y, X) or (N, C, X, Y, Z)"
    )


class EnsembleMember(_Frozen):
    """One member network of an ensemble (e.g. a cross-validation fold), its own ONNX file."""

    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.onnx$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    fold: int | None = None
    source_sha256: str | None = Field(default=None, description="the checkpoint it came from")
    parity: ParityCheck | None = None


class InferenceSpec(_Frozen):
    """How raw network outputs become one map: members x test-time flips, activation and channel,
    smoothing per augmentation, mean over augmentations then members."""

    tta_flips: tuple[Literal["x", "y", "z"], ...] = Field(
        default=(), description="each adds a flipped copy of the input, its output un-flipped"
    )
    activation: Literal["none", "sigmoid", "softmax"] = "none"
    activate_on: Literal["model_grid", "t2w_grid"] = Field(
        default="model_grid", description="t2w_grid: logits go back, then the activation"
    )
    channel: int | None = Field(default=None, description="keep only this output channel")
    smoothing_sigma: float = Field(default=0.0, ge=0.0, description="Gaussian, model-grid voxels")
    smoothing_mode: Literal["reflect", "nearest"] = "reflect"
    members: tuple[EnsembleMember, ...] = ()
    mask_threshold: float | None = Field(
        default=None, description="gland models with one channel: foreground where p > this"
    )


class LesionSpec(_Frozen):
    """Detection map -> candidates -> case likelihood."""

    method: Literal["components", "report_guided_dynamic"] = "components"
    min_peak_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0, description="drop candidates below this x the highest peak"
    )
    case_aggregation: Literal["max"] = "max"


class InputSpec(_Frozen):
    """The model grid: a box of `shape_zyx` voxels of `spacing_xyz` mm, oriented like the T2W
    series and centred on the centre of the T2W field of view (PI-CAI style centre crop)."""

    spacing_xyz: tuple[float, float, float] = Field(description="mm, (x, y, z)")
    shape_zyx: tuple[int, int, int] = Field(description="voxels, (z, y, x)")
    channels: tuple[str, ...] = Field(description="Input channels in order, from t2w/adc/hbv")
    normalisation: tuple[Normalisation, ...]
    crop: Literal["t2w_center"] = "t2w_center"
    grid: GridSpec = Field(default_factory=GridSpec)

    @field_validator("channels")
    @classmethod
    def _known_channels(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in v if c not in CHANNELS]
        if unknown or not v:
            raise ValueError(f"channels must be a non-empty subset of {CHANNELS}, got {v}")
        return v

    @field_validator("spacing_xyz")
    @classmethod
    def _positive_spacing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"spacing_xyz must be positive, got {v}")
        return v

    def normalisation_for(self, channel: str) -> Normalisation:
        for n in self.normalisation:
            if n.channel == channel:
                return n
        return Normalisation(channel=channel)  # type: ignore[arg-type]

    def same_grid(self, other: InputSpec) -> bool:
        return (
            self.spacing_xyz == other.spacing_xyz
            and self.shape_zyx == other.shape_zyx
            and self.crop == other.crop
            and self.grid == other.grid
        )


class TensorSpec(_Frozen):
    """One ONNX input or output. Dynamic axes are named (e.g. ``"batch"``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: Literal["float32"] = "float32"


class ThresholdSpec(_Frozen):
    """Case-likelihood operating points; `source` says who chose them."""

    urgent: float = Field(ge=0.0, le=1.0)
    soon: float = Field(ge=0.0, le=1.0)
    source: str = Field(description="e.g. 'provisional (training)' or 'radtriage evaluate ...'")
    scale: Literal["raw", "calibrated"] = Field(
        default="raw", description="compared with the calibrated likelihood when `calibrated`"
    )
    bands: dict[str, Any] = Field(
        default_factory=dict,
        description="each band's measured PPV/NPV with CIs on the held-out check split",
    )

    def as_thresholds(self) -> Thresholds:
        return Thresholds(urgent=self.urgent, soon=self.soon)


class PostprocessingSpec(_Frozen):
    """How the output map becomes lesion candidates (models/postprocessing.py)."""

    detection_threshold: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Likelihood that starts a lesion candidate"
    )
    min_lesion_volume_ml: float = Field(default=0.01, ge=0.0)
    max_lesions: int = Field(default=5, gt=0)
    gland_margin_mm: float | None = Field(
        default=6.0, description="Ignore likelihood farther than this outside the gland; None=off"
    )


class ModelMetadata(_Frozen):
    """Everything the runtime knows about one model version."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    task: Literal["cspca_detection", "gland_segmentation"]
    description: str = ""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    input_spec: InputSpec
    output_channels: tuple[str, ...] = Field(description="Meaning of each output channel")
    postprocessing: PostprocessingSpec = Field(default_factory=PostprocessingSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    lesions: LesionSpec = Field(default_factory=LesionSpec)
    thresholds: ThresholdSpec | None = None
    calibration: CalibrationSpec | None = Field(
        default=None,
        description="case-likelihood calibrator (models/calibration.py); None=identity",
    )
    ood_gate: OodGateSpec | None = Field(
        default=None, description="out-of-distribution gate (models/ood_gate.py); None = no gate"
    )
    clinical_use: bool = False
    intended_use: str = ""
    disclaimer: str | None = NOT_FOR_CLINICAL_USE
    training_data: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    network: dict[str, Any] = Field(default_factory=dict)
    parity: ParityCheck | None = None
    opset: int | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int | None = None
    created: str = ""
    software: dict[str, str] = Field(default_factory=dict)
    model_card: str = MODEL_CARD_FILE
    derived_from: str | None = Field(
        default=None, description="NAME:VERSION this version was derived from (new thresholds)"
    )
    version_digest: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of this file's canonical content without this field (the seal)",
    )

    @field_validator("disclaimer")
    @classmethod
    def _demo_models_say_so(cls, v: str | None, info: Any) -> str | None:
        if not info.data.get("clinical_use", False) and not v:
            raise ValueError("a model with clinical_use=false must carry a disclaimer")
        return v

    @model_validator(mode="after")
    def _thresholds_on_the_calibrated_scale(self) -> ModelMetadata:
        t = self.thresholds
        if t is not None and (t.scale == "calibrated") != (self.calibration is not None):
            raise ValueError(
                f"thresholds are on the {t.scale} scale but the model "
                f"{'has a' if self.calibration is not None else 'has no'} calibration: choose "
                "both together with `radtriage evaluate --write-thresholds`"
            )
        return self

    def content_digest(self) -> str:
        """sha256 of the canonical JSON of everything but the seal itself, as written."""
        return content_digest(self.model_dump(mode="json"))

    @property
    def digest(self) -> str:
        """The version's digest: its seal, or (an unsealed legacy file) its content digest."""
        return self.version_digest or self.content_digest()

    def sealed(self) -> ModelMetadata:
        return self.model_copy(update={DIGEST_FIELD: self.content_digest()})

    def model_ref(self) -> ModelRef:
        return ModelRef(
            name=self.name,
            version=self.version,
            sha256=self.sha256,
            clinical_use=self.clinical_use,
            intended_use=self.intended_use,
            digest=self.digest,
        )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def content_digest(document: dict[str, Any]) -> str:
    """sha256 of a metadata document's canonical JSON (sorted keys, no spaces) without its seal.
    Read files are digested as they stand, so a key added to the schema later (with a default)
    leaves every sealed version valid."""
    content = {k: v for k, v in document.items() if k != DIGEST_FIELD}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def read_metadata(path: Path) -> ModelMetadata:
    """Read and validate `path` (a metadata.json); raise `ModelError` saying what is wrong."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"{path} does not exist: each model version needs one") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); re-export the model") from exc
    try:
        md = ModelMetadata.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(f"{path} is not a valid model metadata file: {exc}") from exc
    if md.version_digest is None:
        log.warning("%s carries no version_digest (written before versions were sealed)", path)
    elif not isinstance(raw, dict) or md.version_digest != content_digest(raw):
        raise ModelIntegrityError(
            f"{path} was changed after {md.name}:{md.version} was written (its content no "
            "longer matches version_digest): a model version is immutable, so its thresholds, "
            "calibration and gate cannot change under it; restore the file, or write new "
            "thresholds as a new version with `radtriage evaluate --write-thresholds`"
        )
    return md


def write_metadata(path: Path, metadata: ModelMetadata) -> None:
    """Write `metadata` sealed (`version_digest`), atomically (tmp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(metadata.sealed().to_json(), encoding="utf-8")
    tmp.replace(path)
