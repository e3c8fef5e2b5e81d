"""SR/SEG samples for the interoperability tests, built once per session the way a user would:
`radtriage phantom` + `radtriage infer` (in-process ONNX Runtime, no Ray).

Samples: ``positive`` (one lesion), ``multi_lesion`` (three), ``negative``, ``not_analysed``
(the ADC series missing) and ``superseding`` (the complete study re-analysed after the
not-analysed SR was sent: its SR lists that one in Predecessor Documents Sequence).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cli.main import main as radtriage

# phantom seeds whose studies the bundled detector reports with these lesion counts
POSITIVE_SEED = 3  # one lesion
MULTI_LESION_SEED = 12  # three lesions
NEGATIVE_SEED = 7


@dataclass(frozen=True)
class Sample:
    name: str
    study: Path  # the source study folder
    out: Path  # infer's output folder (result.json, sr.dcm, seg.dcm)

    @property
    def sr(self) -> Path:
        return self.out / "sr.dcm"

    @property
    def seg(self) -> Path | None:
        path = self.out / "seg.dcm"
        return path if path.is_file() else None

    @property
    def result(self) -> dict[str, Any]:
        return json.loads((self.out / "result.json").read_text())

    def source_images(self) -> list[Path]:
        """The instances of the series the result used (T2W, ADC, high-b) or, when not
        analysed, every instance of the study."""
        import pydicom

        used = set((self.result.get("series_used") or {}).values())
        paths = []
        for path in sorted(self.study.rglob("*.dcm")):
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
            if not used or uid in used:
                paths.append(path)
        return paths


def _run(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = radtriage(list(argv))
    assert code == 0, f"radtriage {' '.join(argv)} exited {code}"


def _phantom(root: Path, seed: int, *flags: str) -> Path:
    _run("phantom", "--out", str(root), "--seed", str(seed), *flags)
    (study,) = [p for p in root.iterdir() if p.is_dir()]
    return study


def _reanalyse(study: Path, out: Path, previous_sr: Path) -> None:
    """A second analysis of `study` after `previous_sr` was sent (the node's re-run path)."""
    from cli.composition import build_analyser, build_engine
    from core.settings import load_settings
    from imaging.study_reader import scan_study

    settings = load_settings(None)
    engine = build_engine(settings.models, "cpu")
    build_analyser(settings, engine).analyse(scan_study(study), out, previous_sr)


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    root = tmp_path_factory.mktemp("interop")
    out: dict[str, Sample] = {}
    for name, seed, flags in (
        ("positive", POSITIVE_SEED, ("--positive",)),
        ("multi_lesion", MULTI_LESION_SEED, ("--positive",)),
        ("negative", NEGATIVE_SEED, ("--negative",)),
    ):
        study = _phantom(root / f"{name}-study", seed, *flags)
        _run("infer", str(study), "--out", str(root / name), "--device", "cpu")
        out[name] = Sample(name, study, root / name)
    # not analysed: the positive study without its ADC series (as if it had not arrived yet)
    partial = root / "not_analysed-study"
    shutil.copytree(out["positive"].study, partial, ignore=shutil.ignore_patterns("*_adc"))
    _run("infer", str(partial), "--out", str(root / "not_analysed"), "--device", "cpu")
    out["not_analysed"] = Sample("not_analysed", partial, root / "not_analysed")
    # superseding: the complete study analysed after the not-analysed SR was sent
    _reanalyse(out["positive"].study, root / "superseding", out["not_analysed"].sr)
    out["superseding"] = Sample("superseding", out["positive"].study, root / "superseding")
    return out


SAMPLE_NAMES = ("positive", "multi_lesion", "negative", "not_analysed", "superseding")
