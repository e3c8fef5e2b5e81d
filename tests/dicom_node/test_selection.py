"""Series selection rules, table-driven on synthetic headers, and on the real ProstateX exam."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from core.domain import SeriesRole
from core.errors import ConfigError
from imaging.series_selection import (
    load_rules,
    select_series,
    series_geometrically_complete,
)
from imaging.study_reader import SeriesInfo, StudyScan, instance_info, scan_study

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
STUDY = generate_uid()


def _series(
    number: int,
    description: str = "",
    *,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "NORM"),
    orientation: tuple[float, ...] = AXIAL,
    slices: int = 20,
    b_values: tuple[float | None, ...] = (None,),
    vendor: str = "standard",
    echo_time: float | None = 100.0,
    repetition_time: float | None = 4000.0,
    scanning: str | None = "SE",
    acquisition_time: str = "120000",
    temporal_positions: int = 1,
    mixed_orientation: bool = False,
    modality: str = "MR",
    extra: dict[str, object] | None = None,
) -> SeriesInfo:
    """A synthetic series of header-only datasets (one per slice, b-value and time point)."""
    uid = generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    instances = []
    first = None
    k = 0
    for t in range(temporal_positions):
        for b in b_values:
            for z in range(slices):
                ds = Dataset()
                ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
                ds.SOPInstanceUID = generate_uid()
                ds.StudyInstanceUID = STUDY
                ds.SeriesInstanceUID = uid
                ds.SeriesNumber = number
                ds.SeriesDescription = description
                ds.Modality = modality
                ds.InstanceNumber = k + 1
                ds.ImageType = list(image_type)
                ds.Rows, ds.Columns = 64, 64
                ds.PixelSpacing = [0.5, 0.5]
                iop = orientation
                if mixed_orientation and z % 3 == 1:
                    iop = SAGITTAL
                ds.ImageOrientationPatient = list(iop)
                ds.ImagePositionPatient = [float(v) for v in normal * 3.0 * z]
                ds.AcquisitionTime = acquisition_time
                if echo_time is not None:
                    ds.EchoTime = echo_time
                if repetition_time is not None:
                    ds.RepetitionTime = repetition_time
                if scanning is not None:
                    ds.ScanningSequence = scanning
                if temporal_positions > 1:
                    ds.NumberOfTemporalPositions = temporal_positions
                    ds.TemporalPositionIdentifier = t + 1
                if b is not None:
                    _set_b_value(ds, b, vendor)
                for key, value in (extra or {}).items():
                    setattr(ds, key, value)
                instances.append(instance_info(Path(f"mem/{uid}/{k}.dcm"), ds))
                first = first or ds
                k += 1
    assert first is not None
    return SeriesInfo(uid, number, description, modality, instances, first, STUDY)


def _set_b_value(ds: Dataset, b: float, vendor: str) -> None:
    if vendor == "standard":
        ds.DiffusionBValue = b
    elif vendor == "siemens":
        block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        block.add_new(0x0C, "UN", f"{int(b)}".encode())  # as it arrives untyped
    elif vendor == "ge":
        block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
        block.add_new(0x39, "IS", [f"{1_000_000_000 + int(b)}", "8", "0", "0"])
    elif vendor == "philips":
        block = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
        block.add_new(0x03, "FL", float(b))
    else:
        raise ValueError(vendor)


def _t2(number: int, **kw: object) -> SeriesInfo:
    return _series(number, "t2_tse_tra", **kw)  # type: ignore[arg-type]


def _adc(number: int, **kw: object) -> SeriesInfo:
    kw.setdefault("image_type", ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"))
    kw.setdefault("scanning", "EP")
    kw.setdefault("echo_time", 60.0)
    return _series(number, "ep2d_diff_ADC", **kw)  # type: ignore[arg-type]


def _dwi(number: int, b_values: tuple[float, ...], **kw: object) -> SeriesInfo:
    kw.setdefault("image_type", ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"))
    kw.setdefault("scanning", "EP")
    kw.setdefault("echo_time", 60.0)
    return _series(number, "ep2d_diff_tra", b_values=b_values, **kw)  # type: ignore[arg-type]


def _select(*series: SeriesInfo):  # type: ignore[no-untyped-def]
    return select_series(StudyScan(STUDY, list(series)))


def _roles(selection) -> dict[str, tuple[int | None, float | None]]:  # type: ignore[no-untyped-def]
    return {r.value: (s.series_number, s.b_value) for r, s in selection.roles.items()}


CASES = [
    pytest.param(
        [_t2(3), _adc(5), _dwi(4, (50.0, 400.0, 800.0)), _dwi(6, (1400.0,))],
        {"t2w": (3, None), "adc": (5, None), "hbv": (6, None)},
        id="siemens-like: computed b1400 beats acquired b800",
    ),
    pytest.param(
        [
            _t2(3, acquisition_time="120000"),
            _t2(9, acquisition_time="121500"),
            _adc(5),
            _dwi(4, (0.0, 1500.0)),
        ],
        {"t2w": (9, None), "adc": (5, None), "hbv": (4, 1500.0)},
        id="duplicated T2W: later acquisition wins; multi-b DWI split to b1500",
    ),
    pytest.param(
        [
            _series(2, "t2_tse_sag", orientation=SAGITTAL),
            _series(3, "t2_tse_cor", orientation=CORONAL),
            _t2(4),
            _adc(5),
            _dwi(6, (50.0, 1000.0)),
        ],
        {"t2w": (4, None), "adc": (5, None), "hbv": (6, 1000.0)},
        id="sag/cor T2W ignored",
    ),
    pytest.param(
        [
            _series(1, "localizer", mixed_orientation=True, slices=9),
            _series(
                7,
                "t1_vibe_dce",
                echo_time=1.4,
                repetition_time=4.0,
                scanning="GR",
                temporal_positions=5,
                extra={"ContrastBolusAgent": "Gd"},
            ),
            _t2(4),
            _adc(5),
            _dwi(6, (50.0, 1400.0)),
        ],
        {"t2w": (4, None), "adc": (5, None), "hbv": (6, 1400.0)},
        id="localizer and DCE ignored",
    ),
    pytest.param(
        [
            _t2(4),
            _series(
                8,
                "ep2d_diff_FA",
                image_type=("DERIVED", "PRIMARY", "DIFFUSION", "FA"),
                b_values=(1000.0,),
                scanning="EP",
            ),
            _adc(5),
            _dwi(6, (50.0, 800.0)),
        ],
        {"t2w": (4, None), "adc": (5, None), "hbv": (6, 800.0)},
        id="FA map never hbv",
    ),
    pytest.param(
        [_t2(4), _adc(5, vendor="ge", b_values=(1000.0,)), _dwi(6, (0.0, 1400.0), vendor="ge")],
        {"t2w": (4, None), "adc": (5, None), "hbv": (6, 1400.0)},
        id="GE (0043,1039) with 1e9 offset",
    ),
    pytest.param(
        [_t2(4), _adc(5), _dwi(6, (0.0, 1000.0, 2000.0), vendor="philips")],
        {"t2w": (4, None), "adc": (5, None), "hbv": (6, 2000.0)},
        id="Philips (2001,1003) FL",
    ),
    pytest.param(
        [
            _t2(4),
            _adc(5),
            _dwi(6, (50.0, 800.0), vendor="siemens"),
            _dwi(7, (1400.0,), vendor="siemens"),
        ],
        {"t2w": (4, None), "adc": (5, None), "hbv": (7, None)},
        id="Siemens (0019,100C) untyped bytes",
    ),
    pytest.param(
        [_series(4, "ax t2"), _series(5, "zzz")],
        {"t2w": (4, None)},
        id="SeriesDescription only breaks a tie",
    ),
    pytest.param(
        [_series(5, "zzz", echo_time=None, repetition_time=None, scanning=None)],
        {"t2w": (5, None)},
        id="T2W without TE/TR/sequence in the header still qualifies",
    ),
    pytest.param(
        [_t2(4), _dwi(6, (50.0, 400.0))],
        {"t2w": (4, None)},
        id="no ADC, b400 too low for hbv",
    ),
]


@pytest.mark.parametrize(("series", "expected"), CASES)
def test_selection_rules(series: list[SeriesInfo], expected: dict[str, tuple]) -> None:
    selection = _select(*series)
    assert _roles(selection) == expected
    assert len(selection.choices) == len(series)
    for choice in selection.choices:
        assert choice.reason.startswith(choice.role.value + ":")


def test_every_decision_has_a_specific_reason() -> None:
    sag = _series(2, "t2_tse_sag", orientation=SAGITTAL)
    selection = _select(
        sag, _t2(3), _t2(4, acquisition_time="130000"), _adc(5), _dwi(6, (0.0, 1400.0))
    )
    reasons = {c.series_number: c.reason for c in selection.choices}
    assert "not axial (sagittal)" in reasons[2]
    assert "series 4 preferred" in reasons[3] and "later acquisition" in reasons[3]
    assert reasons[6].startswith("hbv:") and "b=1400" in reasons[6]
    assert selection.missing_roles() == []


def test_missing_roles_are_reported() -> None:
    selection = _select(_t2(4))
    assert selection.missing_roles() == [SeriesRole.ADC, SeriesRole.HBV]


def test_rules_are_data(tmp_path: Path) -> None:
    data = json.loads(Path(load_rules().source).read_text())
    # Tighten the hbv b-value floor: the b1000 candidate no longer qualifies.
    for c in data["roles"]["hbv"]["require"]:
        if c["feature"] == "b_value":
            c["value"] = 1400
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data))
    series = [_t2(4), _adc(5), _dwi(6, (50.0, 1000.0))]
    assert "hbv" in _roles(_select(*series))
    assert "hbv" not in _roles(select_series(StudyScan(STUDY, series), load_rules(path)))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["roles"]["t2w"]["require"][0].update(op="like"),
        lambda d: d.pop("role_order"),
        lambda d: d["roles"]["adc"]["rank"][0].update(order="up"),
    ],
)
def test_invalid_rules_raise_config_error(tmp_path: Path, mutate) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(Path(load_rules().source).read_text())
    mutate(data)
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError):
        load_rules(path)


def test_geometric_completeness() -> None:
    whole = _t2(4)
    assert series_geometrically_complete(whole)
    gap = _t2(5)
    del gap.instances[7]
    assert not series_geometrically_complete(gap)
    announced = _t2(6, extra={"ImagesInAcquisition": 25})
    assert not series_geometrically_complete(announced)
    assert series_geometrically_complete(_dwi(7, (50.0, 400.0, 800.0)))
    assert not series_geometrically_complete(_series(1, "loc", mixed_orientation=True))


def test_prostatex_selection(prostatex: Path) -> None:
    scan = scan_study(prostatex)
    selection = select_series(scan)
    roles = {r.value: s.series_number for r, s in selection.roles.items()}
    assert roles["t2w"] in (6, 10)
    assert roles["adc"] == 8
    assert roles["hbv"] == 9
    by_number = {c.series_number: c for c in selection.choices}
    assert by_number[4].role is SeriesRole.OTHER and "sagittal" in by_number[4].reason
    assert "localizer" in by_number[1].reason
    assert by_number[7].role is SeriesRole.OTHER and "50/400/800" in by_number[7].reason
    assert all(series_geometrically_complete(s) for s in scan.series if s.series_number >= 3)
