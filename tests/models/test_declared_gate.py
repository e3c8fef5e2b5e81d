"""The out-of-distribution gate for declared pipelines (issue 24, item 5): `radtriage evaluate
--write-thresholds` fits it for an imported detector, it acts on new studies, an unfitted one says
"not_fitted" in the result, and a gate fitted with another gland model does not apply."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli.main import main
from core.domain import Volume
from core.errors import OutsideValidatedDomainError
from evaluation.metrics import CaseRecord
from evaluation.phantom_shift import large, oblique
from evaluation.phantom_shift import shifted as shifted_case
from evaluation.runner import phantom_cases
from evaluation.validation_fit import fit_on_splits
from models.ood_gate import FEATURES, declared_domain_features, fit_ood_gate
from models.pipeline import TriagePipeline
from models.postprocessing import check_domain
from models.repository import default_repository

FIT_DATA = "phantoms:40:930000"
NEW_SEED = 4_100_000  # a phantom none of the fitted cases came from

DETECTOR_TOML = """
task = "cspca_detection"
description = "tiny declared test detector: likelihood from high-b and ADC contrast"
output_channels = ["background", "csPCa logit"]

[input_spec]
spacing_xyz = [1.0, 1.0, 3.0]
shape_zyx = [16, 96, 96]
channels = ["t2w", "adc", "hbv"]
normalisation = [
  { channel = "t2w", method = "zscore", clip = false },
  { channel = "adc", method = "zscore", clip = false },
  { channel = "hbv", method = "zscore", clip = false },
]

[inference]
tta_flips = ["x"]
activation = "sigmoid"
channel = 1

[thresholds]
urgent = 0.6
soon = 0.3
source = "provisional (test import)"
"""

GLAND_TOML = """
task = "gland_segmentation"
description = "tiny declared one-channel test gland model"
output_channels = ["gland logit"]

[input_spec]
spacing_xyz = [1.0, 1.0, 3.0]
shape_zyx = [16, 96, 96]
channels = ["t2w"]
normalisation = [{ channel = "t2w", method = "zscore", clip = false }]

[inference]
activation = "sigmoid"
activate_on = "t2w_grid"
mask_threshold = 0.5
"""


def _pointwise_onnx(path: Path, weights: list[list[float]], bias: list[float]) -> Path:
    """A 1x1x1 convolution (outputs = weights @ channels + bias) as ONNX, batch axis dynamic."""
    w = np.asarray(weights, dtype=np.float32)[:, :, None, None, None]
    b = np.asarray(bias, dtype=np.float32)
    dims = ["batch", w.shape[1], "z", "y", "x"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["output"], kernel_shape=[1, 1, 1])],
        "pointwise",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [
            helper.make_tensor_value_info(
                "output", TensorProto.FLOAT, ["batch", w.shape[0], *dims[2:]]
            )
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _run(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(args)
    return rc, out.getvalue()


def _import(repo: Path, onnx_file: Path, toml: str, name: str, version: str = "1") -> None:
    pipeline = onnx_file.with_suffix(".toml")
    pipeline.write_text(toml, encoding="utf-8")
    rc, _ = _run(
        [
            *("models", "--repository", str(repo), "import", str(onnx_file)),
            *("--pipeline", str(pipeline), "--name", name, "--version", version),
        ]
    )
    assert rc == 0


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A repository with the bundled gland, a tiny imported declared detector (`tiny_det:1`,
    evaluated, and `tiny_det:2`, the same model never evaluated), a tiny one-channel gland
    (`tiny_gland:1`), and the detector version with the gate `radtriage evaluate
    --write-thresholds` fitted on phantoms (`ref`: tiny_det:1 itself, or the new version it
    writes)."""
    tmp = tmp_path_factory.mktemp("declared_gate")
    repo = tmp / "repo"
    for name in ("prostate_gland", "cspca_detector"):
        shutil.copytree(default_repository() / name, repo / name)
    # csPCa logit = 2 hbv - 1 adc - 3 (z-scored): bright on high b, dark on ADC
    det = _pointwise_onnx(tmp / "det.onnx", [[0, 0, 0], [0, -1.0, 2.0]], [0.0, -3.0])
    _import(repo, det, DETECTOR_TOML, "tiny_det")
    _import(repo, det, DETECTOR_TOML, "tiny_det", version="2")
    gland = _pointwise_onnx(tmp / "gland.onnx", [[1.5]], [-0.5])
    _import(repo, gland, GLAND_TOML, "tiny_gland")
    rc, out = _run(
        [
            *("evaluate", "--data", FIT_DATA, "--repository", str(repo)),
            *("--model", "tiny_det:1", "--gland", "prostate_gland:0.2.0", "--write-thresholds"),
            *("--target-sensitivity", "0.5", "--confidence", "0.5", "--bootstrap", "10", "--json"),
        ]
    )
    assert rc == 0, out
    doc = json.loads(out)
    md = json.loads(Path(doc["thresholds_written_to"]).read_text())
    return {"repo": repo, "doc": doc, "metadata": md, "ref": f"{md['name']}:{md['version']}"}


