"""Image encoders for OpenVINO: NNCF post-training int8 of the ONNX graph, saved as an IR.

OpenVINO reads the fused fp32 ONNX graph directly (its ONNX front end knows onnxruntime's
``MultiHeadAttention``), so the fp32 and bf16 OpenVINO engines need no file of their own: the
runtime compiles ``vision-fp32.onnx`` with an inference-precision hint. The int8 engine is a
separate file pair, ``vision-openvino-int8.xml`` + ``.bin``: NNCF's post-training quantization
(min/max on calibration images, transformer preset, SmoothQuant off) of that graph, compiled on
the device with the bf16 hint where the CPU has AVX512-BF16/AMX, so what int8 leaves in float
runs in bf16.

NNCF is an export-time dependency only (extra ``openvino``); the device needs the ``openvino``
runtime, and falls back to onnxruntime without it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge.errors import require

log = logging.getLogger(__name__)

ROLE = "vision-openvino"
DATA_ROLE = "vision-openvino-data"


def quantize_nncf(
    src: Path, out_xml: Path, calibration: np.ndarray, *, input_name: str = "pixel_values"
) -> tuple[Path, Path]:
    """NNCF int8 of the ONNX graph ``src`` (fp32), calibrated on ``calibration`` (``[N, ...]``,
    one row per run), saved as ``out_xml`` + ``out_xml.with_suffix('.bin')`` (weights int8).

    Returns the two paths.
    """
    ov = require("openvino", "openvino")
    nncf = require("nncf", "openvino")

    model = ov.Core().read_model(str(src))
    rows = [{input_name: calibration[i : i + 1]} for i in range(len(calibration))]
    _quiet_nncf()
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    # SmoothQuant off: with it the full-size MedGemma tower's int8 read cosine 0.826 against
    # transformers (MIXED preset too); without it 0.99726, quantized in 115 s instead of ~200 s
    # (AMX Xeon, 2 cores, 3 generated calibration images; measured for issue #20)
    no_smooth_quant = AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
    q = nncf.quantize(
        model,
        nncf.Dataset(rows),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(rows),
        advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alphas=no_smooth_quant),
    )
    ov.save_model(q, str(out_xml), compress_to_fp16=False)
    log.info("NNCF int8 calibrated on %d inputs: %s", len(rows), out_xml.name)
    return out_xml, out_xml.with_suffix(".bin")


def _quiet_nncf() -> None:
    """NNCF draws progress bars and logs at INFO; a library's export keeps to its own log."""
    try:
        from nncf.common.logging.logger import nncf_logger, set_log_level

        set_log_level(logging.WARNING)
        nncf_logger.propagate = False
    except ImportError:  # a later NNCF moved it: its default verbosity is harmless
        pass
