"""`radtriage train`: MONAI training of the demo models, resumable, logged, then exported.

- Deterministic: every random choice derives from (seed, step): the batch indices from a numpy
  generator seeded per step and MONAI's random transforms re-seeded per step, so a resumed run
  draws exactly the batches an uninterrupted run would have drawn.
- Checkpoints: `<out>/<model>/checkpoint.pt` (weights, optimiser, step) every `checkpoint_every`
  steps and at the end; `--resume` continues from it.
- Log: `<out>/<model>/log.jsonl`, one JSON object per logged step/validation. JSONL rather than
  TensorBoard/MLflow: no extra dependency or server, append-only (a resumed run just appends),
  greppable and diffable, and loads in one line with pandas/json for plots.
- Export: each model goes through `training.export.export_model` (ONNX + parity + metadata).
- Fine-tuning (`init_from`, `radtriage train --init-from NAME:VERSION`): a model starts from a
  repository version's exported weights (`weights.pt`) instead of a random init, after its task,
  network, grid, spacing, channels and normalisation are checked against the config; metadata
  records the parent (`training.init_from`) and the marksheet it was tuned on.
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from core.errors import ConfigError, InputError, ModelSignatureError
from models.metadata import (
    CHANNELS,
    InputSpec,
    Normalisation,
    PostprocessingSpec,
    ThresholdSpec,
)
from models.networks import (
    NetworkConfig,
    ProbabilityNet,
    build_network,
    coarse_target,
    count_parameters,
)
from training.datasets import TrainingCase

log = logging.getLogger(__name__)

DETECTOR, GLAND = "cspca_detector", "prostate_gland"
TASKS = {DETECTOR: "cspca_detection", GLAND: "gland_segmentation"}
OUTPUT_CHANNELS = {DETECTOR: ("csPCa likelihood",), GLAND: ("background", "PZ", "TZ")}


@dataclass(frozen=True)
class ModelTrainConfig:
    name: str
    channels: tuple[str, ...]
    network: NetworkConfig
    steps: int = 300
    batch_size: int = 2
    learning_rate: float = 3e-3
    validate_every: int = 100
    checkpoint_every: int = 50
    positive_fraction: float = 0.5  # detector: share of csPCa-positive cases per batch
    pos_weight: float = 1.0  # detector: BCE weight of lesion voxels (they are ~0.2% of the box)


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    version: str
    repository: Path
    spacing_xyz: tuple[float, float, float]
    shape_zyx: tuple[int, int, int]
    data: dict[str, Any]
    models: tuple[ModelTrainConfig, ...]
    threads: int = 2
    promote: bool = False
    thresholds: dict[str, Any] = field(default_factory=dict)
    postprocessing: dict[str, Any] = field(default_factory=dict)

    def input_spec(self, channels: tuple[str, ...] = CHANNELS) -> InputSpec:
        return InputSpec(
            spacing_xyz=self.spacing_xyz,
            shape_zyx=self.shape_zyx,
            channels=channels,
            normalisation=tuple(Normalisation(channel=c) for c in channels),  # type: ignore[arg-type]
        )


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training TOML (see training/configs/default.toml); raise ConfigError."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"training config {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"training config {path} is not valid TOML: {exc}") from exc
    raw.update(overrides or {})
    try:
        models = []
        for name, m in raw["models"].items():
            if name not in TASKS:
                raise ConfigError(f"unknown model {name!r} in {path}; use {sorted(TASKS)}")
            channels = tuple(m.get("channels", CHANNELS))
            net_kwargs = dict(m.get("network", {}))
            if "strides" in net_kwargs:
                net_kwargs["strides"] = tuple(tuple(s) for s in net_kwargs["strides"])
            if "channels" in net_kwargs:
                net_kwargs["channels"] = tuple(net_kwargs["channels"])
            out = 1 if name == DETECTOR else 3
            act: Literal["sigmoid", "softmax"] = "sigmoid" if name == DETECTOR else "softmax"
            network = NetworkConfig(
                in_channels=len(channels), out_channels=out, activation=act, **net_kwargs
            )
            keys = ModelTrainConfig.__dataclass_fields__.keys() - {"name", "channels", "network"}
            models.append(
                ModelTrainConfig(name, channels, network, **{k: m[k] for k in keys if k in m})
            )
        grid = raw["grid"]
        config = TrainConfig(
            seed=int(raw.get("seed", 0)),
            version=str(raw.get("version", "0.0.1")),
            repository=Path(raw.get("repository", "models/repository")),
            spacing_xyz=tuple(float(v) for v in grid["spacing_xyz"]),  # type: ignore[arg-type]
            shape_zyx=tuple(int(v) for v in grid["shape_zyx"]),  # type: ignore[arg-type]
            data=dict(raw.get("data", {"source": "phantoms"})),
            models=tuple(models),
            threads=int(raw.get("threads", 2)),
            promote=bool(raw.get("promote", False)),
            thresholds=dict(raw.get("thresholds", {})),
            postprocessing=dict(raw.get("postprocessing", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"training config {path} is invalid: {exc!r}") from exc
    for m in config.models:
        div = m.network.divisor_zyx()
        if any(s % d for s, d in zip(config.shape_zyx, div, strict=True)):
            raise ConfigError(f"grid shape {config.shape_zyx} must be divisible by {div}")
    return config


# --- data ---------------------------------------------------------------------------------


def load_data(config: TrainConfig) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """(train, validation) cases on the model grid, all three channels."""
    from training import datasets

    spec = config.input_spec()
    data = config.data
    source = data.get("source", "phantoms")
    if source == "phantoms":
        vendors = tuple(data.get("vendors", ("siemens", "ge", "philips")))
        families = tuple(data.get("families", ("standard",)))
        train_seeds = range(*data.get("train_seeds", (0, 64)))
        val_seeds = range(*data.get("val_seeds", (10000, 10016)))
        train = datasets.phantom_cases(spec, train_seeds, vendors, families)
        val = datasets.phantom_cases(spec, val_seeds, vendors, families)
        return train, val
    if source == "picai":
        cases = datasets.picai_cases(
            spec, Path(data["images"]), Path(data["labels"]), Path(data["marksheet"])
        )
    elif source == "dicom":
        cases = datasets.dicom_cases(spec, Path(data["root"]))
    else:
        raise ConfigError(f"data.source {source!r} must be phantoms, picai or dicom")
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(cases))
    n_val = max(1, round(len(cases) * float(data.get("val_fraction", 0.2))))
    if len(cases) < 2:
        raise InputError(f"need at least 2 cases to train and validate, found {len(cases)}")
    return [cases[i] for i in order[n_val:]], [cases[i] for i in order[:n_val]]


def _channel_index(case: TrainingCase, channels: tuple[str, ...]) -> list[int]:
    return [case.channels.index(c) for c in channels]


def _target(case: TrainingCase, name: str) -> np.ndarray:
    return case.lesions if name == DETECTOR else case.zones


def _transforms(seed: int) -> Any:
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    t = Compose(
        [
            RandFlipd(keys=("image", "label"), spatial_axis=2, prob=0.5),  # left-right
            RandScaleIntensityd(keys="image", factors=0.15, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.15, prob=0.5),
            RandGaussianNoised(keys="image", std=0.05, prob=0.3),
        ]
    )
    t.set_random_state(seed=seed)
    return t


def _batch(
    cases: list[TrainingCase], mc: ModelTrainConfig, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng([seed, step])
    if mc.name == DETECTOR:
        pos = [i for i, c in enumerate(cases) if c.lesions.any()]
        neg = [i for i, c in enumerate(cases) if not c.lesions.any()]
        picks = []
        for _ in range(mc.batch_size):
            use_pos = bool(pos) and (rng.random() < mc.positive_fraction or not neg)
            picks.append(int(rng.choice(pos if use_pos else neg)))
    else:
        picks = [int(i) for i in rng.integers(0, len(cases), mc.batch_size)]
    transform = _transforms(seed * 1_000_003 + step)
    images, labels = [], []
    for i in picks:
        c = cases[i]
        item = transform(
            {
                "image": c.image[_channel_index(c, mc.channels)],
                "label": _target(c, mc.name)[None].astype(np.float32),
            }
        )
        images.append(torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32))
        labels.append(torch.as_tensor(np.asarray(item["label"]), dtype=torch.float32))
    return torch.stack(images), torch.stack(labels)


class _DiceWeightedBCE(torch.nn.Module):
    """Soft Dice over the batch + BCE with extra weight on the rare lesion voxels."""

    def __init__(self, pos_weight: float) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.bce(logits, target)


def _loss(mc: ModelTrainConfig) -> torch.nn.Module:
    from monai.losses import DiceCELoss

    if mc.name == DETECTOR:
        return _DiceWeightedBCE(mc.pos_weight)
    return DiceCELoss(softmax=True, to_onehot_y=True, batch=True)


# --- evaluation during training -----------------------------------------------------------


def predict_cases(
    net: ProbabilityNet, cases: list[TrainingCase], mc: ModelTrainConfig
) -> list[np.ndarray]:
    net.eval()
    out = []
    with torch.no_grad():
        for c in cases:
            x = torch.from_numpy(c.image[_channel_index(c, mc.channels)][None])
            out.append(net(x)[0].numpy())
    net.train()
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * (a & b).sum() / denom)


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """Case-level AUROC (Mann-Whitney; ties count half); None without both classes."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return float(wins / (len(pos) * len(neg)))


