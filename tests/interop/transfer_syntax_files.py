"""Which real file proves each transfer syntax of docs/conformance.md section 3.

Each entry: syntax UID -> (file under ../shared/data/dicom, reference file with the same
pixels uncompressed or None, how close a lossy decode must be, DCMTK command that makes the
file from the reference or None). Where no real file of a syntax exists in ../shared/data,
DCMTK (an implementation we did not write) encodes the real Siemens slice into it at test time.
"""

from __future__ import annotations

TS_DIR = "dcm_qa_ts_siemens_transfer_syntaxes"
PYDICOM = "pypi_pydicom_test_files"
SIEMENS = f"{TS_DIR}/1.dcm"  # Explicit VR Little Endian, the reference pixels

# uid: (source, reference, min correlation (1.0 = identical), dcmtk encoder argv or None)
INBOUND: dict[str, tuple[str, str | None, float, tuple[str, ...] | None]] = {
    "1.2.840.10008.1.2": (f"{TS_DIR}/2.dcm", SIEMENS, 1.0, None),
    "1.2.840.10008.1.2.1": (SIEMENS, SIEMENS, 1.0, None),
    "1.2.840.10008.1.2.1.99": (SIEMENS, SIEMENS, 1.0, ("dcmconv", "+td")),
    "1.2.840.10008.1.2.2": (f"{TS_DIR}/3.dcm", SIEMENS, 1.0, None),
    "1.2.840.10008.1.2.4.50": (SIEMENS, SIEMENS, 0.99, ("dcmcjpeg", "+eb")),
    "1.2.840.10008.1.2.4.51": (f"{PYDICOM}/JPGExtended.dcm", None, 0.0, None),
    "1.2.840.10008.1.2.4.57": (SIEMENS, SIEMENS, 1.0, ("dcmcjpeg", "+el")),
    "1.2.840.10008.1.2.4.70": (f"{TS_DIR}/5.dcm", SIEMENS, 1.0, None),
    "1.2.840.10008.1.2.4.80": (f"{TS_DIR}/7.dcm", SIEMENS, 1.0, None),
    "1.2.840.10008.1.2.4.81": (f"{PYDICOM}/JPEGLSNearLossless_16.dcm", None, 0.0, None),
    "1.2.840.10008.1.2.4.90": (f"{TS_DIR}/9.dcm", SIEMENS, 1.0, None),
    "1.2.840.10008.1.2.4.91": (
        "pypi_pydicom_data/MR2_J2KI.dcm",
        "pypi_pydicom_data/MR2_UNCI.dcm",
        0.99,
        None,
    ),
    "1.2.840.10008.1.2.5": (f"{TS_DIR}/4.dcm", SIEMENS, 1.0, None),
}
