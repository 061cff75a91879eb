"""Static int8 (QDQ) image encoders for onnxruntime, calibrated on images at export.

Dynamic int8 (today's ``vision-int8.onnx``) quantizes activations at run time, per tensor over
the whole batch: an embedding depends on its batch mates and every MatMul pays for a min/max
pass. Static quantization fixes each activation's scale at export from calibration images, so

* the graph is a plain QDQ graph (``QuantizeLinear`` → int8 MatMul → ``DequantizeLinear``) that
  onnxruntime fuses into VNNI/AMX int8 kernels with no run-time range pass, and
* a batch's results equal batch-1 results exactly (the scales don't depend on the batch).

Calibration images are either **generated** (:func:`generated_images`: deterministic synthetic
images of the kinds the fidelity check uses — enough for a twin's random weights) or **a folder
of the user's own images** (:func:`folder_images`; what real weights should be calibrated on:
a few dozen images of the modality the bundle will see). The manifest records which.

Only MatMul/Conv/Gemm are quantized: the fused ``MultiHeadAttention`` (CPU flash attention),
layer norms and GELU stay in float, which is where int8 costs fidelity and saves little time.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edge.errors import InputError, UsageError, require

log = logging.getLogger(__name__)

OP_TYPES = ("MatMul", "Conv", "Gemm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".bmp", ".tif", ".tiff", ".webp")
MAX_CALIBRATION_IMAGES = 512


def generated_images(n: int = 8, seed: int = 0) -> list:
    """``n`` deterministic synthetic PIL images (x-ray-like, skin-like, gradients, noise, 16-bit
    kinds), each rotated, cropped and re-lit at random: not the images the fidelity check uses."""
    from PIL import Image, ImageEnhance

    from export.onnx.fidelity import sample_images

    rng = np.random.default_rng(1000 + seed)
    out = []
    for i, im in enumerate(sample_images(n + 3, seed=seed + 1)[3 : n + 3]):
        rgb = (
            im.convert("RGB")
            if im.mode in ("RGB", "L", "RGBA")
            else Image.fromarray(
                (np.asarray(im, dtype=np.float64) / max(1, np.asarray(im).max()) * 255).astype(np.uint8)
            ).convert("RGB")
        )
        rgb = rgb.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR, fillcolor=(0, 0, 0))
        w, h = rgb.size
        f = rng.uniform(0.6, 1.0)
        x0, y0 = int(rng.uniform(0, w * (1 - f))), int(rng.uniform(0, h * (1 - f)))
        rgb = rgb.crop((x0, y0, x0 + int(w * f), y0 + int(h * f)))
        out.append(ImageEnhance.Brightness(rgb).enhance(float(rng.uniform(0.7, 1.3))))
        log.debug("calibration image %d: %s", i, rgb.size)
    return out


def folder_images(folder: str | os.PathLike, *, limit: int = 64) -> list:
    """Up to ``limit`` images from ``folder`` (PNG/JPEG/DICOM..., sorted by name), decoded with the
    runtime's own loader (same limits as a question's image).

    Raises:
        InputError: not a directory, or no readable image in it.
    """
    from edge.media.images import load_image

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"calibration folder {root} is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    out, bad = [], 0
    for p in paths[: max(limit, 0)]:
        try:
            out.append(load_image(p).image)
        except InputError:
            bad += 1
    if not out:
        raise InputError(
            f"calibration folder {root} has no readable image ({len(paths)} candidates, {bad} unreadable); "
            f"give a folder of {', '.join(IMAGE_SUFFIXES[:3])} images"
        )
    log.info("calibration: %d images from %s (%d unreadable skipped)", len(out), root, bad)
    return out


def calibration_images(source: str | os.PathLike | None, n: int) -> tuple[list, dict]:
    """The calibration images and how the manifest describes them.

    ``source``: None → :func:`generated_images` (``n`` of them); a folder → its first ``n`` images.
    """
    if not 1 <= n <= MAX_CALIBRATION_IMAGES:
        raise UsageError(f"calibration images must be 1..{MAX_CALIBRATION_IMAGES} (got {n})")
    if source is None:
        return generated_images(n), {"kind": "generated", "images": n, "seed": 0}
    imgs = folder_images(source, limit=n)
    return imgs, {"kind": "folder", "images": len(imgs)}  # the folder's path may name a patient: not kept


class PixelReader:
    """onnxruntime's ``CalibrationDataReader`` over ``pixel_values`` rows, one image per run."""

    def __init__(self, pixels: np.ndarray, input_name: str = "pixel_values"):
        self.pixels, self.input_name, self._i = pixels, input_name, 0

    def get_next(self) -> dict | None:
        if self._i >= len(self.pixels):
            return None
        self._i += 1
        return {self.input_name: self.pixels[self._i - 1 : self._i]}

    def rewind(self) -> None:
        self._i = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.pixels[i : i + 1] for i in range(len(self.pixels)))

    def __len__(self) -> int:
        return len(self.pixels)


