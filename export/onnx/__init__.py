"""ONNX exports: MedSigLIP's towers and MedGemma's vision encoder, graph rewrites, fidelity."""
