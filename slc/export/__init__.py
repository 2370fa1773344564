"""Export: ONNX files per trained run (full, backbone, single-logit, per class), verified, and the model registry hand-off."""
