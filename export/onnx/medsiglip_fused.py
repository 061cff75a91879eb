"""MedSigLIP's faster vision graph: fused attention + static int8, so batches are exact.

Today's vision graph (:func:`export.onnx.graph.export_tower`) runs plain MatMul/Softmax
attention with dynamic int8, one image per run. This one is built in two parts and joined:

```
encoder:  pixel_values [B, 3, H, W] -> last_hidden_state [B, N, D]
          onnxruntime's transformer optimizer (the CLIP pattern, as optimum's ORTOptimizer runs
          it) fuses attention, export.onnx.mha turns it into MultiHeadAttention (CPU flash
          attention), then static QDQ int8 calibrated on images (export.onnx.static_quant)
head:     last_hidden_state -> image_embeds, image_embeds_normalized [B, D]
          SigLIP's attention-pooling head, kept fp32 (one query token: ~1% of the work)
```

The split is what makes fusion possible: onnxruntime's symbolic shape inference, which the
optimizer and the calibrator both need, gives up on the head's ``nn.MultiheadAttention``
reshapes, and with it every fusion. The two graphs are joined with ``onnx.compose``. The text
tower gets static int8 too (calibrated on the label prompts); it is small and stays unfused.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from export.onnx import graph

log = logging.getLogger(__name__)

PRECISION = "int8-static"
HIDDEN = "last_hidden_state"


def _parts():
    import torch

    class Encoder(torch.nn.Module):
        """pixel_values [B, 3, H, W] -> post-layernorm hidden states [B, N, D]."""

        def __init__(self, vm):
            super().__init__()
            self.vm = vm

        def forward(self, pixel_values):
            hidden = self.vm.encoder(inputs_embeds=self.vm.embeddings(pixel_values)).last_hidden_state
            return self.vm.post_layernorm(hidden)

    class Head(torch.nn.Module):
        """hidden [B, N, D] -> (pooled [B, D], pooled / ||pooled||)."""

        def __init__(self, vm):
            super().__init__()
            self.head = vm.head

        def forward(self, last_hidden_state):
            emb = self.head(last_hidden_state)
            return emb, emb / emb.norm(p=2, dim=-1, keepdim=True)

    return Encoder, Head


def _export(module, dummy, out: Path, inputs: list[str], outputs: list[str]) -> Path:
    import torch

    axes = {n: {0: "batch"} for n in inputs + outputs}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter and tracer notices, chosen knowingly
        torch.onnx.export(
            module.eval(),
            (dummy,),
            str(out),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=graph.OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return out


def fused_encoder(vm, work: Path) -> Path:
    """Export the vision encoder of ``vm`` (a SigLIP ``vision_model``) and fuse its attention
    into MultiHeadAttention; returns the fp32 graph's path (inline weights: < 2 GB)."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    from export.onnx.mha import attention_to_mha

    enc_cls, _ = _parts()
    cfg = vm.config
    # onnxruntime's CLIP fusion recognises eager attention only: a tower built with SDPA (the
    # transformers default) exports a pattern it leaves unfused, on every layer
    cfg._attn_implementation = "eager"
    raw = _export(
        enc_cls(vm),
        torch.zeros(1, cfg.num_channels, cfg.image_size, cfg.image_size),
        work / "encoder-raw.onnx",
        ["pixel_values"],
        [HIDDEN],
    )
    opt = optimize_model(
        str(raw),
        model_type="clip",
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        opt_level=1,
        use_gpu=False,
    )
    n = attention_to_mha(opt.model)
    if n != cfg.num_hidden_layers:
        log.warning("medsiglip: %d of %d attention layers fused", n, cfg.num_hidden_layers)
    out = work / "encoder-fused.onnx"
    opt.save_model_to_file(str(out))
    raw.unlink()
    return out


def head_graph(vm, work: Path) -> Path:
    """The attention-pooling head as its own fp32 graph: hidden states -> both embeddings."""
    import torch

    _, head_cls = _parts()
    cfg = vm.config
    n_tokens = (cfg.image_size // cfg.patch_size) ** 2
    return _export(
        head_cls(vm),
        torch.zeros(1, n_tokens, cfg.hidden_size),
        work / "head.onnx",
        [HIDDEN],
        list(graph.IO["vision"][1]),
    )


def join(encoder: Path, head: Path, out: Path) -> Path:
    """``encoder`` then ``head``, as one graph with the vision tower's inputs and outputs."""
    import onnx
    from onnx import compose

    a, b = onnx.load(str(encoder)), onnx.load(str(head))
    b = compose.add_prefix(b, "head/", rename_inputs=False, rename_outputs=False)
    opsets = {o.domain: o.version for o in a.opset_import}
    for o in b.opset_import:
        opsets.setdefault(o.domain, o.version)
    for m in (a, b):
        del m.opset_import[:]
        m.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
        m.ir_version = max(a.ir_version, b.ir_version)
    joined = compose.merge_models(a, b, io_map=[(HIDDEN, HIDDEN)])
    onnx.save_model(joined, str(out))
    return out


def vision_static(vm, out: Path, calibration: np.ndarray) -> Path:
    """The fused, static int8 vision tower of ``vm`` into ``out``, calibrated on ``calibration``
    (``pixel_values`` rows, the device's preprocessing)."""
    from export.onnx.static_quant import quantize_qdq

    with tempfile.TemporaryDirectory(prefix=".fused-", dir=out.parent) as tmp:
        work = Path(tmp)
        enc = fused_encoder(vm, work)
        q = quantize_qdq(enc, work / "encoder-int8.onnx", calibration, per_channel=True)
        join(q, head_graph(vm, work), out)
    return out


def vision_fused_fp32(vm, out: Path) -> Path:
    """The fused vision tower in fp32 (the new graph's own reference; benchmarks)."""
    with tempfile.TemporaryDirectory(prefix=".fused-", dir=out.parent) as tmp:
        work = Path(tmp)
        join(fused_encoder(vm, work), head_graph(vm, work), out)
    return out


def text_static(fp32: Path, out: Path, ids: np.ndarray) -> Path:
    """Static int8 of the text tower's fp32 graph, calibrated on token ids ``[N, 64]``."""
    from export.onnx.static_quant import quantize_qdq

    return quantize_qdq(fp32, out, ids, per_channel=True, input_name="input_ids")
