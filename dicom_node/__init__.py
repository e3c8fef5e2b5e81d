"""DICOM only: SCP/SCU, ingest, spool, instance index, study assembly, job states, sender, SR/SEG
writing and reading, DICOMweb (STOW-RS/QIDO-RS). Imports `core` and `imaging`."""
