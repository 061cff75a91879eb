"""Bundles: the manifest and its verification, atomic writes, GGUF/ONNX header readers, the model registry."""
