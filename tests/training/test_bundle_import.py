"""`radtriage models import`: a small MONAI bundle made here (a MONAI UNet on the detector's
channels and grid, as TorchScript and as a state dict with its configs), imported, served through
the in-process pipeline, and refused when its inputs do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from cli.main import main
from core.domain import Volume
from core.errors import InputError, ModelSignatureError
from models.metadata import MODEL_FILE, read_metadata
from models.pipeline import TriagePipeline
from models.repository import ModelRepository, sha256_file
from tests.models.conftest import SPEC_ZYX, export_tiny
from training.bundle_import import import_bundle, import_onnx

NETWORK_DEF = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": "@in_channels",
    "out_channels": 1,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """A detector and a gland model on the tiny grid (tests/models/conftest.py)."""
    repo = tmp_path / "repo"
    export_tiny(repo, "cspca_detector", "1.0.0", seed=1)
    export_tiny(repo, "prostate_gland", "1.0.0", seed=3)
    return repo


def _unet(in_channels: int = 3) -> UNet:
    torch.manual_seed(7)
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=1,
        channels=(4, 8),
        strides=(2,),
        num_res_units=0,
    ).eval()


def make_bundle(
    root: Path,
    *,
    torchscript: bool,
    channels: tuple[str, ...] = ("T2W", "ADC", "HBV"),
    spatial_shape_xyz: tuple[int, int, int] = (SPEC_ZYX[2], SPEC_ZYX[1], SPEC_ZYX[0]),
) -> Path:
    """A MONAI bundle: configs/metadata.json, configs/inference.json, models/model.{ts,pt}."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    net = _unet(len(channels))
    metadata = {
        "version": "0.3.0",
        "name": "site_b_detector",
        "description": "test bundle",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "num_channels": len(channels),
                    "spatial_shape": list(spatial_shape_xyz),
                    "channel_def": {str(i): c for i, c in enumerate(channels)},
                }
            },
            "outputs": {"pred": {"type": "image", "num_channels": 1}},
        },
        "radtriage": {"training_data": {"source": "test", "synthetic": True}},
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    inference = {"in_channels": len(channels), "network_def": NETWORK_DEF}
    (root / "configs" / "inference.json").write_text(json.dumps(inference))
    if torchscript:
        torch.jit.script(net).save(str(root / "models" / "model.ts"))
    else:
        torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def _volume(rng: np.random.Generator) -> Volume:
    return Volume(
        rng.normal(size=(12, 40, 40)).astype(np.float32),
        spacing=(2.5, 2.5, 3.0),
        origin=(0.0, 0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )


@pytest.mark.parametrize("torchscript", [True, False], ids=["torchscript", "state_dict"])
def test_bundle_is_imported_verified_and_served(
    tiny_repo: Path, tmp_path: Path, torchscript: bool
) -> None:
    bundle = make_bundle(tmp_path / "bundle", torchscript=torchscript)
    version = import_bundle(bundle, repository=tiny_repo, like="cspca_detector:1.0.0")
    md = version.metadata
    assert (md.name, md.version) == ("cspca_detector", "0.3.0")  # a new version of --like
    assert md.sha256 == sha256_file(version.path / MODEL_FILE)
    assert md.parity is not None and md.parity.max_abs_diff <= 1e-3 and md.parity.inputs == 2
    assert (
        md.input_spec
        == read_metadata(tiny_repo / "cspca_detector" / "1.0.0" / "metadata.json").input_spec
    )
    assert md.thresholds is not None and md.thresholds.source.startswith("provisional")
    assert not md.clinical_use and md.disclaimer
    checkpoint = "model.ts" if torchscript else "model.pt"
    assert md.training["import"]["checkpoint"] == checkpoint
    card = (version.path / "model_card.md").read_text()
    assert md.sha256 in card and "Imported" in card and "synthetic phantoms only" not in card

    # the imported ONNX graph equals the torch network on the model grid, axes handled
    x = np.random.default_rng(0).normal(size=(1, 3, *SPEC_ZYX)).astype(np.float32)
    with torch.no_grad():
        want = torch.sigmoid(_unet()(torch.from_numpy(x).permute(0, 1, 4, 3, 2)))
        want = want.permute(0, 1, 4, 3, 2).numpy()
    import onnxruntime as ort

    got = ort.InferenceSession(str(version.path / MODEL_FILE)).run(None, {"image": x})[0]
    assert np.max(np.abs(got - want)) < 1e-4

    # served through the in-process pipeline the server and `radtriage infer` use
    pipeline = TriagePipeline.from_repository(
        repository=tiny_repo, detector="cspca_detector:0.3.0", gland="prostate_gland:1.0.0"
    )
    rng = np.random.default_rng(1)
    prediction = pipeline.predict(_volume(rng), _volume(rng), _volume(rng))
    assert 0.0 <= prediction.case_likelihood <= 1.0
    assert prediction.likelihood_map is not None
    assert prediction.likelihood_map.array.shape == (12, 40, 40)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": ("T2W", "ADC")}, "2 input channel"),
        ({"channels": ("ADC", "T2W", "HBV")}, "orders the inputs"),
        ({"spatial_shape_xyz": (64, 64, 16)}, "does not match the model grid"),
    ],
    ids=["channels", "channel-order", "grid"],
)
def test_bundle_that_does_not_fit_is_refused(
    tiny_repo: Path, tmp_path: Path, kwargs: dict, message: str
) -> None:
    bundle = make_bundle(tmp_path / "bundle", torchscript=False, **kwargs)
    with pytest.raises(ModelSignatureError, match=message):
        import_bundle(bundle, repository=tiny_repo, like="cspca_detector:1.0.0")
    assert ModelRepository(tiny_repo).versions("cspca_detector") == ["1.0.0"]  # nothing written


