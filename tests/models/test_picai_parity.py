"""PI-CAI baseline parity: radtriage's declared pipeline (from DICOM) against a reference run
built here from picai_prep, picai_baseline and report_guided_annotation (from the PI-CAI team's
own MHA conversion), following the published algorithm (picai_unet_semi_supervised_gc_algorithm).

Probe checkpoints of the baseline architecture are made here: seeded random weights with the
output layer scaled so the map depends strongly on the input. Two folds (F0, F2) instead of
five keep the runtime modest on a shared CPU; the missing folds are recorded at import.
A wrong percentile (99.0) or blur (1.0) in the reference must break the comparison.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from core.errors import InputError, ModelSignatureError

pytestmark = pytest.mark.slow  # a real exam through two probe folds and the reference: `make test`

pytest.importorskip("picai_prep")
pytest.importorskip("picai_baseline")

FOLDS = (0, 2)
CASE_TOLERANCE = 1e-4
ROLES = ("t2w", "adc", "hbv")


def reference_unet_class() -> Any:
    """picai_baseline's own U-Net definition. Its module imports `alias` and `export` from
    monai.utils (removed after MONAI 1.3; both are registration decorators without effect on
    the network): they are stubbed for this import only."""
    import monai.utils

    added = [n for n in ("alias", "export") if not hasattr(monai.utils, n)]
    for n in added:
        setattr(monai.utils, n, lambda *a, **k: lambda obj: obj)
    try:
        from picai_baseline.unet.training_setup.neural_networks.unets import UNet
    finally:
        for n in added:
            delattr(monai.utils, n)
    return UNet


def reference_net(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from picai_baseline.unet.training_setup.default_hyperparam import get_default_hyperparams

    args = get_default_hyperparams(
        {"model_type": "unet", "image_shape": [20, 256, 256], "num_channels": 3, "num_classes": 2}
    )
    net = reference_unet_class()(
        spatial_dims=len(args.image_shape),
        in_channels=args.num_channels,
        out_channels=args.num_classes,
        strides=args.model_strides,
        channels=args.model_features,
    )
    net.load_state_dict(state)
    return net.eval()


def probe_state(seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights of the reference architecture; the last (output) convolution
    scaled up so the sigmoid map spans (0, 1) and follows the input."""
    torch.manual_seed(seed)
    state = reference_unet_class()(
        spatial_dims=3,
        in_channels=3,
        out_channels=2,
        channels=(32, 64, 128, 256, 512, 1024),
        strides=((2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2)),
    ).state_dict()
    last = [k for k in state if k.endswith("weight")][-1]
    state[last] = state[last] * 40.0
    return state


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("picai_weights")
    for fold in FOLDS:
        torch.save({"model_state_dict": probe_state(100 + fold)}, folder / f"unet_F{fold}.pt")
    return folder


