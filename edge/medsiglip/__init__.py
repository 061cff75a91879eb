"""MedSigLIP on the device (onnxruntime): towers, preprocessing, zero-shot classification."""
