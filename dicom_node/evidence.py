"""Evidence for an SR from headers already read (a study scan) or from the index: no second
pass over the files, and no cap on how many instances an SR cites."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset

from imaging.study_reader import StudyScan

# (Series Instance UID, SOP Class UID, SOP Instance UID) of one cited instance.
CitedInstance = tuple[str, str, str]


def cited_evidence(header: Dataset, instances: Iterable[CitedInstance]) -> list[Dataset]:
    """Evidence datasets citing `instances`: the first carries `header` (patient and study
    modules of the study), the others only the four UIDs an SR's evidence needs."""
    out: list[Dataset] = []
    study_uid = str(header.get("StudyInstanceUID", ""))
    for series_uid, sop_class_uid, sop_instance_uid in instances:
        if not out:
            first = Dataset(header)
            first.SeriesInstanceUID = series_uid
            first.SOPInstanceUID = sop_instance_uid
            first.SOPClassUID = sop_class_uid
            out.append(first)
            continue
        ds = Dataset()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPClassUID = sop_class_uid
        ds.SOPInstanceUID = sop_instance_uid
        out.append(ds)
    return out


def scan_evidence(scan: StudyScan) -> list[Dataset]:
    """Evidence citing every instance of the scan, from the headers the scan already read."""
    if not scan.series:
        return []
    header = Dataset(scan.series[0].headers)
    header.StudyInstanceUID = scan.study_instance_uid
    return cited_evidence(
        header,
        (
            (series.series_instance_uid, inst.sop_class_uid, inst.sop_instance_uid)
            for series in scan.series
            for inst in series.instances
        ),
    )