def with_shapes(model):
    """``model`` with value_info for every tensor, contrib ops included (the calibrator only
    measures tensors whose type it knows; onnx's own inference stops at ``MultiHeadAttention``).

    The inference runs on a weightless copy (large float initializers keep their shape, not their
    bytes): onnxruntime's symbolic inference copies the model, 1.7 GB more for MedGemma's tower.
    """
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    light = onnx.ModelProto()
    light.CopyFrom(_weightless(model))
    try:
        shaped = SymbolicShapeInference.infer_shapes(light, auto_merge=True)
    except Exception as exc:  # symbolic inference gives up on some shape arithmetic: onnx's then
        log.info("symbolic shape inference failed (%s); using onnx's", str(exc).splitlines()[0][:120])
        shaped = onnx.shape_inference.infer_shapes(light)
    del model.graph.value_info[:]
    model.graph.value_info.extend(shaped.graph.value_info)
    return model


def _weightless(model, limit: int = 1 << 16):
    """A copy of ``model``'s graph whose float initializers over ``limit`` bytes are empty
    placeholders of the same type and shape (integer ones, e.g. reshape targets, are kept)."""
    import onnx

    light = onnx.ModelProto()
    light.ir_version, light.producer_name = model.ir_version, model.producer_name
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.raw_data) > limit:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    return light


