"""`radtriage train` on a tiny config: a few steps, export, ONNX-vs-torch parity, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from models.onnx_runner import OnnxModel
from models.pipeline import TriagePipeline
from models.repository import ModelRepository
from training.train import load_config, load_data, train_model

TINY = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def tiny_data():  # type: ignore[no-untyped-def]
    config = load_config(TINY)
    return config, *load_data(config)


@pytest.mark.slow  # seconds of phantoms/training: `make test`, not test-fast
def test_train_export_parity_and_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, out = tmp_path / "repo", tmp_path / "out"
    argv = ["train", "--config", str(TINY), "--out", str(out), "--repository", str(repo)]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for name in ("prostate_gland", "cspca_detector"):
        entry = summary["models"][name]
        assert entry["parity_max_abs_diff"] <= 1e-3 and entry["promoted"]
        assert (out / name / "checkpoint.pt").is_file()
        records = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]
        assert any("loss" in r for r in records) and records[-1]["final"] is True
        md = ModelRepository(repo).verify(name).metadata
        assert md.parity is not None and md.parity.max_abs_diff == entry["parity_max_abs_diff"]
        assert md.training_data["synthetic"] is True and md.metrics["steps"] == 3
    md = ModelRepository(repo).resolve("cspca_detector").metadata
    assert md.thresholds is not None and "provisional" in md.thresholds.source
    # the exported pair runs through the serving pipeline on a fresh phantom
    from training.phantoms import synthesize_case

    case = synthesize_case(4242)
    prediction = TriagePipeline.from_repository(repo, device="cpu").predict(
        case.t2w, case.adc, case.hbv
    )
    assert 0.0 <= prediction.case_likelihood <= 1.0
    assert prediction.likelihood_map is not None
    assert prediction.likelihood_map.array.shape == case.t2w.array.shape
    # `radtriage export` from the checkpoint gives a second, parity-checked version
    ckpt = out / "cspca_detector" / "checkpoint.pt"
    export = ["export", "--config", str(TINY), "--checkpoint", str(ckpt)]
    export += ["--model", "cspca_detector", "--version", "0.0.2", "--repository", str(repo)]
    assert main([*export, "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["parity_max_abs_diff"] <= 1e-3
    model = OnnxModel.load(repo, "cspca_detector:0.0.2", device="cpu")
    net_out = model.run(np.zeros((2, 3, 8, 32, 32), np.float32))
    assert net_out.shape == (2, 1, 8, 32, 32)


def test_resume_reproduces_an_uninterrupted_run(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config, train, val = tiny_data
    mc = config.models[1]
    full, _ = train_model(mc, train, val, tmp_path / "a", seed=3, progress=False)
    train_model(mc, train, val, tmp_path / "b", seed=3, progress=False, stop_at=1)
    resumed, _ = train_model(mc, train, val, tmp_path / "b", seed=3, progress=False, resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=f"parameter {k} differs after resume")


def test_bad_config_is_an_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nspacing_xyz = [1, 1, 3]\nshape_zyx = [7, 30, 30]\n[models.x]\n")
    assert main(["train", "--config", str(bad)]) == 1  # ConfigError
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 1