def validate(
    net: ProbabilityNet, cases: list[TrainingCase], mc: ModelTrainConfig
) -> dict[str, Any]:
    outs = predict_cases(net, cases, mc)
    if mc.name == GLAND:
        gland = [dice(np.argmax(o, 0) > 0, c.zones > 0) for o, c in zip(outs, cases, strict=True)]
        with_zones = [(o, c) for o, c in zip(outs, cases, strict=True) if c.has_zones]
        pz = [dice(np.argmax(o, 0) == 1, c.zones == 1) for o, c in with_zones]
        tz = [dice(np.argmax(o, 0) == 2, c.zones == 2) for o, c in with_zones]
        return {
            "val_gland_dice": float(np.mean(gland)),
            "val_pz_dice": float(np.mean(pz)) if pz else None,
            "val_tz_dice": float(np.mean(tz)) if tz else None,
            "val_cases": len(cases),
        }
    scores = [float(o.max()) for o in outs]
    positive = [c.is_cspca for c in cases]
    lesion_dice = [
        dice(o[0] >= 0.5, c.lesions) for o, c in zip(outs, cases, strict=True) if c.lesions.any()
    ]
    return {
        "val_auroc": auroc(scores, positive),
        "val_lesion_dice": float(np.mean(lesion_dice)) if lesion_dice else None,
        "val_mean_score_pos": _mean([s for s, p in zip(scores, positive, strict=True) if p]),
        "val_mean_score_neg": _mean([s for s, p in zip(scores, positive, strict=True) if not p]),
        "val_cases": len(cases),
    }


