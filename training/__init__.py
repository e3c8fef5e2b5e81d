"""Datasets (synthetic phantoms, PI-CAI MHA, DICOM folders), MONAI training, ONNX export."""
