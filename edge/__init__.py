"""medgemma-edge: the on-device runtime (no torch, no transformers)."""

__version__ = "0.1.0"
