"""ONNX graphs of the MedSigLIP towers: fp32 export, dynamic int8 and fp16 conversion.

Each tower is exported on its own with ``torch.onnx.export`` (the TorchScript-based exporter,
``dynamo=False``) of a small wrapper module, so a device can load only the tower it needs:

```
vision: pixel_values [batch, 3, H, W] float32 -> image_embeds, image_embeds_normalized [batch, D]
text:   input_ids    [batch, 64]      int64   -> text_embeds,  text_embeds_normalized  [batch, D]
```

optimum's exporter knows SigLIP only as one combined graph (image and text in, logits out);
splitting it needs a custom OnnxConfig *and* a model patcher per tower, for graphs identical to
what these two wrappers give directly. Large graphs (> ``EXTERNAL_THRESHOLD``) keep their
weights in one external data file beside the .onnx (``<name>.onnx.data``), as protobuf can't
hold more than 2 GB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

OPSET = 18
EXTERNAL_THRESHOLD = 1_800_000_000  # bytes of weights; protobuf's hard limit is 2 GiB
INT8_VARIANTS = ("per_tensor", "per_channel", "pre_per_tensor", "pre_per_channel")
DEFAULT_INT8 = "per_tensor"

IO = {
    "vision": (["pixel_values"], ["image_embeds", "image_embeds_normalized"]),
    "text": (["input_ids"], ["text_embeds", "text_embeds_normalized"]),
}


def _wrappers():
    import torch

    class VisionTower(torch.nn.Module):
        """pixel_values [B, 3, H, W] -> (embeds [B, D], embeds / ||embeds||)."""

        def __init__(self, model):
            super().__init__()
            self.vision_model = model.vision_model

        def forward(self, pixel_values):
            emb = self.vision_model(pixel_values=pixel_values).pooler_output  # [B, D]
            return emb, emb / emb.norm(p=2, dim=-1, keepdim=True)

    class TextTower(torch.nn.Module):
        """input_ids [B, 64] -> (embeds [B, D], embeds / ||embeds||); pooled at the last token."""

        def __init__(self, model):
            super().__init__()
            self.text_model = model.text_model

        def forward(self, input_ids):
            emb = self.text_model(input_ids=input_ids).pooler_output  # [B, D]
            return emb, emb / emb.norm(p=2, dim=-1, keepdim=True)

    return VisionTower, TextTower


def export_tower(model, tower: str, out: Path, *, external_data: bool | None = None) -> Path:
    """Export one tower (of a ``SiglipModel``, or a ``SiglipVisionModel``/``SiglipTextModel``;
    eval mode, fp32) to ``out`` (fp32 ONNX).

    ``external_data``: True forces weights into ``out.name + '.data'``; None decides by size.
    Returns ``out``.
    """
    import torch

    vision_cls, text_cls = _wrappers()
    cfg = getattr(model.config, f"{tower}_config", model.config)  # SiglipModel or one tower model
    if tower == "vision":
        wrapper = vision_cls(model).eval()
        dummy = torch.zeros(2, cfg.num_channels, cfg.image_size, cfg.image_size)
    else:
        wrapper = text_cls(model).eval()
        dummy = torch.ones(2, cfg.max_position_embeddings, dtype=torch.long)
    inputs, outputs = IO[tower]
    n_bytes = sum(p.numel() * 4 for p in wrapper.parameters())
    use_external = external_data if external_data is not None else n_bytes > EXTERNAL_THRESHOLD
    axes = {name: {0: "batch"} for name in inputs + outputs}
    tmp = out.with_name(out.name + ".export")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the traced shape checks are constant here
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen knowingly
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(tmp),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    _finish(tmp, out, external_data=use_external)
    log.info("exported %s tower (%d MB of weights, external=%s)", tower, n_bytes >> 20, use_external)
    return out


def save_graph(src: Path | object, out: Path, *, external_data: bool) -> Path:
    """(Re)write an ONNX model (a path or a ModelProto) as ``out``, external data or inline.

    The source file and any external data beside it are removed when ``src`` is a path.
    """
    import onnx

    if isinstance(src, Path):
        model = onnx.load(str(src), load_external_data=True)
        leftovers = [src, *_data_files(src)]
    else:
        model, leftovers = src, []
    data = out.with_name(out.name + ".data")
    if data.exists():
        data.unlink()
    if external_data:
        onnx.save_model(
            model,
            str(out),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
            convert_attribute=False,
        )
    else:
        onnx.save_model(model, str(out))
    for p in leftovers:
        if Path(p) != out and Path(p) != data and Path(p).exists():
            os.unlink(p)
    return out


def _finish(tmp: Path, out: Path, *, external_data: bool) -> None:
    """Move a freshly written graph into place; re-save it only when its layout must change.

    Re-saving parses the whole protobuf (3.3 GB of RAM for the 1.7 GB vision tower), so a
    graph that is already inline and should stay inline is just renamed.
    """
    if not external_data and not has_external_data(tmp):
        os.replace(tmp, out)
    else:
        save_graph(tmp, out, external_data=external_data)


def _data_files(path: Path) -> list[Path]:
    """External data files an ONNX file refers to (header only: weights are not read)."""
    from edge.bundle.onnx_header import read_header

    return [path.parent / n for n in sorted(read_header(path).external)]


def has_external_data(path: Path) -> bool:
    return bool(_data_files(path))


def to_int8(src: Path, out: Path, *, variant: str = DEFAULT_INT8, external_data: bool) -> Path:
    """Dynamic int8 (weights QInt8, activations quantized at run time) of an fp32 graph.

    ``variant``: per_tensor | per_channel scales, optionally after ``quant_pre_process``
    (symbolic shape inference + ORT graph optimisation) — the ``pre_`` variants.
    """
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    if variant not in INT8_VARIANTS:
        raise ValueError(f"unknown int8 variant {variant!r}; choose one of {INT8_VARIANTS}")
    model_in = src
    pre = None
    if variant.startswith("pre_"):
        pre = out.with_name(out.stem + ".pre.onnx")
        quant_pre_process(
            str(src),
            str(pre),
            skip_symbolic_shape=True,  # symbolic inference fails on the Reshape of the attention heads
            save_as_external_data=external_data,
            all_tensors_to_one_file=True,
            external_data_location=pre.name + ".data",
        )
        model_in = pre
    tmp = out.with_name(out.stem + ".q.onnx")
    with _drop_root_log("Please consider to run pre-processing"):  # a choice here, measured
        quantize_dynamic(
            str(model_in),
            str(tmp),
            weight_type=QuantType.QInt8,
            per_channel=variant.endswith("per_channel"),
            use_external_data_format=external_data,
        )
    _finish(tmp, out, external_data=external_data)
    if pre is not None:
        for p in (pre, pre.with_name(pre.name + ".data")):
            if p.exists():
                p.unlink()
    return out


@contextlib.contextmanager
def _drop_root_log(prefix: str):
    """Drop root-logger records starting with ``prefix`` (onnxruntime.quantization logs there)."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefix)

    f = _Drop()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def to_fp16(src: Path, out: Path, *, external_data: bool) -> Path:
    """fp16 weights and compute, fp32 inputs and outputs (``keep_io_types``).

    Uses onnxruntime's own converter (``onnxruntime.transformers.float16``; onnxconverter-common
    is not needed).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src), load_external_data=True)
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    del model
    save_graph(half, out, external_data=external_data)
    return out


def graph_io(path: Path) -> dict:
    """Names, element types and shapes of a graph's inputs and outputs (for the manifest)."""
    from edge.bundle.onnx_header import read_header

    h = read_header(path)
    return {"inputs": h.inputs, "outputs": h.outputs, "opset": h.opset}
