"""Vendor flavours: how Siemens, GE and Philips name, number and tag the series of a bpMRI exam.

Taken from real exams (ProstateX Siemens Skyra, dcm_qa GE/Siemens/Philips): SeriesDescription
style, ImageType values, where the b-value lives (standard DiffusionBValue (0018,9087) and/or the
vendor's private tag), series numbering. Series selection must decide by this content.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

# Series keys written for every study; `t2w`, `dwi`, `adc`, `hbv` are the diagnostic ones.
SERIES_KEYS = ("localizer", "t2w_sag", "t2w_cor", "t2w", "dwi", "adc", "hbv", "t2w_repeat")
# Written on request (`radtriage phantom --dce`): a dynamic contrast-enhanced T1 series.
OPTIONAL_SERIES_KEYS = ("dce",)


@dataclass(frozen=True)
class SeriesStyle:
    description: str
    number: int
    image_type: tuple[str, ...]  # classic ImageType
    sequence_name: str = ""


@dataclass(frozen=True)
class Flavour:
    manufacturer: str
    model: str
    software: str
    field_strength: float
    series: dict[str, SeriesStyle]
    standard_b_tag: bool  # writes DiffusionBValue (0018,9087) on classic images

    def tag_b_value(self, ds: Dataset, b_value: float) -> None:
        """Put `b_value` where this vendor's classic images carry it."""
        if self.standard_b_tag:
            ds.DiffusionBValue = float(b_value)
        if self.manufacturer == "SIEMENS":
            block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
            block.add_new(0x0C, "IS", int(b_value))
        elif self.manufacturer.startswith("GE"):
            block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
            block.add_new(0x39, "IS", [int(b_value), 0, 0, 0])
        elif self.manufacturer.startswith("Philips"):
            block = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
            block.add_new(0x03, "FL", float(b_value))


_SIEMENS = Flavour(
    manufacturer="SIEMENS",
    model="Skyra",
    software="syngo MR E11",
    field_strength=3.0,
    standard_b_tag=True,
    series={
        "localizer": SeriesStyle("localizer", 1, ("ORIGINAL", "PRIMARY", "M", "NORM"), "*tfl2d1"),
        "t2w_sag": SeriesStyle("t2_tse_sag", 2, ("ORIGINAL", "PRIMARY", "M", "NORM"), "*tse2d1_25"),
        "t2w_cor": SeriesStyle("t2_tse_cor", 3, ("ORIGINAL", "PRIMARY", "M", "NORM"), "*tse2d1_25"),
        "t2w": SeriesStyle("t2_tse_tra", 4, ("ORIGINAL", "PRIMARY", "M", "NORM"), "*tse2d1_25"),
        "dwi": SeriesStyle(
            "ep2d_diff_b50_400_800_tra",
            5,
            ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"),
            "*ep_b{b}t",
        ),
        "adc": SeriesStyle(
            "ep2d_diff_b50_400_800_tra_ADC",
            6,
            ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"),
            "*ep_b50_800",
        ),
        "hbv": SeriesStyle(
            "ep2d_diff_b50_400_800_tra_CALC_BVAL",
            7,
            ("DERIVED", "PRIMARY", "DIFFUSION", "CALC_BVAL", "TRACEW"),
            "*ep_b50_800",
        ),
        "t2w_repeat": SeriesStyle("t2_tse_tra", 8, ("ORIGINAL", "PRIMARY", "M", "NORM")),
        "dce": SeriesStyle(
            "t1_twist_tra_dyn", 9, ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), "*fl3d1"
        ),
    },
)

_GE = Flavour(
    manufacturer="GE MEDICAL SYSTEMS",
    model="DISCOVERY MR750",
    software="DV26.0_R03",
    field_strength=3.0,
    standard_b_tag=False,  # classic GE images carry the b-value only in (0043,1039)
    series={
        "localizer": SeriesStyle("3-Plane Loc", 1, ("ORIGINAL", "PRIMARY", "OTHER")),
        "t2w_sag": SeriesStyle("Sag T2 FRFSE", 2, ("ORIGINAL", "PRIMARY", "OTHER")),
        "t2w_cor": SeriesStyle("Cor T2 FRFSE", 3, ("ORIGINAL", "PRIMARY", "OTHER")),
        "t2w": SeriesStyle("Ax T2 FRFSE", 4, ("ORIGINAL", "PRIMARY", "OTHER")),
        "dwi": SeriesStyle("Ax DWI", 5, ("ORIGINAL", "PRIMARY", "OTHER")),
        "adc": SeriesStyle(
            "Apparent Diffusion Coefficient (mm2/s)", 500, ("DERIVED", "PRIMARY", "ADC")
        ),
        "hbv": SeriesStyle("Ax DWI b1400 calc", 501, ("DERIVED", "PRIMARY", "DIFFUSION", "CALC")),
        "t2w_repeat": SeriesStyle("Ax T2 FRFSE", 6, ("ORIGINAL", "PRIMARY", "OTHER")),
        "dce": SeriesStyle("Ax DCE DISCO", 7, ("ORIGINAL", "PRIMARY", "OTHER")),
    },
)

_PHILIPS = Flavour(
    manufacturer="Philips Medical Systems",
    model="Ingenia",
    software="5.4.1",
    field_strength=3.0,
    standard_b_tag=True,
    series={
        "localizer": SeriesStyle("Survey", 101, ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE")),
        "t2w_sag": SeriesStyle("T2W_TSE_sag", 201, ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")),
        "t2w_cor": SeriesStyle("T2W_TSE_cor", 301, ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")),
        "t2w": SeriesStyle("T2W_TSE_ax", 401, ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")),
        "dwi": SeriesStyle("DWI_b50_400_800", 501, ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")),
        "adc": SeriesStyle("dADC", 502, ("DERIVED", "PRIMARY", "ADC", "ADC")),
        "hbv": SeriesStyle("DWI_b1400", 503, ("DERIVED", "PRIMARY", "DIFFUSION", "M", "SE")),
        "t2w_repeat": SeriesStyle("T2W_TSE_ax", 601, ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")),
        "dce": SeriesStyle("DCE_THRIVE_dyn", 701, ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE")),
    },
)

FLAVOURS: dict[str, Flavour] = {"siemens": _SIEMENS, "ge": _GE, "philips": _PHILIPS}