def _pipeline(repo: Path, detector: str, gland: str) -> TriagePipeline:
    return TriagePipeline.from_repository(repo, detector=detector, gland=gland, device="cpu")


def _infer(
    repo: Path, study: Path, out: Path, detector: str, gland: str = "prostate_gland:0.2.0"
) -> dict[str, Any]:
    rc, printed = _run(
        [
            *("infer", str(study), "--out", str(out), "--repository", str(repo)),
            *("--detector", detector, "--gland", gland, "--device", "cpu"),
            "--json",
        ]
    )
    assert rc == 0, printed
    return json.loads(printed.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def new_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.phantoms import synthesize_case, write_study

    folder = tmp_path_factory.mktemp("study") / "study"
    return write_study(synthesize_case(NEW_SEED), folder, distractors=False)


@pytest.mark.slow  # ~2 min: evaluate on 40 phantoms, then infer (make test, not test-fast)
def test_evaluate_fits_a_gate_for_a_declared_detector(fitted: dict[str, Any]) -> None:
    gate = fitted["metadata"]["ood_gate"]
    assert gate is not None, "evaluate --write-thresholds wrote no gate for a declared pair"
    assert gate["features"] == list(FEATURES)  # the detector takes all three channels
    assert gate["gland_model"] == "prostate_gland:0.2.0"
    assert (
        gate["n_fit"] + gate["n_threshold"]
        == fitted["doc"]["validation_fit"]["calibration_split"]["n"]
    )
    assert fitted["doc"]["validation_fit"]["ood_gate_check"]["n"] > 0


@pytest.mark.slow
def test_infer_in_domain_with_the_fitted_gate_and_not_fitted_without(
    fitted: dict[str, Any], new_study: Path, tmp_path: Path
) -> None:
    repo = fitted["repo"]
    gated = _infer(repo, new_study, tmp_path / "gated", fitted["ref"])
    assert gated["status"] == "reported"
    assert gated["domain_gate"] == "in_domain" and gated["domain_gate_note"] is None
    unfitted = _infer(repo, new_study, tmp_path / "unfitted", "tiny_det:2")
    assert unfitted["status"] == "reported"
    assert unfitted["domain_gate"] == "not_fitted"
    # a gate fitted with another gland model: not applied, and the result says why
    other = _infer(repo, new_study, tmp_path / "other", fitted["ref"], "tiny_gland:1")
    assert other["domain_gate"] == "not_fitted"
    assert "prostate_gland:0.2.0" in other["domain_gate_note"]


@pytest.mark.slow
def test_a_shifted_study_is_flagged_or_refused(fitted: dict[str, Any]) -> None:
    pipe = _pipeline(fitted["repo"], fitted["ref"], "prostate_gland:0.2.0")
    case = next(phantom_cases(1, NEW_SEED + 1))
    assert pipe.predict(case.t2w, case.adc, case.hbv).domain.verdict == "in_domain"  # type: ignore[attr-defined]
    for shifted in (oblique(case, degrees=60.0), large(case)):  # 60 degrees, 1.4x voxels
        try:
            verdict = pipe.predict(shifted.t2w, shifted.adc, shifted.hbv).domain.verdict  # type: ignore[attr-defined]
        except OutsideValidatedDomainError:
            verdict = "outside"
        assert verdict in ("low_confidence", "outside")
    everything = shifted_case(case, "all")  # oblique, large and another contrast at once
    with pytest.raises(OutsideValidatedDomainError, match="obliquity_deg"):
        pipe.predict(everything.t2w, everything.adc, everything.hbv)


@pytest.mark.slow
def test_a_gate_fitted_with_another_gland_model_does_not_apply(fitted: dict[str, Any]) -> None:
    case = next(phantom_cases(1, NEW_SEED + 2))
    mismatched = _pipeline(fitted["repo"], fitted["ref"], "tiny_gland:1")
    assert mismatched.detector_metadata.ood_gate is not None
    domain = mismatched.predict(case.t2w, case.adc, case.hbv).domain  # type: ignore[attr-defined]
    assert domain.verdict == "not_fitted"
    assert domain.distance is None
    assert "prostate_gland:0.2.0" in domain.reason and "tiny_gland:1" in domain.reason
    # the one-channel gland's binary entropy is a feature all the same
    assert domain.features["gland_entropy"] > 0
    assert set(domain.features) == set(FEATURES)
    # the bundled detector's gate (fitted on its shared grid, no gland recorded) with a declared
    # gland model: not applied either (as with TAPS in tests/serving/test_serve_taps.py)
    bundled = _pipeline(fitted["repo"], "cspca_detector:0.2.0", "tiny_gland:1")
    gate = bundled.detector_metadata.ood_gate
    assert gate is not None and gate.gland_model is None
    legacy = bundled.predict(case.t2w, case.adc, case.hbv).domain  # type: ignore[attr-defined]
    assert legacy.verdict == "not_fitted" and "declared" in legacy.reason


# --- fast: no network ---------------------------------------------------------------------


def _features(rng: np.random.Generator, names: tuple[str, ...] = FEATURES) -> dict[str, float]:
    return {f: float(rng.normal()) for f in names}


def test_gland_mismatch_is_not_fitted_and_an_unrecorded_gland_acts_on_shared_only() -> None:
    rng = np.random.default_rng(0)
    fit = [_features(rng) for _ in range(12)]
    gate = fit_ood_gate(fit[:6], fit[6:], source="test", gland_model="g:1")
    far = {k: v + 100.0 for k, v in fit[0].items()}
    with pytest.raises(OutsideValidatedDomainError):
        check_domain(gate, far, "g:1")
    other = check_domain(gate, far, "g:2")
    assert other.verdict == "not_fitted" and "g:1" in (other.reason or "")
    # fitted before the gland was recorded: still acts on a shared-grid pair, not on a declared
    legacy = gate.model_copy(update={"gland_model": None})
    with pytest.raises(OutsideValidatedDomainError):
        check_domain(legacy, far, "g:2")
    on_declared = check_domain(legacy, far, "g:1", declared=True)
    assert on_declared.verdict == "not_fitted" and "declared" in (on_declared.reason or "")
    with pytest.raises(OutsideValidatedDomainError):
        check_domain(gate, far, "g:1", declared=True)
    missing = check_domain(gate, {k: v for k, v in fit[0].items() if not k.startswith("adc")})
    assert missing.verdict == "not_fitted" and "adc_q05" in (missing.reason or "")


def test_declared_features_omit_channels_the_detector_does_not_take() -> None:
    rng = np.random.default_rng(1)
    reference = Volume(
        np.zeros((8, 32, 32), np.float32),
        (0.5, 0.5, 3.0),
        (0.0, 0.0, 0.0),
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
        "",
        "",
    )
    gland = np.zeros((8, 32, 32), np.uint8)
    gland[2:6, 8:24, 8:24] = 1
    likelihood = np.full((8, 32, 32), 0.5, np.float32)
    image = rng.normal(size=(1, 8, 32, 32)).astype(np.float32)
    out = declared_domain_features(image, ("t2w",), gland, gland, likelihood, reference, 0.3)
    assert not any(k.startswith(("adc", "hbv")) for k in out)
    assert set(out) == {f for f in FEATURES if not f.startswith(("adc", "hbv"))}
    assert out["detector_entropy"] == pytest.approx(np.log(2), rel=1e-4)
    assert out["gland_volume_ml"] == pytest.approx(4 * 16 * 16 * 0.75 / 1000)
    empty = declared_domain_features(
        image, ("t2w",), 0 * gland, 0 * gland, likelihood, reference, 0.0
    )
    assert empty["gland_volume_ml"] == 0.0


def test_fit_on_splits_uses_the_features_every_case_has_and_records_the_gland() -> None:
    rng = np.random.default_rng(2)
    names = tuple(f for f in FEATURES if not f.startswith("adc"))
    records = []
    for i in range(60):
        pos = i % 2 == 0
        raw = float(np.clip(rng.normal(0.6 if pos else 0.1, 0.05), 0, 1))
        extra = {"raw_likelihood": raw, "features": _features(rng, names), "gland_model": "g:1"}
        records.append(CaseRecord(f"c{i}", pos, raw, extra=extra))
    fit = fit_on_splits(records, data="synthetic", method="none", target_sensitivity=0.5)
    assert fit.gate is not None
    assert fit.gate.features == names
    assert fit.gate.gland_model == "g:1"
