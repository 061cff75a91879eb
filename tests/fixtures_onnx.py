"""Fixtures for the ONNX export (tiny MedSigLIP twin bundle)."""
