"""ADC vs DWI vs high-b per vendor, decided from content (ImageType, units, pixel values,
b-values in the standard and the Siemens/GE/Philips private tags), not SeriesDescription; and
the body-part policy, which is data in the rules file."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from cli.main import main as radtriage
from core.domain import SeriesRole
from core.errors import WrongBodyPartError
from imaging.series_selection import load_rules, select_series, wrong_body_part
from imaging.study_reader import scan_study
from imaging.study_volumes import check_study

VENDORS = ("siemens", "ge", "philips")
# (folder suffix of the ADC map, of the computed/acquired high-b image) the phantom writes
SERIES = {"adc": "_adc", "hbv": "_hbv", "dwi": "_dwi"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for vendor in VENDORS:
        root = tmp_path_factory.mktemp(f"vendor-{vendor}")
        with contextlib.redirect_stdout(io.StringIO()):
            assert (
                radtriage(["phantom", "--out", str(root), "--vendor", vendor, "--seed", "5"]) == 0
            )
        (study,) = [p for p in root.iterdir() if p.is_dir()]
        out[vendor] = study
    return out


def _folder(study: Path, kind: str) -> Path:
    (folder,) = [p for p in study.iterdir() if p.is_dir() and p.name.endswith(SERIES[kind])]
    return folder


def _series_uid(folder: Path) -> str:
    first = next(iter(sorted(folder.glob("*.dcm"))))
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def _copy(study: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(
        study, dest, ignore=shutil.ignore_patterns(*(f"*{SERIES[d]}" for d in drop), "masks")
    )
    return dest


def _edit(folder: Path, change: Callable[[Dataset], None]) -> None:
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)


def _roles(study: Path) -> dict[SeriesRole, str]:
    selection = select_series(scan_study(study))
    return {role: s.series_instance_uid for role, s in selection.roles.items()}


@pytest.mark.parametrize("vendor", VENDORS)
def test_each_vendors_adc_map_and_high_b_image(phantoms: dict[str, Path], vendor: str) -> None:
    study = phantoms[vendor]
    roles = _roles(study)
    assert roles[SeriesRole.ADC] == _series_uid(_folder(study, "adc"))
    assert roles[SeriesRole.HBV] == _series_uid(_folder(study, "hbv"))


@pytest.mark.parametrize("vendor", VENDORS)
def test_without_computed_b_the_trace_image_is_high_b_never_the_adc(
    phantoms: dict[str, Path], vendor: str, tmp_path: Path
) -> None:
    """No computed b1400: the high-b image is the highest b of the acquired DWI, although the
    ADC map's header carries a b-value too (GE (0043,xx39), Philips (2001,xx03), Siemens
    (0019,xx0C))."""
    study = _copy(phantoms[vendor], tmp_path / "study", drop=("hbv",))
    selection = select_series(scan_study(study))
    assert selection.roles[SeriesRole.ADC].series_instance_uid == _series_uid(_folder(study, "adc"))
    hbv = selection.roles[SeriesRole.HBV]
    assert hbv.series_instance_uid == _series_uid(_folder(study, "dwi"))
    assert hbv.b_value == 800


def _ge_adc_without_adc_image_type(ds: Dataset) -> None:
    """A GE ADC map as the issue reported it: no ADC in ImageType, a b-value in the header."""
    ds.ImageType = ["DERIVED", "PRIMARY", "OTHER"]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SeriesDescription = "Apparent Diffusion Coefficient (mm²/s)"


def test_ge_adc_without_adc_image_type_is_adc_by_its_pixel_values(
    phantoms: dict[str, Path], tmp_path: Path
) -> None:
    study = _copy(phantoms["ge"], tmp_path / "study", drop=("hbv",))
    _edit(_folder(study, "adc"), _ge_adc_without_adc_image_type)
    selection = select_series(scan_study(study))
    adc = _series_uid(_folder(study, "adc"))
    assert selection.roles[SeriesRole.ADC].series_instance_uid == adc
    assert selection.roles[SeriesRole.HBV].series_instance_uid != adc
    choice = next(c for c in selection.choices if c.series_instance_uid == adc)
    assert "pixel values in the ADC range" in choice.reason


def test_adc_by_diffusivity_units(phantoms: dict[str, Path], tmp_path: Path) -> None:
    """Philips writes the unit in a Real World Value Mapping item; ImageType alone is not
    needed."""

    def units_only(ds: Dataset) -> None:
        ds.ImageType = ["DERIVED", "PRIMARY", "M", "SE"]
        item, code = Dataset(), Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "um2/s", "UCUM", "um2/s"
        item.MeasurementUnitsCodeSequence = [code]
        item.LUTLabel = "ADC"
        item.RealWorldValueFirstValueMapped, item.RealWorldValueLastValueMapped = 0, 4095
        item.RealWorldValueSlope, item.RealWorldValueIntercept = 1.0, 0.0
        ds.RealWorldValueMappingSequence = [item]

    study = _copy(phantoms["philips"], tmp_path / "study")
    _edit(_folder(study, "adc"), units_only)
    selection = select_series(scan_study(study))
    adc = _series_uid(_folder(study, "adc"))
    assert selection.roles[SeriesRole.ADC].series_instance_uid == adc
    choice = next(c for c in selection.choices if c.series_instance_uid == adc)
    assert "diffusivity units" in choice.reason


def test_derived_trace_image_without_trace_token_is_not_an_adc(
    phantoms: dict[str, Path], tmp_path: Path
) -> None:
    """A dark DERIVED diffusion image (Philips high-b, ImageType without TRACEW) stays a
    high-b candidate: its pixel values are far below the ADC range."""
    study = _copy(phantoms["philips"], tmp_path / "study", drop=("adc",))
    _edit(_folder(study, "hbv"), lambda ds: setattr(ds, "ImageType", ["DERIVED", "PRIMARY"]))
    selection = select_series(scan_study(study))
    assert SeriesRole.ADC not in selection.roles
    assert selection.roles[SeriesRole.HBV].series_instance_uid == _series_uid(_folder(study, "hbv"))


def test_prostatex_still_picks_t2w_10_adc_8_hbv_9(prostatex: Path) -> None:
    selection = select_series(scan_study(prostatex))
    numbers = {role: s.series_number for role, s in selection.roles.items()}
    assert numbers == {SeriesRole.T2W: 10, SeriesRole.ADC: 8, SeriesRole.HBV: 9}


def test_real_ge_and_siemens_epi_series_are_neither_adc_nor_high_b(shared_data: Path) -> None:
    """dcm_qa_nih: GE and Siemens EPI (fMRI, spin-echo field maps), no diffusion weighting."""
    root = shared_data / "dicom" / "dcm_qa_nih_ge_siemens"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    for vendor in ("20180918GE", "20180918Si"):
        selection = select_series(scan_study(root / vendor))
        assert selection.choices, vendor
        assert SeriesRole.ADC not in selection.roles, vendor
        assert SeriesRole.HBV not in selection.roles, vendor


# --- body-part policy ----------------------------------------------------------------------


def test_body_part_policy_is_the_rules_deny_list() -> None:
    rules = load_rules()
    assert wrong_body_part(["KNEE", "knee "], rules) == ["KNEE"]
    assert wrong_body_part(["HEAD", "Brain"], rules) == ["BRAIN", "HEAD"]
    assert wrong_body_part(["KNEE", "PELVIS"], rules) is None  # one pelvic series suffices
    assert wrong_body_part(["KNEE", ""], rules) is None  # unknown is no reason to refuse
    for part in ("PROSTATE", "PELVIS", "ABDOMEN", "ABDOMEN PELVIS", "BLADDER", "WHOLEBODY"):
        assert wrong_body_part([part], rules) is None, part
    assert wrong_body_part([], rules) is None


def test_body_part_policy_comes_from_the_rules_file(tmp_path: Path, phantoms: dict) -> None:
    data = json.loads(load_rules().source and Path(load_rules().source).read_text())
    data["body_part"]["deny"] = ["PROSTATE"]
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data))
    rules = load_rules(path)
    assert wrong_body_part(["prostate"], rules) == ["PROSTATE"]
    assert wrong_body_part(["KNEE"], rules) is None
    study = _copy(phantoms["siemens"], tmp_path / "study")
    for folder in (p for p in study.iterdir() if p.is_dir()):
        _edit(folder, lambda ds: setattr(ds, "BodyPartExamined", "PROSTATE"))
    scan = scan_study(study)
    check_study(scan, load_rules())  # the packaged rules accept it
    with pytest.raises(WrongBodyPartError, match="PROSTATE"):
        check_study(scan, rules)