# --- fine-tuning ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class InitFrom:
    """A repository version one model is fine-tuned from, its weights checked and loaded."""

    ref: str  # NAME:VERSION
    sha256: str  # of the parent's model.onnx
    weights_sha256: str
    state: dict[str, torch.Tensor]

    def provenance(self) -> dict[str, str]:
        return {"ref": self.ref, "sha256": self.sha256, "weights_sha256": self.weights_sha256}


def _fit_problems(md: Any, config: TrainConfig, mc: ModelTrainConfig) -> list[str]:
    """How a parent's metadata differs from what `mc` trains (empty: it fits)."""
    problems = []
    if md.task != TASKS[mc.name]:
        problems.append(f"task {md.task} (training {TASKS[mc.name]})")
    try:
        parent_net = NetworkConfig.from_dict(dict(md.network)).as_dict()
    except (TypeError, ValueError):
        parent_net = dict(md.network)
    want = mc.network.as_dict()
    diff = sorted(k for k in set(parent_net) | set(want) if parent_net.get(k) != want.get(k))
    if diff:
        problems.append(
            "network " + ", ".join(f"{k} {parent_net.get(k)!r} vs {want.get(k)!r}" for k in diff)
        )
    spec, mine = md.input_spec, config.input_spec(mc.channels)
    for key in ("shape_zyx", "spacing_xyz", "channels", "normalisation"):
        if getattr(spec, key) != getattr(mine, key):
            problems.append(f"{key} {getattr(spec, key)!r} vs {getattr(mine, key)!r}")
    return problems


