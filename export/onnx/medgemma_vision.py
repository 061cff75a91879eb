"""MedGemma's image path as an ONNX graph: SigLIP vision tower + Gemma 3 projector.

llama.cpp's mmproj encodes an 896 px image in 45–48 s on 2 cores (flash attention on); the same
computation in onnxruntime with fused attention and int8 weights is the faster route measured
in shared/FINDINGS.md. This module exports ``pixel_values [batch, 3, S, S] → image_embeds
[batch, 256, n_embd]`` (what ``Gemma3Model.get_image_features`` computes), fuses attention with
onnxruntime's transformer optimizer (eager attention exported, then the CLIP fusion pattern,
which matches SigLIP's), quantizes weights to int8 dynamically, measures cosine against
transformers, and adds the file to the bundle's ``medgemma`` component. The runtime feeds the
embeddings to llama.cpp exactly as it feeds cached ones (edge/medgemma/model.py), so the mmproj stays the
fallback.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.bundle.atomic import work_prefix
from edge.bundle.manifest import open_bundle
from edge.bundle.write import BundleWriter
from edge.errors import InputError, UsageError, require

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
ROLE = "vision-onnx"


_PREFIXES = {  # checkpoint name prefix (either layout transformers saves) -> our module's
    "vision_tower.": "vision_tower.",
    "model.vision_tower.": "vision_tower.",
    "multi_modal_projector.": "multi_modal_projector.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}


def _load_reference(src: Path):
    """The vision tower + projector only (0.4B parameters, ~1.7 GB in fp32), with the
    checkpoint's weights: loading the whole 4B model in fp32 would need ~17 GB."""
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    from safetensors import safe_open
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    cfg_json = json.loads((src / "config.json").read_text())
    if "Gemma3ForConditionalGeneration" not in cfg_json.get("architectures", []):
        raise InputError(f"{src}: not a Gemma3ForConditionalGeneration checkpoint")
    config = transformers.Gemma3Config.from_pretrained(src)
    config.vision_config._attn_implementation = "eager"  # the pattern onnxruntime's fusion recognises

    class VisionOnly(torch.nn.Module):
        """What Gemma3Model.get_image_features computes: the tower, then the pooling projector."""

        def __init__(self):
            super().__init__()
            self.config = config
            self.vision_tower = transformers.SiglipVisionModel(config.vision_config)
            self.multi_modal_projector = Gemma3MultiModalProjector(config)

        def forward(self, pixel_values):  # [B, 3, S, S] -> [B, T, n_embd]
            return self.multi_modal_projector(self.vision_tower(pixel_values=pixel_values).last_hidden_state)

    model = VisionOnly()
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    state[_PREFIXES[prefix] + key[len(prefix) :]] = f.get_tensor(key).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{src}: vision weights don't match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()


def preprocess_spec(src: Path, model) -> dict:
    """What the device must do to an RGB image before the graph (Gemma3ImageProcessor's steps),
    in edge.medsiglip.preprocess.ImageSpec's JSON form, plus the number of image tokens."""
    from edge.medsiglip.preprocess import RESAMPLE_NAMES, ImageSpec

    pp = json.loads((src / "preprocessor_config.json").read_text())
    size = int(model.config.vision_config.image_size)
    spec = ImageSpec(
        height=size,
        width=size,
        resample=RESAMPLE_NAMES.get(int(pp.get("resample", 2)), "bilinear"),
        rescale_factor=float(pp.get("rescale_factor", 1 / 255)),
        mean=tuple(pp.get("image_mean", [0.5] * 3)),
        std=tuple(pp.get("image_std", [0.5] * 3)),
    )
    return {**spec.to_json(), "tokens": int(model.config.mm_tokens_per_image)}


