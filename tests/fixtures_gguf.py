"""Fixtures for the GGUF export (tiny MedGemma twin bundle)."""
