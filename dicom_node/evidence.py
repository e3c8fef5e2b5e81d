"""Evidence for an SR from a study scan: the headers already read, no second pass over the files."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicom_node.study_reader import StudyScan


def scan_evidence(scan: StudyScan) -> list[Dataset]:
    """Evidence datasets for an SR citing every instance of the scan, from the headers the scan
    already read: the first is a full header (patient and study modules), the others carry the
    four UIDs an SR's evidence needs."""
    out: list[Dataset] = []
    for series in scan.series:
        for inst in series.instances:
            if not out:
                first = Dataset(series.headers)
                first.SOPInstanceUID = inst.sop_instance_uid
                first.SOPClassUID = inst.sop_class_uid
                out.append(first)
                continue
            ds = Dataset()
            ds.StudyInstanceUID = scan.study_instance_uid
            ds.SeriesInstanceUID = series.series_instance_uid
            ds.SOPClassUID = inst.sop_class_uid
            ds.SOPInstanceUID = inst.sop_instance_uid
            out.append(ds)
    return out
