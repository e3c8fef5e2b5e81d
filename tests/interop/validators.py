"""Run the independent validators on one file set and return their findings as lines."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PIXELMED_JARS = ("/usr/share/java/pixelmed.jar",)
# PixelMed's compiled XSLT exceeds the JDK's default XPath limits (JDK 17+)
_JAVA_LIMITS = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)


@dataclass(frozen=True)
class Findings:
    errors: list[str]
    warnings: list[str]
    output: str


def _split(output: str, error: str, warning: str) -> Findings:
    lines = [line.strip() for line in output.splitlines()]
    return Findings(
        errors=[line for line in lines if re.match(error, line)],
        warnings=[line for line in lines if re.match(warning, line)],
        output=output,
    )


def pixelmed_jar() -> str | None:
    return next((j for j in PIXELMED_JARS if Path(j).is_file()), None)


def dicom_sr_validator(path: Path) -> Findings:
    """PixelMed DicomSRValidator with template-id and content-item-order checks."""
    jar = pixelmed_jar()
    assert jar is not None
    run = subprocess.run(
        [
            "java",
            *_JAVA_LIMITS,
            "-cp",
            jar,
            "com.pixelmed.validate.DicomSRValidator",
            "-checktemplateid",
            "-checkcontentitemorder",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = run.stdout + run.stderr
    assert "IOD validation complete" in out, out[-2000:]
    return _split(out, r"^Error", r"^Warning")


def dciodvfy(path: Path) -> Findings:
    run = subprocess.run(
        [shutil.which("dciodvfy") or "dciodvfy", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return _split(run.stdout + run.stderr, r"^Error", r"^Warning")


def dcentvfy(paths: list[Path]) -> Findings:
    run = subprocess.run(
        [shutil.which("dcentvfy") or "dcentvfy", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return _split(run.stdout + run.stderr, r"^Error", r"^Warning")
