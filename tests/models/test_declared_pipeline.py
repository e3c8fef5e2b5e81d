"""Declared-pipeline building blocks (no network): normalisation rules, boxes, the CLI's
refusals of unfit field-model imports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from core.domain import Volume
from models.metadata import GridSpec, InferenceSpec, InputSpec, ModelMetadata, Normalisation
from models.pipeline import declared, forward_map, forward_maps
from models.preprocessing import centre_offset, cut_box, normalise, place_in_box

ROOT = Path(__file__).resolve().parents[2]


def test_percentile_zscore_is_picai_baselines() -> None:
    from picai_baseline.unet.training_setup.preprocess_utils import z_score_norm

    x = np.random.default_rng(1).gamma(2.0, 50.0, (4, 16, 16)).astype(np.uint16)
    rule = Normalisation(channel="t2w", clip=None, percentile=99.5)
    np.testing.assert_array_equal(normalise(x, rule), z_score_norm(x, percentile=99.5))
    assert not np.allclose(
        normalise(x, rule.model_copy(update={"percentile": 99.0})), z_score_norm(x, percentile=99.5)
    )


def test_nonzero_zscore_leaves_background() -> None:
    x = np.zeros((2, 4, 4), np.float32)
    x[0, :2] = [[1, 2, 3, 4], [5, 6, 7, 8]]
    out = normalise(x, Normalisation(channel="t2w", method="zscore_nonzero", clip=None))
    assert (out[x == 0] == 0).all()
    assert abs(float(out[x != 0].mean())) < 1e-6


def test_centre_crop_and_pad_round_trip() -> None:
    assert centre_offset((23, 300, 300), (20, 256, 256)) == (1, 22, 22)
    assert centre_offset((19, 256, 256), (20, 256, 256)) == (0, 0, 0)
    assert centre_offset((17, 250, 256), (20, 256, 256)) == (-1, -3, 0)
    a = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    vol = Volume(a, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), "", "")
    box = cut_box(vol, (3, 8, 4), (1, -1, 2))
    assert box.origin == (2.0, -1.0, 2.0)
    np.testing.assert_array_equal(
        place_in_box(box.array, a.shape, (1, -1, 2))[1:4, :, 2:6], a[1:4, :, 2:6]
    )


def _tiny(inference: InferenceSpec) -> ModelMetadata:
    spec = InputSpec(
        spacing_xyz=(1.0, 1.0, 1.0),
        shape_zyx=(2, 4, 4),
        channels=("t2w",),
        normalisation=(),
        grid=GridSpec(),
    )
    return ModelMetadata(
        name="m",
        version="1",
        task="cspca_detection",
        inputs=(),
        outputs=(),
        input_spec=spec,
        output_channels=("a", "b"),
        inference=inference,
        sha256="0" * 64,
    )


def test_forward_map_flips_back_activates_and_averages_members() -> None:
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    md = _tiny(InferenceSpec(tta_flips=("x",), activation="sigmoid", channel=1))
    assert declared(md) and not declared(_tiny(InferenceSpec()))
    identity = lambda b: np.concatenate([b, 3 * b], axis=1)  # noqa: E731
    shifted = lambda b: np.concatenate([b, 3 * b + 1], axis=1)  # noqa: E731
    got = forward_map(md, [identity, shifted], x)
    want = (torch.sigmoid(torch.from_numpy(3 * x)) + torch.sigmoid(torch.from_numpy(3 * x + 1))) / 2
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)


def test_an_ensemble_batch_runs_each_member_once_and_equals_study_by_study() -> None:
    """Dynamic batching reaches the members: N studies x flips go through each member in one
    call, and each study's map is exactly what it gets alone (a flip or member mixed up between
    studies would differ: the studies are different noise)."""
    xs = np.random.default_rng(1).standard_normal((3, 1, 2, 4, 4)).astype(np.float32)
    md = _tiny(
        InferenceSpec(tta_flips=("x", "y"), activation="sigmoid", channel=1, smoothing_sigma=0.7)
    )
    calls: list[int] = []

    def member(scale: float):  # type: ignore[no-untyped-def]
        def run(b: np.ndarray) -> np.ndarray:
            calls.append(len(b))
            return np.concatenate([b, scale * b + np.arange(4, dtype=np.float32)], axis=1)

        return run

    members = [member(2.0), member(-1.5)]
    batched = forward_maps(md, members, xs)
    assert calls == [9, 9]  # 3 studies x 3 augmentations, once per member
    calls.clear()
    alone = np.stack([forward_map(md, members, x) for x in xs])
    assert calls == [3] * 6
    np.testing.assert_array_equal(batched, alone)
    assert not np.allclose(alone[0], alone[1])


def test_import_picai_unet_refuses_a_folder_without_folds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.pt").write_bytes(b"")
    rc = main(
        [
            "models",
            "--repository",
            str(tmp_path / "repo"),
            "import-picai-unet",
            str(tmp_path),
            "--name",
            "p",
            "--version",
            "1",
        ]
    )
    assert rc != 0
    assert "unet_F0.pt" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_import_with_pipeline_refuses_an_unknown_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text("weights = 1\n" + (ROOT / "configs/models/taps.toml").read_text())
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not onnx")
    rc = main(
        [
            "models",
            "--repository",
            str(tmp_path / "repo"),
            "import",
            str(onnx_file),
            "--pipeline",
            str(toml),
            "--name",
            "t",
            "--version",
            "1",
        ]
    )
    assert rc != 0
    assert "unknown keys ['weights']" in capsys.readouterr().err


def _volume(shape_zyx: tuple[int, int, int], spacing: tuple[float, float, float]) -> Volume:
    rng = np.random.default_rng(sum(shape_zyx))
    array = rng.gamma(2.0, 100.0, shape_zyx).astype(np.uint16)
    return Volume(array, spacing, (-40.0, -40.0, -30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), "", "")


def test_a_picai_detector_runs_with_the_bundled_gland_on_its_own_grid() -> None:
    """PipelineSteps pairs grids that differ: each model's own prepared case, each output back
    to the T2W grid; PI-CAI candidates (dynamic, >= max/5) and case = max on that grid."""
    from models.metadata import TensorSpec, ThresholdSpec
    from models.pipeline import PipelineSteps, PreparedPair
    from models.repository import ModelRepository
    from training.picai_import import picai_metadata_fields

    gland = ModelRepository(None).resolve("prostate_gland:0.2.0").metadata
    detector = ModelMetadata(
        name="picai",
        version="t",
        task="cspca_detection",
        inputs=(TensorSpec(name="input", shape=("batch", 3, 20, 256, 256)),),
        outputs=(TensorSpec(name="output", shape=("batch", 2, 20, 256, 256)),),
        output_channels=("bg", "csPCa"),
        inference=InferenceSpec(tta_flips=("x",), activation="sigmoid", channel=1),
        thresholds=ThresholdSpec(urgent=0.6, soon=0.3, source="test"),
        sha256="0" * 64,
        **picai_metadata_fields(),
    )
    steps = PipelineSteps(detector, gland)
    t2w = _volume((16, 160, 160), (0.5, 0.5, 3.0))
    dwi = _volume((16, 40, 40), (2.0, 2.0, 3.0))
    prepared = steps.prepare(t2w, dwi, dwi)
    assert isinstance(prepared, PreparedPair)
    assert steps.detector_input(prepared).shape == (3, 20, 256, 256)
    assert steps.gland_input(prepared).shape[1:] == tuple(gland.input_spec.shape_zyx)
    zz, yy, xx = np.mgrid[0:20, 0:256, 0:256]
    blob = np.exp(-(((zz - 10) / 2.0) ** 2 + ((yy - 128) / 8.0) ** 2 + ((xx - 100) / 8.0) ** 2))
    detector_map = (0.8 * blob)[None].astype(np.float32)
    gland_probs = np.zeros((3, *gland.input_spec.shape_zyx), np.float32)
    gland_probs[0] = 1.0
    prediction = steps.finish(prepared, gland_probs, detector_map)
    assert len(prediction.lesions) == 1
    assert prediction.lesions[0].category == "ai_high"
    assert abs(prediction.case_likelihood - 0.8) < 0.02
    assert prediction.likelihood_map.array.shape == t2w.array.shape
