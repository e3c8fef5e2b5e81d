"""DICOM side of radtriage: SCP/SCU, spool, index, study assembly, series selection, volumes,
SR/SEG writing. Imports `core` and third-party DICOM libraries only."""