def calibrate_ranges(model, reader: PixelReader, cache: Path, *, work: Path) -> Path:
    """Min/max of every tensor the quantizer needs, over ``reader``'s inputs, written as
    onnxruntime's calibration cache (``quantize_static(calibration_cache_path=...)`` reads it).

    onnxruntime's own calibrator appends its ReduceMin/ReduceMax nodes at the end of the graph,
    so the session keeps every measured activation alive until the end of the run: 7+ GB at
    896 px for MedGemma's tower. Here each pair follows its tensor's producer, so the tensor is
    freed as in the plain graph.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    g = model.graph
    typed = {vi.name for vi in [*g.value_info, *g.input, *g.output] if _is_float(vi)}
    inits = {t.name for t in model.graph.initializer}
    wanted = []
    for node in model.graph.node:
        if node.op_type in OP_TYPES:
            wanted += [
                t for t in (*node.input, *node.output) if t in typed and t not in inits and t not in wanted
            ]
    aug = onnx.ModelProto()
    aug.CopyFrom(_weightless(model, limit=1 << 62))  # structure only, weights re-attached below
    del aug.graph.initializer[:]
    del aug.graph.input[:]
    aug.graph.input.extend(model.graph.input)
    aug.graph.initializer.extend(model.graph.initializer)
    producers = {o: i for i, n in enumerate(aug.graph.node) for o in n.output}
    after: dict[int, list] = {}
    for t in wanted:
        pair = [helper.make_node(op, [t], [f"{t}__{op}"], keepdims=0) for op in ("ReduceMin", "ReduceMax")]
        after.setdefault(producers.get(t, -1), []).extend(pair)
        aug.graph.output.extend(
            helper.make_tensor_value_info(f"{t}__{op}", onnx.TensorProto.FLOAT, [])
            for op in ("ReduceMin", "ReduceMax")
        )
    nodes = list(after.get(-1, []))
    for i, n in enumerate(aug.graph.node):
        nodes += [n, *after.get(i, [])]
    del aug.graph.node[:]
    aug.graph.node.extend(nodes)
    path = work / "calibrate.onnx"
    onnx.save_model(aug, str(path), save_as_external_data=True, location="calibrate.onnx.data")
    del aug
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as named
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # reductions run as soon as they can
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [f"{t}__{op}" for t in wanted for op in ("ReduceMin", "ReduceMax")]
    lo = {t: np.inf for t in wanted}
    hi = {t: -np.inf for t in wanted}
    for x in reader:
        vals = dict(zip(names, sess.run(names, {reader.input_name: x}), strict=True))
        for t in wanted:
            lo[t] = min(lo[t], float(vals[f"{t}__ReduceMin"]))
            hi[t] = max(hi[t], float(vals[f"{t}__ReduceMax"]))
    del sess
    data = {t: (np.array(min(lo[t], 0.0), np.float32), np.array(max(hi[t], 0.0), np.float32)) for t in wanted}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
    log.info("calibrated %d tensors on %d inputs", len(wanted), len(reader))
    return cache


def _is_float(vi) -> bool:
    import onnx

    t = vi.type.tensor_type
    return vi.type.HasField("tensor_type") and t.elem_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
    )


def quantize_qdq(
    src: Path,
    out: Path,
    calibration: np.ndarray,
    *,
    per_channel: bool = True,
    activations: str = "u8",
    input_name: str = "pixel_values",
    external_data: bool = False,
    ranges_cache: Path | None = None,
) -> Path:
    """Static QDQ int8 of the fp32 graph ``src`` into ``out``, calibrated (min/max) on
    ``calibration`` (``[N, ...]`` rows of the graph's input, run one row at a time).

    Args:
        per_channel: one weight scale per output channel (better fidelity, same speed).
        activations: "u8" (uint8 activations × int8 weights: VNNI's native u8·s8 dot product;
            1.5x faster than dynamic int8 for MedGemma's tower, where "s8" measured 0.8-1.1x)
            or "s8".
        external_data: write the weights beside ``out`` (graphs over 2 GB).
        ranges_cache: a JSON file keeping the calibrated ranges (:func:`calibrate_ranges`): a
            second call with the same cache (another per-channel choice) skips the calibration.

    Returns ``out``.
    """
    onnx = require("onnx", "export")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from export.onnx.graph import _drop_root_log

    if activations not in ("s8", "u8"):
        raise UsageError(f"activations must be s8 or u8 (got {activations!r})")
    model = with_shapes(onnx.load(str(src), load_external_data=True))
    reader = PixelReader(calibration, input_name)
    with tempfile.TemporaryDirectory(prefix=".qdq-", dir=out.parent) as tmp:
        shaped = Path(tmp) / "shaped.onnx"
        if ranges_cache is None or not ranges_cache.is_file():
            ranges_cache = ranges_cache or Path(tmp) / "ranges.json"
            calibrate_ranges(model, reader, ranges_cache, work=Path(tmp))
        onnx.save_model(model, str(shaped), save_as_external_data=external_data, location="shaped.onnx.data")
        del model
        with _drop_root_log("Please consider"), _drop_root_log("Failed to infer data type"):
            quantize_static(
                str(shaped),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(OP_TYPES),
                per_channel=per_channel,
                activation_type=QuantType.QInt8 if activations == "s8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                use_external_data_format=external_data,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                calibration_cache_path=ranges_cache,
            )
    log.info(
        "static QDQ int8 (%s, activations %s) calibrated on %d inputs: %s",
        "per-channel" if per_channel else "per-tensor",
        activations,
        len(reader),
        out.name,
    )
    return out
