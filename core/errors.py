"""One exception tree for radtriage. Each class carries its wire codes.

    RadtriageError                      (HTTP 500, DIMSE 0xC000)
    ├── InputError                      bad or unusable input (HTTP 422)
    │   ├── NotDicomError               not a DICOM file at all            (DIMSE 0xC210)
    │   ├── MalformedDicomError         DICOM, but unreadable/inconsistent (DIMSE 0xC210)
    │   │   └── InvalidUIDError         a UID breaks the DICOM UID syntax  (DIMSE 0xA900)
    │   ├── UndecodablePixelDataError   pixel data no installed decoder can read
    │   ├── NotMRError                  modality is not MR
    │   ├── WrongBodyPartError          MR, but not of the prostate
    │   ├── MissingSeriesError          a required series role (t2w/adc/hbv) is absent
    │   ├── OutsideValidatedDomainError  unlike every study the model was validated on
    │   └── GeometryError               a series does not form one regular volume
    │       ├── MissingSlicesError      gaps in the slice positions
    │       ├── InconsistentSpacingError  irregular slice spacing / mixed pixel grids
    │       └── MixedOrientationError   slices with different orientations
    ├── DatasetMismatchError            SOP Class and data set disagree      (DIMSE 0xA900)
    ├── OutOfResourcesError             disk below low-water mark (DIMSE 0xA700, HTTP 507)
    ├── ModelError                      a model cannot be loaded (HTTP 503)
    │   ├── ModelNotFoundError          no such name/version in the repository (HTTP 404)
    │   ├── ModelIntegrityError         sha256 of model.onnx differs from metadata.json
    │   └── ModelSignatureError         ONNX inputs/outputs differ from metadata.json
    ├── InferenceError                  the model ran and failed for this study
    ├── DestinationError                a PACS destination refused or is unreachable (HTTP 502)
    └── ConfigError                     settings file or environment is invalid

`reason_code` is the machine-readable code that goes into result.json `reason` and into the
"not analysed" SR (see `core.codes.NOT_ANALYSED_REASONS`).
"""

from __future__ import annotations


class RadtriageError(Exception):
    """Base of every error radtriage raises on purpose."""

    http_status: int = 500
    dimse_status: int = 0xC000
    reason_code: str = "internal_error"

    def __init__(self, message: str, *, study_instance_uid: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.study_instance_uid = study_instance_uid

    def to_dict(self) -> dict[str, str]:
        """The `{"code", "message"}` object used in JSON outputs."""
        return {"code": self.reason_code, "message": self.message}


class InputError(RadtriageError):
    http_status = 422
    reason_code = "invalid_input"


class NotDicomError(InputError):
    dimse_status = 0xC210
    reason_code = "not_dicom"


class MalformedDicomError(InputError):
    dimse_status = 0xC210
    reason_code = "malformed_dicom"


class InvalidUIDError(MalformedDicomError):
    """A UID element breaks the UID syntax. DIMSE 0xA900 (Data Set does not match SOP Class):
    the data set does not conform to its IOD, and 0xC000 stays reserved for our own failures."""

    dimse_status = 0xA900
    reason_code = "invalid_uid"


class UndecodablePixelDataError(InputError):
    reason_code = "undecodable_pixel_data"


class NotMRError(InputError):
    reason_code = "not_mr"


class WrongBodyPartError(InputError):
    reason_code = "wrong_body_part"


class MissingSeriesError(InputError):
    """A required series role is absent; `role` names it (``"t2w"``, ``"adc"``, ``"hbv"``)."""

    def __init__(self, message: str, *, role: str, study_instance_uid: str | None = None) -> None:
        super().__init__(message, study_instance_uid=study_instance_uid)
        self.role = role
        self.reason_code = f"missing_{role}"


class OutsideValidatedDomainError(InputError):
    """The model's out-of-distribution gate (`models.ood_gate`) refused the study."""

    reason_code = "outside_validated_domain"


class GeometryError(InputError):
    reason_code = "inconsistent_geometry"


class MissingSlicesError(GeometryError):
    reason_code = "missing_slices"


class InconsistentSpacingError(GeometryError):
    reason_code = "inconsistent_spacing"


class MixedOrientationError(GeometryError):
    reason_code = "mixed_orientation"


class DatasetMismatchError(RadtriageError):
    http_status = 422
    dimse_status = 0xA900
    reason_code = "dataset_mismatch"


class OutOfResourcesError(RadtriageError):
    http_status = 507
    dimse_status = 0xA700
    reason_code = "out_of_resources"


class ModelError(RadtriageError):
    http_status = 503
    reason_code = "model_failure"


class ModelNotFoundError(ModelError):
    http_status = 404
    reason_code = "model_not_found"


class ModelIntegrityError(ModelError):
    reason_code = "model_integrity"


class ModelSignatureError(ModelError):
    reason_code = "model_signature"


class InferenceError(RadtriageError):
    reason_code = "model_failure"


class DestinationError(RadtriageError):
    http_status = 502
    reason_code = "destination_unreachable"


class ConfigError(RadtriageError):
    http_status = 500
    reason_code = "invalid_config"


class SignInError(RadtriageError):
    """A single sign-on the server refuses: wrong state or nonce, an ID token that fails
    validation, a user the role mapping does not admit."""

    http_status = 401
    reason_code = "sign_in_refused"

    def __init__(self, message: str, *, http_status: int = 401) -> None:
        super().__init__(message)
        self.http_status = http_status
