"""The RIS side: HL7 v2 over MLLP (orders in, ORU^R01 results out) and FHIR R4 (ServiceRequest in,
DiagnosticReport/Observation out), with their listener and outbox. Imports `core`, `imaging` and
the index of `dicom_node`."""