def test_bundle_with_wrong_weights_or_expressions_is_refused(
    tiny_repo: Path, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "bundle", torchscript=False)
    state = _unet().state_dict()
    state.pop(next(iter(state)))
    torch.save(state, bundle / "models" / "model.pt")
    with pytest.raises(ModelSignatureError, match="does not fit network_def"):
        import_bundle(bundle, repository=tiny_repo, like="cspca_detector:1.0.0")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["network_def"]["channels"] = "$[4, 8]"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="never evaluates"):
        import_bundle(bundle, repository=tiny_repo, like="cspca_detector:1.0.0")


@pytest.mark.slow  # seconds of phantoms/training: `make test`, not test-fast
def test_onnx_import_and_cli(tiny_repo: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bundle = make_bundle(tmp_path / "bundle", torchscript=True)
    base = ["models", "--repository", str(tiny_repo), "import"]
    args = [*base, str(bundle), "--like", "cspca_detector:1.0.0", "--name", "site_b_detector"]
    args += ["--version", "0.3.1", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == "0.3.1" and len(doc["sha256"]) == 64
    # the exported ONNX file comes back in as an ONNX import (its own input/output names)
    source = tiny_repo / "site_b_detector" / "0.3.1" / MODEL_FILE
    meta = bundle / "configs" / "metadata.json"
    doc = json.loads(meta.read_text())
    doc["radtriage"]["axis_order"] = "zyx"
    fmt = doc["network_data_format"]["inputs"]["image"]
    fmt["spatial_shape"] = list(SPEC_ZYX)
    meta.write_text(json.dumps(doc))
    version = import_onnx(
        source,
        meta,
        repository=tiny_repo,
        like="cspca_detector:1.0.0",
        name="site_b_detector",
        version="0.3.2",
    )
    assert version.metadata.training["import"]["imported_from"] == "onnx"
    assert ModelRepository(tiny_repo).verify("site_b_detector:0.3.2")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().out  # --json: the error as JSON
