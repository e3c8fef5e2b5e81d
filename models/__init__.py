"""Model definitions, pre/post-processing shared by training and serving, ONNX runner and the
versioned model repository. Imports `core` only (of ours)."""