def test_our_unet_is_picai_baselines() -> None:
    """models.networks.picai_unet has the reference's state-dict layout and output."""
    from models.networks import picai_unet

    state = probe_state(7)
    ours = picai_unet()
    ours.load_state_dict(state)  # strict: same keys and shapes
    x = torch.randn(1, 3, 20, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference_net(state)(x)
        got = ours.eval()(x)
    assert torch.equal(got, want)


def test_import_refuses_wrong_checkpoints(probes: Path, tmp_path: Path) -> None:
    from training.picai_import import find_folds, read_fold

    assert sorted(find_folds(probes)) == list(FOLDS)
    bad = tmp_path / "unet_F1.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ModelSignatureError, match="model_state_dict"):
        read_fold(bad)
    state = probe_state(3)
    state["model.0.conv.unit0.conv.weight"] = torch.zeros(1)
    torch.save({"model_state_dict": state}, bad)
    with pytest.raises(ModelSignatureError, match="wrong shapes"):
        read_fold(bad)
    (tmp_path / "other.pt").write_bytes(b"")
    with pytest.raises(InputError, match=r"unet_F0\.pt"):
        find_folds(tmp_path)


def _reference_forward(
    states: list[dict[str, torch.Tensor]], mha: Path, percentile: float
) -> tuple[list[list[np.ndarray]], list[sitk.Image]]:
    """picai_prep preprocessing, picai_baseline normalisation, networks with flip TTA: the
    sigmoid class-1 maps per fold and augmentation (un-flipped), before the blur."""
    from picai_baseline.unet.training_setup.preprocess_utils import z_score_norm
    from picai_prep.preprocessing import PreprocessingSettings, Sample

    images = [sitk.ReadImage(str(mha / f"ProstateX-0001_07-08-2011_{r}.mha")) for r in ROLES]
    sample = Sample(
        scans=[sitk.Image(i) for i in images],
        settings=PreprocessingSettings(matrix_size=[20, 256, 256], spacing=[3.0, 0.5, 0.5]),
    )
    sample.preprocess()
    cropped = [sitk.GetArrayFromImage(x) for x in sample.scans]
    normed = [z_score_norm(np.expand_dims(x, axis=0), percentile=percentile) for x in cropped]
    x = torch.from_numpy(np.expand_dims(np.vstack(normed), axis=0))
    outputs = []
    for state in states:
        net = reference_net(state)
        with torch.no_grad():
            preds = [torch.sigmoid(net(v))[:, 1, ...].numpy() for v in (x, torch.flip(x, [4]))]
        preds[1] = np.flip(preds[1], [3])
        outputs.append(preds)
    return outputs, images


def _reference_finish(
    outputs: list[list[np.ndarray]], images: list[sitk.Image], sigma: float
) -> tuple[float, list[float]]:
    """Blur, ensemble, back to the T2W grid, dynamic candidates, drop < max/5, case = max."""
    from picai_prep.preprocessing import crop_or_pad, resample_img
    from scipy.ndimage import gaussian_filter

    with contextlib.redirect_stdout(io.StringIO()):
        from report_guided_annotation import extract_lesion_candidates

    folds = [
        np.mean([gaussian_filter(p, sigma=sigma) for p in preds], axis=0)[0] for preds in outputs
    ]
    ensemble = np.mean(folds, axis=0).astype("float32")
    spacing = [3.0, 0.5, 0.5]
    resampled = sitk.GetArrayFromImage(resample_img(images[0], out_spacing=spacing))
    back = sitk.GetImageFromArray(crop_or_pad(ensemble, size=resampled.shape))
    back.SetSpacing(list(reversed(spacing)))
    back = resample_img(back, out_spacing=list(reversed(images[0].GetSpacing())))
    _, confidences, _ = extract_lesion_candidates(sitk.GetArrayFromImage(back), threshold="dynamic")
    top = max(c for _, c in confidences)
    peaks = sorted((c for _, c in confidences if c >= top / 5), reverse=True)
    return float(max(peaks)), [float(p) for p in peaks]


@pytest.fixture(scope="module")
def radtriage_run(probes: Path, prostatex: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from imaging.study_volumes import load_study_volumes
    from models.onnx_runner import OnnxModel
    from models.pipeline import run_detector
    from training.picai_import import import_picai_unet

    repo = tmp_path_factory.mktemp("repo")
    version = import_picai_unet(
        probes, name="picai_unet", version="probe", repository=repo, like="cspca_detector:0.2.0"
    )
    assert version.metadata.training["import"]["folds_missing"] == [1, 3, 4]
    assert [m.fold for m in version.metadata.inference.members] == list(FOLDS)
    model = OnnxModel.load(repo, "picai_unet:probe", device="cpu")
    v = load_study_volumes(prostatex)
    *_, found = run_detector(model.metadata, model.member_runs(), v.t2w, v.adc, v.hbv)
    return found


@pytest.fixture(scope="module")
def reference_outputs(probes: Path, prostatex: Path) -> Any:
    mha = prostatex.parent / "reference_mha"
    if not mha.is_dir():
        pytest.skip(f"PI-CAI reference MHA conversion not found at {mha}")
    states = [
        torch.load(probes / f"unet_F{f}.pt", weights_only=True)["model_state_dict"] for f in FOLDS
    ]
    cache: dict[float, Any] = {}

    def run(percentile: float) -> Any:
        if percentile not in cache:
            cache[percentile] = _reference_forward(states, mha, percentile)
        return cache[percentile]

    return run


def test_case_likelihood_and_candidates_match_reference(
    radtriage_run: Any, reference_outputs: Any
) -> None:
    case, peaks = _reference_finish(*reference_outputs(99.5), sigma=1.5)
    print(
        f"\nPI-CAI parity: reference case {case:.6f} peaks {peaks}; radtriage case "
        f"{radtriage_run.case_likelihood:.6f} peaks {list(radtriage_run.peaks)}"
    )
    assert 0.05 < case < 0.95  # the probe's map is informative, not saturated
    assert abs(radtriage_run.case_likelihood - case) <= CASE_TOLERANCE
    assert len(radtriage_run.peaks) == len(peaks)
    np.testing.assert_allclose(radtriage_run.peaks, peaks, atol=CASE_TOLERANCE)


@pytest.mark.parametrize(("percentile", "sigma"), [(99.0, 1.5), (99.5, 1.0)])
def test_a_wrong_parameter_breaks_parity(
    radtriage_run: Any, reference_outputs: Any, percentile: float, sigma: float
) -> None:
    case, peaks = _reference_finish(*reference_outputs(percentile), sigma=sigma)
    print(
        f"\nwrong reference (percentile {percentile}, sigma {sigma}): case {case:.6f} "
        f"vs radtriage {radtriage_run.case_likelihood:.6f}"
    )
    same = (
        abs(radtriage_run.case_likelihood - case) <= CASE_TOLERANCE
        and len(peaks) == len(radtriage_run.peaks)
        and np.allclose(radtriage_run.peaks, peaks, atol=CASE_TOLERANCE)
    )
    assert not same