def resolve_init_from(
    config: TrainConfig, refs: Sequence[str], repository: Path
) -> dict[str, InitFrom]:
    """{model name: parent} for `radtriage train --init-from NAME:VERSION` (one per model).

    Refuses (`ModelSignatureError`, nothing trained) a parent whose task, network, grid,
    spacing, channels or normalisation differ from the training config, or whose weights do
    not load strictly; `ModelError` for a version without a weights file; `InputError` for a
    ref without a version or naming no model of the config."""
    from models.repository import ModelRepository, parse_ref
    from training.export import load_weights

    by_name = {mc.name: mc for mc in config.models}
    out: dict[str, InitFrom] = {}
    for ref in refs:
        name, version = parse_ref(ref)
        if version is None:
            raise InputError(f"--init-from {ref!r} must name a version: NAME:VERSION")
        if name not in by_name:
            raise InputError(
                f"--init-from {ref}: {name} is not trained by this config "
                f"(models: {', '.join(by_name)})"
            )
        if name in out:
            raise InputError(f"--init-from names {name} twice")
        mc = by_name[name]
        parent = ModelRepository(repository).verify(ref)
        problems = _fit_problems(parent.metadata, config, mc)
        if problems:
            raise ModelSignatureError(
                f"cannot fine-tune {name} from {ref}: it differs from the training config in "
                + "; ".join(problems)
            )
        state = load_weights(parent)
        try:
            build_network(mc.network).load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelSignatureError(
                f"cannot fine-tune {name} from {ref}: its weights do not fit the network ({first})"
            ) from exc
        weights = parent.metadata.training["weights"]["sha256"]
        out[name] = InitFrom(ref, parent.metadata.sha256, str(weights), state)
    return out


def _check_resume_parent(state: dict[str, Any], init: InitFrom | None, path: Path) -> None:
    started = state.get("init_from")
    wanted = init.weights_sha256 if init is not None else None
    if started != wanted:
        raise ConfigError(
            f"{path} was started from weights {started or '(random init)'}, this run from "
            f"{wanted or '(random init)'}: resume with the same --init-from, or use a new --out"
        )


def data_provenance(config: TrainConfig) -> dict[str, Any]:
    """What identifies PI-CAI-layout training data beyond its paths: the marksheet's sha256
    and, for a `radtriage feedback export --dataset`, its export.json counts."""
    marksheet = config.data.get("marksheet") if config.data.get("source") == "picai" else None
    if not marksheet or not Path(marksheet).is_file():
        return {}
    from models.repository import sha256_file

    out: dict[str, Any] = {"marksheet_sha256": sha256_file(Path(marksheet))}
    manifest = Path(marksheet).parent / "export.json"
    if manifest.is_file():
        doc = json.loads(manifest.read_text(encoding="utf-8"))
        keep = ("created", "written", "positive", "negative", "labelled_findings", "skipped")
        out["feedback_export"] = {k: doc[k] for k in keep if k in doc}
    return out


# --- loop ---------------------------------------------------------------------------------


