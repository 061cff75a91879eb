"""MedGemma → GGUF: checkpoint checks, conversion and quantization, fidelity, import of a GGUF made elsewhere."""
