"""Template-level validation by implementations we did not write: PixelMed's
DicomSRValidator (TID 1500 rows, template ids, content item order), dicom3tools' dciodvfy
(IOD modules) and dcentvfy (SR + SEG + source images describe the same patient/study/
series/frame of reference). 0 errors on every kind of SR/SEG we write; the warnings we keep
are the ones the conformance statement lists (section 7)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import require_tool
from tests.interop.conftest import SAMPLE_NAMES, Sample
from tests.interop.validators import dcentvfy, dciodvfy, dicom_sr_validator, pixelmed_jar

pytestmark = pytest.mark.integration

# Kept warnings, each with the reason in docs/conformance.md section 7.
PIXELMED_KEPT = (
    r"Content Item not in template",  # our TEXT/CODE/SCOORD3D extensions of TID 1501/1411
    r'has different code meaning \("Source Series for Segmentation"\)',  # highdicom's meaning
)
DCIODVFY_KEPT = (r"Unrecognized defined term <99RADTRIAGE>",)
DCENTVFY_KEPT: tuple[str, ...] = (
    r"Different information entities for attribute - Element=<AccessionNumber>",
)


def _unexpected(warnings: list[str], kept: tuple[str, ...]) -> list[str]:
    return [w for w in warnings if not any(re.search(k, w) for k in kept)]


@pytest.fixture(scope="module")
def pixelmed() -> str:
    require_tool("java")
    jar = pixelmed_jar()
    if jar is None:
        pytest.skip("PixelMed not installed (apt: pixelmed-apps, see .ci/run)")
    return jar


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_pixelmed_sr_validator_finds_no_error(
    samples: dict[str, Sample], name: str, pixelmed: str
) -> None:
    findings = dicom_sr_validator(samples[name].sr)
    assert "Found Root Template TID_1500" in findings.output
    assert findings.errors == [], "\n".join(findings.errors)
    assert _unexpected(findings.warnings, PIXELMED_KEPT) == []


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_dciodvfy_finds_no_error_in_sr_and_seg(samples: dict[str, Sample], name: str) -> None:
    require_tool("dciodvfy")
    sample = samples[name]
    for path in [sample.sr] + ([sample.seg] if sample.seg else []):
        findings = dciodvfy(path)
        assert findings.errors == [], f"{path.name}: " + "\n".join(findings.errors)
        assert _unexpected(findings.warnings, DCIODVFY_KEPT) == [], path.name


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_dcentvfy_sr_seg_and_sources_are_one_consistent_study(
    samples: dict[str, Sample], name: str
) -> None:
    require_tool("dcentvfy")
    sample = samples[name]
    files = [sample.sr] + ([sample.seg] if sample.seg else []) + sample.source_images()
    findings = dcentvfy(files)
    assert findings.errors == [], "\n".join(findings.errors)
    assert _unexpected(findings.warnings, DCENTVFY_KEPT) == []


def test_samples_cover_every_kind_of_report(samples: dict[str, Sample]) -> None:
    import pydicom

    results = {n: s.result for n, s in samples.items()}
    assert results["positive"]["priority"] != "not_analysed" and results["positive"]["lesions"]
    assert len(results["multi_lesion"]["lesions"]) >= 2
    assert results["negative"]["lesions"] == []
    assert results["not_analysed"]["priority"] == "not_analysed"
    assert samples["not_analysed"].seg is None
    superseding = pydicom.dcmread(samples["superseding"].sr)
    previous = pydicom.dcmread(samples["not_analysed"].sr)
    listed = [
        str(i.ReferencedSOPInstanceUID)
        for st in superseding.PredecessorDocumentsSequence
        for se in st.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    ]
    assert listed == [str(previous.SOPInstanceUID)]
