"""Model repository, loader integrity/signature checks, `radtriage models` and `export` output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from cli.main import main
from core.errors import (
    InputError,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelSignatureError,
)
from models.metadata import METADATA_FILE, MODEL_FILE, content_digest, read_metadata
from models.onnx_runner import OnnxModel
from models.repository import (
    GateDecision,
    ModelRepository,
    PromotionRefusedError,
    sha256_file,
)
from tests.models.conftest import SPEC_ZYX


def test_export_writes_self_describing_version(tiny_repo: Path) -> None:
    folder = tiny_repo / "cspca_detector" / "1.0.0"
    md = read_metadata(folder / METADATA_FILE)
    assert md.sha256 == sha256_file(folder / MODEL_FILE)
    assert md.size_bytes == (folder / MODEL_FILE).stat().st_size
    assert md.parity is not None and md.parity.max_abs_diff <= 1e-3
    assert md.opset is not None and md.opset >= 17
    assert md.inputs[0].shape == ("batch", 3, *SPEC_ZYX)
    assert md.disclaimer and "NOT FOR CLINICAL USE" in md.disclaimer
    assert md.thresholds is not None and md.thresholds.source == "test"
    card = (folder / "model_card.md").read_text()
    assert "NOT FOR CLINICAL USE" in card and md.sha256 in card
    graph = onnx.load(str(folder / MODEL_FILE))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_load_and_run_dynamic_batch(tiny_repo: Path) -> None:
    model = OnnxModel.load(tiny_repo, "cspca_detector:1.0.0", device="cpu", threads=1)
    assert model.providers == ["CPUExecutionProvider"]
    assert model.ref.version == "1.0.0" and not model.ref.clinical_use
    for n in (1, 3):
        out = model.run(np.zeros((n, 3, *SPEC_ZYX), np.float32))
        assert out.shape == (n, 1, *SPEC_ZYX)
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_corrupted_model_is_refused_naming_file_and_sha(tiny_repo: Path) -> None:
    folder = tiny_repo / "cspca_detector" / "1.0.0"
    expected = read_metadata(folder / METADATA_FILE).sha256
    data = bytearray((folder / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError) as err:
        OnnxModel.load(tiny_repo, "cspca_detector:1.0.0", device="cpu")
    assert str(folder / MODEL_FILE) in err.value.message
    assert expected in err.value.message


def test_swapped_model_is_refused(tiny_repo: Path) -> None:
    a = tiny_repo / "cspca_detector" / "1.0.0"
    b = tiny_repo / "cspca_detector" / "1.1.0"
    shutil.copyfile(b / MODEL_FILE, a / MODEL_FILE)  # a valid ONNX file, but not this version's
    with pytest.raises(ModelIntegrityError, match=read_metadata(a / METADATA_FILE).sha256):
        OnnxModel.load(tiny_repo, "cspca_detector:1.0.0", device="cpu")


def test_missing_model_file_is_refused(tiny_repo: Path) -> None:
    (tiny_repo / "prostate_gland" / "1.0.0" / MODEL_FILE).unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        OnnxModel.load(tiny_repo, "prostate_gland:1.0.0", device="cpu")


@pytest.mark.parametrize(
    "edit",
    [
        lambda md: md["inputs"][0].update(name="t2w_adc_hbv"),
        lambda md: md["inputs"][0].update(shape=["batch", 3, 8, 64, 64]),
        lambda md: md["outputs"][0].update(name="logits"),
    ],
    ids=["input-name", "input-shape", "output-name"],
)
def test_signature_mismatch_is_refused(tiny_repo: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = tiny_repo / "cspca_detector" / "1.0.0" / METADATA_FILE
    md = json.loads(path.read_text())
    edit(md)
    md.pop("version_digest", None)  # an unsealed (legacy) file: only the signature check is left
    path.write_text(json.dumps(md))  # sha256 still matches: only the signature is wrong
    with pytest.raises(ModelSignatureError, match="metadata"):
        OnnxModel.load(tiny_repo, "cspca_detector:1.0.0", device="cpu")


def test_a_sealed_version_edited_in_place_is_refused(tiny_repo: Path) -> None:
    """Thresholds cannot change under a version: any edit of a sealed metadata.json (here the
    urgent threshold, the ONNX file untouched) makes the version unloadable, with what to do."""
    path = tiny_repo / "cspca_detector" / "1.0.0" / METADATA_FILE
    md = json.loads(path.read_text())
    assert md["version_digest"] == read_metadata(path).content_digest()
    md["thresholds"]["urgent"] = round(md["thresholds"]["urgent"] / 2, 6)
    path.write_text(json.dumps(md))
    with pytest.raises(ModelIntegrityError, match=r"immutable.*--write-thresholds"):
        ModelRepository(tiny_repo).resolve("cspca_detector:1.0.0")
    with pytest.raises(ModelIntegrityError):
        OnnxModel.load(tiny_repo, "cspca_detector:1.0.0", device="cpu")


def test_a_seal_written_before_a_schema_key_was_added_stays_valid(tiny_repo: Path) -> None:
    """The seal is over the file as written: a later schema key with a default (here the
    file lacks `derived_from`) neither breaks old sealed versions nor lets an edit pass."""
    path = tiny_repo / "cspca_detector" / "1.0.0" / METADATA_FILE
    doc = json.loads(path.read_text())
    del doc["derived_from"]
    doc["version_digest"] = content_digest(doc)
    path.write_text(json.dumps(doc, indent=2))
    md = read_metadata(path)
    assert md.derived_from is None and md.digest == doc["version_digest"]
    doc["description"] = doc.get("description", "") + " edited"
    path.write_text(json.dumps(doc, indent=2))
    with pytest.raises(ModelIntegrityError):
        read_metadata(path)


def test_derive_writes_a_new_sealed_version_and_leaves_the_original(tiny_repo: Path) -> None:
    repo = ModelRepository(tiny_repo)
    source = repo.resolve("cspca_detector:1.0.0")
    before = {p.name: p.read_bytes() for p in source.path.iterdir()}
    assert source.metadata.thresholds is not None
    thresholds = source.metadata.thresholds.model_copy(update={"urgent": 0.9, "source": "test"})
    first = repo.derive("cspca_detector:1.0.0", {"thresholds": thresholds})
    second = repo.derive("cspca_detector:1.0.0-t1", {"thresholds": thresholds})
    assert (first.metadata.version, second.metadata.version) == ("1.0.0-t1", "1.0.0-t2")
    assert first.metadata.derived_from == "cspca_detector:1.0.0"
    assert first.metadata.thresholds is not None and first.metadata.thresholds.urgent == 0.9
    assert first.metadata.digest != source.metadata.digest
    assert first.metadata.model_ref().digest == first.metadata.version_digest
    assert {p.name: p.read_bytes() for p in source.path.iterdir()} == before
    repo.verify("cspca_detector:1.0.0-t1")  # the model file came along, intact
    assert repo.versions("cspca_detector") == ["1.0.0", "1.0.0-t1", "1.0.0-t2", "1.1.0"]
    with pytest.raises(InputError, match="immutable"):
        repo.derive("cspca_detector:1.0.0", {}, new_version="1.0.0-t1")
    with pytest.raises(InputError):
        repo.derive("cspca_detector:1.0.0", {}, new_version="../escape")
    assert not list((tiny_repo / "cspca_detector").glob(".*.tmp"))


def test_resolve_and_promote(tiny_repo: Path) -> None:
    repo = ModelRepository(tiny_repo)
    assert repo.names() == ["cspca_detector", "prostate_gland"]
    assert repo.versions("cspca_detector") == ["1.0.0", "1.1.0"]
    with pytest.raises(ModelNotFoundError, match="no promoted version"):
        repo.resolve("cspca_detector")
    with pytest.raises(ModelNotFoundError, match="not found"):
        repo.resolve("cspca_detector:9.9")
    with pytest.raises(ModelNotFoundError, match="no model named"):
        repo.resolve("nope")
    with pytest.raises(InputError):
        repo.resolve("bad name:1")
    repo.promote("cspca_detector:1.0.0", reason="first")
    with pytest.raises(PromotionRefusedError, match="needs a gate decision"):
        repo.promote("cspca_detector:1.1.0", reason="no gate")
    forced = GateDecision(
        "forced", "cspca_detector", "1.1.0", "1.0.0", "no evidence", force_reason="better"
    )
    repo.promote("cspca_detector:1.1.0", forced)
    assert repo.resolve("cspca_detector").metadata.version == "1.1.0"
    log = repo.promotion_log("cspca_detector")
    assert [e["version"] for e in log] == ["1.0.0", "1.1.0"]
    assert log[1]["previous"] == "1.0.0" and log[1]["reason"] == "no evidence"
    assert log[1]["gate"]["outcome"] == "forced" and log[1]["gate"]["force_reason"] == "better"
    assert log[0]["gate"]["outcome"] == "first"


def test_promote_needs_an_applicable_gate_decision(tiny_repo: Path) -> None:
    repo = ModelRepository(tiny_repo)
    repo.promote("cspca_detector:1.0.0")
    refused = GateDecision("refused", "cspca_detector", "1.1.0", "1.0.0", "worse")
    with pytest.raises(PromotionRefusedError, match="refused"):
        repo.promote("cspca_detector:1.1.0", refused)
    stale = GateDecision("passed", "cspca_detector", "1.1.0", None, "ok", evidence={"x": 1})
    with pytest.raises(PromotionRefusedError, match="run the gate again"):
        repo.promote("cspca_detector:1.1.0", stale)
    other = GateDecision("passed", "cspca_detector", "1.0.0", "1.0.0", "ok", evidence={"x": 1})
    with pytest.raises(PromotionRefusedError, match=r"not cspca_detector:1\.1\.0"):
        repo.promote("cspca_detector:1.1.0", other)
    with pytest.raises(ValueError, match="force_reason"):
        GateDecision("forced", "cspca_detector", "1.1.0", "1.0.0", "worse", force_reason=" ")
    with pytest.raises(ValueError, match="evidence"):
        GateDecision("passed", "cspca_detector", "1.1.0", "1.0.0", "trust me")
    assert repo.promoted("cspca_detector") == "1.0.0"
    assert len(repo.promotion_log("cspca_detector")) == 1


def test_hand_edited_production_file_is_not_served(tiny_repo: Path) -> None:
    """What the server rolls out (`promoted`) is only ever a gated, logged promotion."""
    repo = ModelRepository(tiny_repo)
    repo.promote("cspca_detector:1.0.0")
    production = tiny_repo / "cspca_detector" / "production.json"
    entry = json.loads(production.read_text())
    production.write_text(json.dumps({**entry, "version": "1.1.0"}))
    assert repo.promoted("cspca_detector") is None
    with pytest.raises(ModelNotFoundError, match="no promoted version"):
        repo.resolve("cspca_detector")
    # a legacy record without a gate decision ("no evaluation gate ran") does not count either
    legacy = {**entry, "gate": {"allowed": None, "reason": "no evaluation gate ran"}}
    production.write_text(json.dumps(legacy))
    log = tiny_repo / "cspca_detector" / "promotions.jsonl"
    log.write_text(log.read_text() + json.dumps(legacy) + "\n")
    assert repo.promoted("cspca_detector") is None


def test_rollback_only_to_a_version_promoted_before(tiny_repo: Path) -> None:
    repo = ModelRepository(tiny_repo)
    repo.promote("cspca_detector:1.0.0")
    forced = GateDecision("forced", "cspca_detector", "1.1.0", "1.0.0", "x", force_reason="y")
    repo.promote("cspca_detector:1.1.0", forced)
    assert repo.rollback_targets("cspca_detector") == ["1.1.0", "1.0.0"]
    back = GateDecision(
        "rollback", "cspca_detector", "1.0.0", "1.1.0", "back", force_reason="alert"
    )
    repo.promote("cspca_detector:1.0.0", back)
    assert repo.promoted("cspca_detector") == "1.0.0"
    assert repo.promotion_log("cspca_detector")[-1]["gate"]["outcome"] == "rollback"


def test_promote_refuses_a_corrupted_version(tiny_repo: Path) -> None:
    (tiny_repo / "prostate_gland" / "1.0.0" / MODEL_FILE).write_bytes(b"not onnx")
    with pytest.raises(ModelIntegrityError):
        ModelRepository(tiny_repo).promote("prostate_gland:1.0.0")
    assert ModelRepository(tiny_repo).promoted("prostate_gland") is None


def test_models_cli_list_and_promote(tiny_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["models", "--repository", str(tiny_repo)]
    assert main([*base, "promote", "cspca_detector:1.1.0", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["version"] == "1.1.0" and entry["gate"]["allowed"] is True
    assert main([*base, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    promoted = {(r["name"], r["version"]) for r in rows if r["promoted"]}
    assert promoted == {("cspca_detector", "1.1.0")}
    assert main([*base, "promote", "cspca_detector", "--json"]) == 2  # needs NAME:VERSION
    assert main([*base, "promote", "cspca_detector:1.0.0", "--force"]) == 2  # needs --reason
    capsys.readouterr()
    assert main([*base, "promote", "cspca_detector:1.0.0", "--json"]) == 1  # no evidence
    assert "no evidence" in json.loads(capsys.readouterr().out)["error"]["message"]
    args = [*base, "promote", "cspca_detector:1.0.0", "--force", "--reason", "site data", "--json"]
    assert main(args) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["gate"]["outcome"] == "forced" and entry["gate"]["force_reason"] == "site data"
    args = [*base, "rollback", "cspca_detector:1.1.0", "--reason", "alert fired", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["gate"]["outcome"] == "rollback"
    assert main([*base, "rollback", "prostate_gland:1.0.0", "--reason", "x"]) == 2  # never promoted
    assert main([*base, "log", "cspca_detector", "--json"]) == 0
    log = json.loads(capsys.readouterr().out)["promotions"]
    assert [e["gate"]["outcome"] for e in log] == ["first", "forced", "rollback"]
    assert main([*base, "list"]) == 0
    assert "* cspca_detector:1.1.0" in capsys.readouterr().out  # rolled back to it


def test_bundled_repository_is_valid() -> None:
    repo = ModelRepository()
    if not repo.names():
        pytest.skip("no bundled models yet")
    for name in ("cspca_detector", "prostate_gland"):
        version = repo.verify(name)
        md = version.metadata
        assert md.size_bytes is not None and md.size_bytes < 20_000_000
        assert not md.clinical_use and md.training_data.get("synthetic") is True
        assert md.parity is not None and md.parity.max_abs_diff <= 1e-3


def test_bundled_pair_shares_the_pi_cai_grid_and_every_detector_has_a_partner() -> None:
    repo = ModelRepository()
    detector, gland = repo.resolve("cspca_detector"), repo.resolve("prostate_gland")
    spec = detector.metadata.input_spec
    assert spec.same_grid(gland.metadata.input_spec)
    assert spec.shape_zyx == (20, 256, 256) and spec.spacing_xyz == (0.5, 0.5, 3.0)
    assert detector.metadata.calibration is not None  # calibrated three bands ship with it
    t = detector.metadata.thresholds
    assert t is not None and t.urgent > t.soon
    for version in repo.versions("cspca_detector"):
        ref = f"cspca_detector:{version}"
        partner = repo.resolve(repo.partner(ref, "prostate_gland"))
        assert partner.metadata.input_spec.same_grid(repo.resolve(ref).metadata.input_spec)