def _log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train_model(
    mc: ModelTrainConfig,
    train: list[TrainingCase],
    val: list[TrainingCase],
    out: Path,
    *,
    seed: int,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    init: InitFrom | None = None,
) -> tuple[ProbabilityNet, dict[str, Any]]:
    """Train one model for `mc.steps` steps; return the net and its final validation metrics.

    `stop_at` ends this run early after that step (with a checkpoint), as an interruption
    would; `resume=True` then continues to exactly where an uninterrupted run would be.
    `init`: start from a repository version's weights (fine-tuning) instead of a random init."""
    from monai.utils import set_determinism

    folder = out / mc.name
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = folder / "checkpoint.pt", folder / "log.jsonl"
    if mc.name == GLAND:
        train = [c for c in train if c.has_zones] or train
    set_determinism(seed=seed)
    net = build_network(mc.network)
    if init is not None:
        net.load_state_dict(init.state)
    optimiser = torch.optim.AdamW(net.parameters(), lr=mc.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=mc.learning_rate, total_steps=mc.steps, pct_start=0.1
    )
    start, seconds = 0, 0.0
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _check_resume_parent(state, init, ckpt_path)
        net.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        start, seconds = int(state["step"]), float(state.get("seconds", 0.0))
        log.info("resuming %s at step %d from %s", mc.name, start, ckpt_path)
    elif log_path.exists():
        log_path.unlink()
    loss_fn = _loss(mc)
    net.train()
    bar = tqdm(
        range(start, mc.steps), desc=mc.name, initial=start, total=mc.steps, disable=not progress
    )
    t0 = time.perf_counter()
    for step in bar:
        x, y = _batch(train, mc, seed, step)
        optimiser.zero_grad(set_to_none=True)
        pool = net.input_pool
        loss = loss_fn(net.coarse_logits(x), coarse_target(y, pool, binary=mc.name == DETECTOR))
        loss.backward()
        optimiser.step()
        scheduler.step()
        done = step + 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if done % 10 == 0 or done == mc.steps:
            lr = scheduler.get_last_lr()[0]
            _log(log_path, {"step": done, "loss": float(loss.item()), "lr": lr})
        if done % mc.validate_every == 0 and done != mc.steps:
            _log(log_path, {"step": done, **validate(net, val, mc)})
        stopping = stop_at is not None and done >= stop_at
        if done % mc.checkpoint_every == 0 or done == mc.steps or stopping:
            elapsed = seconds + time.perf_counter() - t0
            state = {
                "model": net.state_dict(),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": done,
                "seconds": elapsed,
                "network": mc.network.as_dict(),
                "init_from": init.weights_sha256 if init is not None else None,
            }
            torch.save(state, ckpt_path.with_suffix(".tmp"))
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        if stopping:
            bar.close()
            return net.eval(), {"stopped_at": done}
    metrics = validate(net, val, mc)
    total = seconds + time.perf_counter() - t0
    metrics.update(
        {"train_seconds": round(total, 1), "steps": mc.steps, "parameters": count_parameters(net)}
    )
    _log(log_path, {"step": mc.steps, "final": True, **metrics})
    net.eval()
    return net, metrics