def _export_fp32(wrapper, size: int, out: Path, *, heads: int, hidden: int) -> Path:
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    raw = out.with_name("raw.onnx")
    x = torch.zeros(1, 3, size, size)
    # no_grad: with autograd on, tracing keeps every layer's attention scores alive (22 GB at 896 px)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (x,),
            str(raw),
            opset_version=18,
            dynamo=False,
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
        )
    opt = optimize_model(
        str(raw), model_type="clip", num_heads=heads, hidden_size=hidden, opt_level=1, use_gpu=False
    )
    from export.onnx.mha import attention_to_mha

    attention_to_mha(opt.model)  # CPU flash attention: no full score matrices (1 GiB per layer at 896 px)
    fused = sum(n.op_type in ("Attention", "MultiHeadAttention") for n in opt.model.graph.node)
    log.info("vision graph: %d fused attention nodes", fused)
    opt.save_model_to_file(str(out), use_external_data_format=raw.stat().st_size > (1900 << 20))
    raw.unlink()
    return out


def _reference(wrapper, size: int, n_images: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Fixed inputs and transformers' outputs for them, one image at a time (memory)."""
    import torch

    x = np.random.RandomState(0).uniform(-1, 1, size=(n_images, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = np.concatenate([wrapper(torch.from_numpy(x[i : i + 1])).numpy() for i in range(n_images)])
    return x, ref


def _fidelity(path: Path, x: np.ndarray, ref: np.ndarray) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"pixel_values": x[i : i + 1]})[0] for i in range(len(x))])
    a, b = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {
        "images": len(x),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "max_abs_diff": float(np.abs(ref - got).max()),
        "reference": "transformers get_image_features (fp32)",
    }


def export_vision_onnx(
    src: str | os.PathLike, *, bundle: str | os.PathLike, precisions: str | list[str] = "int8", progress=None
) -> list[dict]:
    """Add ``medgemma/vision-<PREC>.onnx`` (tower + projector) to ``bundle``'s medgemma component.

    The bundle must already hold a medgemma component exported from the same checkpoint.
    Returns the manifest entries written (with their fidelity).
    """
    precs = [
        p.strip() for p in (precisions.split(",") if isinstance(precisions, str) else precisions) if p.strip()
    ]
    for p in precs:
        if p not in PRECISIONS:
            raise UsageError(f"unknown vision precision {p!r} (one of {', '.join(PRECISIONS)})")
    src = Path(src)
    open_bundle(bundle).component("medgemma")  # fails early, naming the bundle
    t0 = time.perf_counter()
    model = _load_reference(src)
    wrapper = model
    vc = model.config.vision_config
    spec = preprocess_spec(src, model)
    entries = []
    with (  # the scratch directory is made while the writer holds the bundle's lock
        BundleWriter(bundle, "medgemma", update=True, progress=progress) as w,
        tempfile.TemporaryDirectory(prefix=work_prefix(w.root, "vision"), dir=w.root.parent) as tmp,
    ):
        ref = _reference(wrapper, spec["height"])
        fp32 = _export_fp32(
            wrapper,
            spec["height"],
            Path(tmp) / "vision-fp32.onnx",
            heads=vc.num_attention_heads,
            hidden=vc.hidden_size,
        )
        for prec in precs:
            rel = f"medgemma/vision-{prec}.onnx"
            dst = w.path(rel)
            if prec == "fp32":
                dst.write_bytes(fp32.read_bytes())
            else:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                # the fused Attention nodes are a contrib op shape inference can't see through
                quantize_dynamic(
                    str(fp32), str(dst), weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": 1}
                )  # onnx.TensorProto.FLOAT
            fid = _fidelity(dst, *ref)
            log.info("vision-%s: cosine min %.5f vs transformers", prec, fid["cosine_min"])
            entries.append(
                w.add_file(
                    rel,
                    role=ROLE,
                    precision=prec,
                    preprocess=spec,
                    fidelity=fid,
                    onnx={
                        "inputs": ["pixel_values"],
                        "outputs": ["image_embeds"],
                        "attention": "MultiHeadAttention",
                    },
                )
            )
    log.info("vision ONNX export (%s) in %.1fs", ",".join(precs), time.perf_counter() - t0)
    return entries
