"""MedSigLIP's settings, declared once (see :mod:`edge.settings`)."""

from __future__ import annotations

from dataclasses import dataclass

from edge.settings import check, setting


@dataclass(frozen=True)
class MedSigLIPSettings:
    """How to run MedSigLIP's ONNX towers on this device."""

    precision: str | None = setting(
        None,
        "which towers of the bundle (int8, fp16, fp32); default: the bundle's",
    )
    threads: int | None = setting(None, "onnxruntime threads (default: all cores)", minimum=1, maximum=1024)
    engine: str = setting(
        "auto",
        "what runs the vision tower: onnxruntime, or openvino (fp32 towers, bf16 compute); auto: "
        "openvino for fp32 towers where the CPU has AVX512-BF16/AMX and OpenVINO is installed",
        choices=("auto", "onnxruntime", "openvino"),
        remote=False,
    )

    def __post_init__(self) -> None:
        check(self)