def export_trained(
    config: TrainConfig,
    mc: ModelTrainConfig,
    net: ProbabilityNet,
    metrics: dict[str, Any],
    val: list[TrainingCase],
    *,
    repository: Path,
    overwrite: bool = False,
    init: InitFrom | None = None,
) -> Any:
    from training.export import export_model

    parity = np.stack([c.image[_channel_index(c, mc.channels)] for c in val[:2]])
    source = config.data.get("source", "phantoms")
    synthetic = source == "phantoms"
    thresholds = None
    if mc.name == DETECTOR:
        t = {"urgent": 0.5, "soon": 0.2, **config.thresholds}
        thresholds = ThresholdSpec(
            urgent=float(t["urgent"]),
            soon=float(t["soon"]),
            source=str(t.get("source", "provisional (training config); run radtriage evaluate")),
        )
    what = "csPCa (ISUP >= 2) likelihood map" if mc.name == DETECTOR else "prostate PZ/TZ zones"
    return export_model(
        net,
        repository=repository,
        name=mc.name,
        version=config.version,
        task=TASKS[mc.name],
        network=mc.network,
        input_spec=config.input_spec(mc.channels),
        output_channels=OUTPUT_CHANNELS[mc.name],
        parity_inputs=parity,
        thresholds=thresholds,
        postprocessing=PostprocessingSpec(**config.postprocessing) if mc.name == DETECTOR else None,
        description=f"Small MONAI 3D U-Net: {what} from bi-parametric prostate MRI.",
        intended_use=(
            "Demonstration and testing of the radtriage pipeline only. Not a medical device."
            if synthetic
            else "Research use: waiting-list triage support for bi-parametric prostate MRI."
        ),
        training_data={
            "source": source,
            "synthetic": synthetic,
            **{k: v for k, v in config.data.items() if k != "source"},
            "seed": config.seed,
            **data_provenance(config),
        },
        training={
            "steps": mc.steps,
            "batch_size": mc.batch_size,
            "learning_rate": mc.learning_rate,
            "loss": f"soft Dice + BCE (pos_weight {mc.pos_weight})"
            if mc.name == DETECTOR
            else "monai DiceCELoss (softmax)",
            **({"init_from": init.provenance()} if init is not None else {}),
            "augmentation": "flip L-R, intensity scale/shift, Gaussian noise (MONAI)"
            + (
                "; phantom families " + ", ".join(config.data["families"])
                if source == "phantoms" and config.data.get("families")
                else ""
            ),
        },
        metrics=metrics,
        overwrite=overwrite,
    )


def _promote_first(repository: Path, name: str, version: str) -> bool:
    """Promote a freshly trained model only when nothing is promoted yet: replacing a promoted
    version is the evaluation gate's decision (`radtriage models promote`)."""
    from models.repository import ModelRepository

    repo = ModelRepository(repository)
    current = repo.promoted(name)
    if current not in (None, version):
        log.warning(
            "%s:%s is promoted; not replacing it with %s (use radtriage models promote)",
            name,
            current,
            version,
        )
        return False
    gate = {"allowed": True, "reason": f"{name} had no promoted version (first training run)"}
    repo.promote(f"{name}:{version}", reason="trained by radtriage train", gate=gate)
    return True


def run_training(
    config: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    export: bool = True,
    repository: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    init_from: Sequence[str] = (),
) -> dict[str, Any]:
    """Train (and export) every model in `config`; returns a summary dict. `init_from`:
    NAME:VERSION refs in the repository to fine-tune from (checked before any data is read)."""
    torch.set_num_threads(config.threads)
    repo = repository if repository is not None else config.repository
    inits = resolve_init_from(config, init_from, repo)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, val = load_data(config)
    summary: dict[str, Any] = {
        "data_seconds": round(time.perf_counter() - t0, 1),
        "train_cases": len(train),
        "val_cases": len(val),
        "models": {},
    }
    for mc in config.models:
        init = inits.get(mc.name)
        net, metrics = train_model(
            mc, train, val, out, seed=config.seed, resume=resume, progress=progress, init=init
        )
        entry: dict[str, Any] = {"metrics": metrics}
        if init is not None:
            entry["init_from"] = init.ref
        if export:
            version = export_trained(
                config, mc, net, metrics, val, repository=repo, overwrite=overwrite, init=init
            )
            entry.update(
                {
                    "path": str(version.path),
                    "sha256": version.metadata.sha256,
                    "size_bytes": version.metadata.size_bytes,
                    "parity_max_abs_diff": version.metadata.parity.max_abs_diff,
                }
            )
            if config.promote:
                entry["promoted"] = _promote_first(repo, mc.name, config.version)
        summary["models"][mc.name] = entry
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
