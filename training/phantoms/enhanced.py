"""Enhanced MR Image Storage (multi-frame) writer for phantom series.

One file per series; geometry and b-values in functional groups: shared PixelMeasures and (for
single-orientation series) PlaneOrientation; per-frame PlanePosition, FrameContent (stack and
in-stack position as dimension indices) and, for diffusion frames, MRDiffusion with
DiffusionBValue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage
from pydicom.valuerep import DSfloat

from training.phantoms.anatomy import PhantomCase
from training.phantoms.dicom_writer import (
    _SEQUENCE,
    Frame,
    SeriesData,
    base_dataset,
    ds_list,
    save,
    study_datetime,
    window,
)
from training.phantoms.vendors import FLAVOURS

# Enhanced MR ImageType/FrameType value 3 and AcquisitionContrast per series kind.
_VALUE3 = {"t2": ("T2", "T2"), "loc": ("LOCALIZER", "T1"), "dwi": ("DIFFUSION", "DIFFUSION")}
_DERIVED_VALUE3 = {"adc": "ADC", "hbv": "DIFFUSION"}


def _item(**attrs: object) -> Dataset:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def _image_type(series: SeriesData) -> tuple[list[str], str]:
    """(ImageType, AcquisitionContrast) in Enhanced MR terms."""
    if series.key in _DERIVED_VALUE3:
        return ["DERIVED", "PRIMARY", _DERIVED_VALUE3[series.key], "NONE"], "DIFFUSION"
    value3, contrast = _VALUE3[series.kind]
    return ["ORIGINAL", "PRIMARY", value3, "NONE"], contrast


def _stacks(series: SeriesData) -> list[tuple[int, int]]:
    """(StackID, InStackPositionNumber) per frame: one stack per orientation, DWI b-values share
    positions."""
    out: list[tuple[int, int]] = []
    keys: dict[tuple, int] = {}
    positions: dict[int, list[tuple]] = {}
    for f in series.frames:
        okey = tuple(round(v, 4) for v in f.row_dir + f.col_dir)
        stack = keys.setdefault(okey, len(keys) + 1)
        pos = positions.setdefault(stack, [])
        pkey = tuple(round(v, 3) for v in f.position)
        if pkey not in pos:
            pos.append(pkey)
        out.append((stack, pos.index(pkey) + 1))
    return out


def _mr_frame_groups(series: SeriesData, flavour_name: str) -> Dataset:
    """MR-specific functional group items shared by every frame of an ORIGINAL series."""
    tr, te, etl, flip = (_SEQUENCE[series.kind][i] for i in (2, 3, 4, 5))
    epi = series.kind in ("dwi", "adc")
    return _item(
        MRTimingAndRelatedParametersSequence=Sequence(
            [
                _item(
                    RepetitionTime=tr,
                    FlipAngle=flip,
                    EchoTrainLength=etl,
                    RFEchoTrainLength=1 if epi else etl,
                    GradientEchoTrainLength=etl if epi else 0,
                    SpecificAbsorptionRateSequence=Sequence(
                        [
                            _item(
                                SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                                SpecificAbsorptionRateValue=1.2,
                            )
                        ]
                    ),
                    OperatingModeSequence=Sequence(
                        [
                            _item(OperatingModeType=t, OperatingMode="IEC_NORMAL")
                            for t in ("STATIC FIELD", "RF", "GRADIENT")
                        ]
                    ),
                    GradientOutputType="DB_DT",
                    GradientOutput=10.0,
                )
            ]
        ),
        MRFOVGeometrySequence=Sequence(
            [
                _item(
                    InPlanePhaseEncodingDirection="ROW",
                    MRAcquisitionFrequencyEncodingSteps=int(series.frames[0].pixels.shape[1]),
                    MRAcquisitionPhaseEncodingStepsInPlane=int(series.frames[0].pixels.shape[0]),
                    PercentSampling=100.0,
                    PercentPhaseFieldOfView=100.0,
                )
            ]
        ),
        MREchoSequence=Sequence([_item(EffectiveEchoTime=te)]),
        MRModifierSequence=Sequence(
            [
                _item(
                    InversionRecovery="NO",
                    FlowCompensation="NONE",
                    T2Preparation="NO",
                    SpectrallySelectedExcitation="NONE",
                    SpatialPresaturation="NONE",
                    PartialFourier="NO",
                    ParallelAcquisition="NO",
                )
            ]
        ),
        MRImagingModifierSequence=Sequence(
            [
                _item(
                    MagnetizationTransfer="NONE",
                    BloodSignalNulling="NO",
                    Tagging="NONE",
                    TransmitterFrequency=123.2,
                    PixelBandwidth=1500.0 if epi else 200.0,
                )
            ]
        ),
        MRReceiveCoilSequence=Sequence(
            [
                _item(
                    ReceiveCoilName="Body18_Spine32",
                    ReceiveCoilManufacturerName=flavour_name,
                    ReceiveCoilType="MULTICOIL",
                    QuadratureReceiveCoil="NO",
                    MultiCoilDefinitionSequence=Sequence(
                        [_item(MultiCoilElementName="BO1", MultiCoilElementUsed="YES")]
                    ),
                )
            ]
        ),
        MRTransmitCoilSequence=Sequence(
            [
                _item(
                    TransmitCoilName="Body",
                    TransmitCoilManufacturerName=flavour_name,
                    TransmitCoilType="BODY",
                )
            ]
        ),
        MRAveragesSequence=Sequence([_item(NumberOfAverages=1)]),
    )


def _pulse_sequence(ds: Dataset, series: SeriesData) -> None:
    """MR Pulse Sequence module (required for ORIGINAL images)."""
    epi = series.kind in ("dwi", "adc")
    ds.PulseSequenceName = "ep2d_diff" if epi else ("tfl" if series.kind == "loc" else "tse")
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "GRADIENT" if series.kind == "loc" else "SPIN"
    if series.kind != "loc":
        ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "YES" if epi else "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "FAT" if epi else "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL" if epi else "SINGLE"
    ds.NumberOfKSpaceTrajectories = 1


def enhanced_dataset(case: PhantomCase, series: SeriesData) -> Dataset:
    flavour = FLAVOURS[case.vendor]
    ds = base_dataset(case, flavour, series)
    when = study_datetime(case)
    frames: list[Frame] = series.frames
    image_type, contrast = _image_type(series)
    original = image_type[0] == "ORIGINAL"
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = case.uid(f"{series.key}|enhanced")
    ds.ImageType = image_type
    ds.InstanceNumber = 1
    ds.ContentDate = ds.SeriesDate
    ds.ContentTime = ds.SeriesTime
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionDuration = 180.0
    ds.ContentQualification = "RESEARCH"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImageComments = "synthetic phantom, not a patient"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = contrast
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.AcquisitionContextSequence = Sequence()
    if original:
        _pulse_sequence(ds, series)

    # Image Pixel
    rows, cols = frames[0].pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = len(frames)
    pixels = np.stack([np.minimum(f.pixels, 4095) for f in frames])
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()

    # Dimensions: stack, in-stack position, and b-value for multi-b DWI.
    dim_uid = case.uid(f"{series.key}|dimensions")
    is_dwi = series.key == "dwi"
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dim_uid)])
    dims = [
        _item(
            DimensionOrganizationUID=dim_uid,
            DimensionIndexPointer=0x00209056,
            FunctionalGroupPointer=0x00209111,
            DimensionDescriptionLabel="Stack ID",
        ),
        _item(
            DimensionOrganizationUID=dim_uid,
            DimensionIndexPointer=0x00209057,
            FunctionalGroupPointer=0x00209111,
            DimensionDescriptionLabel="In-Stack Position Number",
        ),
    ]
    if is_dwi:
        dims.insert(
            0,
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=0x00189087,
                FunctionalGroupPointer=0x00189117,
                DimensionDescriptionLabel="Diffusion b-value",
            ),
        )
    ds.DimensionIndexSequence = Sequence(dims)

    # Functional groups.
    one_orientation = len({f.row_dir + f.col_dir for f in frames}) == 1
    wc, ww = window(pixels)
    shared = _item(
        PixelMeasuresSequence=Sequence(
            [
                _item(
                    PixelSpacing=ds_list(frames[0].pixel_spacing),
                    SliceThickness=DSfloat(frames[0].thickness, auto_format=True),
                    SpacingBetweenSlices=DSfloat(frames[0].thickness, auto_format=True),
                )
            ]
        ),
        FrameAnatomySequence=Sequence(
            [
                _item(
                    FrameLaterality="U",
                    AnatomicRegionSequence=Sequence(
                        [
                            _item(
                                CodeValue="41216001",
                                CodingSchemeDesignator="SCT",
                                CodeMeaning="Prostate",
                            )
                        ]
                    ),
                )
            ]
        ),
        PixelValueTransformationSequence=Sequence(
            [_item(RescaleIntercept=0, RescaleSlope=1, RescaleType="US")]
        ),
        FrameVOILUTSequence=Sequence(
            [
                _item(
                    WindowCenter=DSfloat(wc, auto_format=True),
                    WindowWidth=DSfloat(ww, auto_format=True),
                )
            ]
        ),
        MRImageFrameTypeSequence=Sequence(
            [
                _item(
                    FrameType=image_type,
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                    ComplexImageComponent="MAGNITUDE",
                    AcquisitionContrast=contrast,
                )
            ]
        ),
    )
    if one_orientation:
        shared.PlaneOrientationSequence = Sequence(
            [_item(ImageOrientationPatient=ds_list(frames[0].row_dir + frames[0].col_dir))]
        )
    if original:
        for k, v in _mr_frame_groups(series, flavour.manufacturer).items():
            shared[k] = v
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    b_values = sorted({f.b_value for f in frames if f.b_value is not None})
    per_frame = []
    frame_time = when.strftime("%Y%m%d%H%M%S")
    for f, (stack, in_stack) in zip(frames, _stacks(series), strict=True):
        index = [stack, in_stack]
        if is_dwi:
            index = [b_values.index(f.b_value) + 1, *index]
        content = _item(
            FrameAcquisitionNumber=1,
            FrameReferenceDateTime=frame_time,
            FrameAcquisitionDateTime=frame_time,
            FrameAcquisitionDuration=1000.0,
            StackID=str(stack),
            InStackPositionNumber=in_stack,
            DimensionIndexValues=index,
        )
        item = _item(
            FrameContentSequence=Sequence([content]),
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=ds_list(f.position))]),
        )
        if not one_orientation:
            item.PlaneOrientationSequence = Sequence(
                [_item(ImageOrientationPatient=ds_list(f.row_dir + f.col_dir))]
            )
        if f.b_value is not None:
            item.MRDiffusionSequence = Sequence(
                [
                    _item(
                        DiffusionBValue=float(f.b_value),
                        DiffusionDirectionality="ISOTROPIC" if f.b_value > 0 else "NONE",
                    )
                ]
            )
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds


def write_enhanced_series(case: PhantomCase, series: SeriesData, folder: Path) -> list[Path]:
    path = folder / "IM0001.dcm"
    save(enhanced_dataset(case, series), path)
    return [path]
