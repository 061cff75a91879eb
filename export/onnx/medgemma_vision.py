"""MedGemma's image path as an ONNX graph: SigLIP vision tower + Gemma 3 projector.

llama.cpp's mmproj encodes an 896 px image in 45–48 s on 2 cores (flash attention on); the same
computation in onnxruntime with fused attention and int8 weights is the faster route measured
in shared/FINDINGS.md. This module exports ``pixel_values [batch, 3, S, S] → image_embeds
[batch, 256, n_embd]`` (what ``Gemma3Model.get_image_features`` computes), fuses attention with
onnxruntime's transformer optimizer (eager attention exported, then the CLIP fusion pattern,
which matches SigLIP's), and derives the precisions asked for from that fused fp32 graph:

| precision      | file                          | how                                               |
|----------------|-------------------------------|---------------------------------------------------|
| fp32           | vision-fp32.onnx              | the fused graph (OpenVINO also runs it in bf16)    |
| int8           | vision-int8.onnx              | dynamic int8 (activations scaled at run time)      |
| int8-static    | vision-int8-static.onnx       | static QDQ int8, calibrated on images              |
| openvino-int8  | vision-openvino-int8.xml/.bin | NNCF int8 for OpenVINO (bf16 where native)         |

Each is measured against transformers (cosine) on the engine that runs it, and added to the
bundle's ``medgemma`` component with its fidelity; the device picks among them
(:mod:`edge.device.encoders`). The runtime feeds the embeddings to llama.cpp exactly as it feeds
cached ones (edge/medgemma/model.py), so the mmproj stays the fallback.
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

PRECISIONS = ("fp32", "int8", "int8-static", "openvino-int8")
ROLE = "vision-onnx"


_PREFIXES = {  # checkpoint name prefix (either layout transformers saves) -> our module's
    "vision_tower.": "vision_tower.",
    "model.vision_tower.": "vision_tower.",
    "multi_modal_projector.": "multi_modal_projector.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}


def vision_module(config):
    """The vision tower + projector of a ``Gemma3Config`` as one torch module (weights as
    transformers initialises them), eager attention: ``pixel_values -> [B, T, n_embd]``."""
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

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

    return VisionOnly()


def _load_reference(src: Path):
    """The vision tower + projector only (0.4B parameters, ~1.7 GB in fp32), with the
    checkpoint's weights: loading the whole 4B model in fp32 would need ~17 GB."""
    transformers = require("transformers", "export")
    from safetensors import safe_open

    cfg_json = json.loads((src / "config.json").read_text())
    if "Gemma3ForConditionalGeneration" not in cfg_json.get("architectures", []):
        raise InputError(f"{src}: not a Gemma3ForConditionalGeneration checkpoint")
    config = transformers.Gemma3Config.from_pretrained(src)
    model = vision_module(config)
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


def _fidelity(path: Path, x: np.ndarray, ref: np.ndarray, engine: str | None = None) -> dict:
    """Cosine of ``path``'s embeddings (one image per run, on ``engine``; default onnxruntime)
    against transformers' on the same inputs."""
    from edge.device import accel, encoders

    e = encoders.ENGINES[engine or "ort-fp32"]
    runner = accel.open_runner(path, e.runtime, hint=e.ov_hint())
    got = np.concatenate([runner.run({"pixel_values": x[i : i + 1]})[0] for i in range(len(x))])
    a, b = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {
        "images": len(x),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "max_abs_diff": float(np.abs(ref - got).max()),
        "reference": "transformers get_image_features (fp32)",
        **({"engine": engine} if engine else {}),
    }


def parse_precisions(precisions: str | list[str]) -> list[str]:
    """``"int8,int8-static"`` → a list; UsageError naming an unknown one."""
    precs = [
        p.strip() for p in (precisions.split(",") if isinstance(precisions, str) else precisions) if p.strip()
    ]
    for p in precs:
        if p not in PRECISIONS:
            raise UsageError(f"unknown vision precision {p!r} (one of {', '.join(PRECISIONS)})")
    return precs


def calibration_pixels(spec: dict, source: str | os.PathLike | None, n: int) -> tuple[np.ndarray, dict]:
    """The calibration images as ``pixel_values`` through the device's preprocessing, and how
    the manifest describes them (see :func:`export.onnx.static_quant.calibration_images`)."""
    from edge.medsiglip.preprocess import ImageSpec, images_to_batch
    from export.onnx.static_quant import calibration_images

    images, info = calibration_images(source, n)
    return images_to_batch(images, ImageSpec.from_json(spec)), info


def build_encoder(
    prec: str, fp32: Path, out: Path, calib: np.ndarray | None, ref, *, external_data: bool = False
) -> tuple[dict, list[Path]]:
    """Derive the ``prec`` encoder file(s) from the fused fp32 graph into ``out`` (the .onnx, or the
    OpenVINO .xml beside its .bin) and measure it; returns (manifest details, files written).

    ``int8-static`` keeps per-channel or per-tensor weight scales, whichever measures closer.
    """
    if prec == "fp32":
        out.write_bytes(fp32.read_bytes())
        details = {"engine": "ort-fp32", "fidelity": _fidelity(out, *ref)}
        if encoders_runtime("openvino"):  # the same file on OpenVINO in bf16: no file of its own
            details["engine_fidelity"] = {"ov-bf16": _fidelity(out, *ref, engine="ov-bf16")}
        return details, [out]
    if prec == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # the fused attention nodes are a contrib op shape inference can't see through
        quantize_dynamic(
            str(fp32), str(out), weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": 1}
        )  # onnx.TensorProto.FLOAT
        return {"engine": "ort-int8", "quantization": "dynamic", "fidelity": _fidelity(out, *ref)}, [out]
    if prec == "int8-static":
        from export.onnx.static_quant import quantize_qdq

        best = None
        cache = out.with_name(out.name + ".ranges.json")
        for per_channel in (True, False):
            cand = out.with_name(f"{out.stem}.{'pc' if per_channel else 'pt'}.onnx")
            quantize_qdq(
                fp32, cand, calib, per_channel=per_channel, ranges_cache=cache, external_data=external_data
            )
            fid = _fidelity(cand, *ref, engine="ort-int8-static")
            log.info("int8-static per_channel=%s: cosine min %.5f", per_channel, fid["cosine_min"])
            if best is None or fid["cosine_min"] > best[1]["cosine_min"]:
                if best is not None:
                    best[0].unlink()
                best = (cand, fid, per_channel)
            else:
                cand.unlink()
        cache.unlink(missing_ok=True)
        os.replace(best[0], out)
        q = {"method": "static QDQ (min/max)", "per_channel": best[2], "activations": "u8", "weights": "s8"}
        return {"engine": "ort-int8-static", "quantization": q, "fidelity": best[1]}, [out]
    if prec == "openvino-int8":
        from export.onnx.openvino import quantize_nncf

        xml, bin_ = quantize_nncf(fp32, out, calib)
        fid = _fidelity(xml, *ref, engine="ov-int8")
        q = {
            "method": "NNCF post-training (min/max, transformer preset, no SmoothQuant)",
            "compute": "bf16 where native",
        }
        return {"engine": "ov-int8", "quantization": q, "fidelity": fid}, [xml, bin_]
    raise UsageError(f"unknown vision precision {prec!r}")


def encoders_runtime(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _file_name(prec: str) -> str:
    return "vision-openvino-int8.xml" if prec == "openvino-int8" else f"vision-{prec}.onnx"


def export_vision_onnx(
    src: str | os.PathLike,
    *,
    bundle: str | os.PathLike,
    precisions: str | list[str] = "int8",
    calibration: str | os.PathLike | None = None,
    calibration_images: int = 4,
    progress=None,
) -> list[dict]:
    """Add the image encoder (tower + projector) at ``precisions`` to ``bundle``'s medgemma component:
    ``medgemma/vision-<PREC>.onnx`` (fp32, int8 = dynamic, int8-static = static QDQ) and
    ``vision-openvino-int8.xml``/``.bin`` (openvino-int8 = NNCF, needs the ``openvino`` extra).

    ``calibration``: a folder of images to calibrate the static int8 encoders on (None: generated
    images; use your own for real weights); ``calibration_images``: how many.
    The bundle must already hold a medgemma component exported from the same checkpoint.
    Returns the manifest entries written (with their fidelity).
    """
    precs = parse_precisions(precisions)
    if "openvino-int8" in precs:
        require("openvino", "openvino")
        require("nncf", "openvino")
    src = Path(src)
    open_bundle(bundle).component("medgemma")  # fails early, naming the bundle
    t0 = time.perf_counter()
    model = _load_reference(src)
    vc = model.config.vision_config
    spec = preprocess_spec(src, model)
    static = {"int8-static", "openvino-int8"} & set(precs)
    calib, calib_info = calibration_pixels(spec, calibration, calibration_images) if static else (None, None)
    entries = []
    with (  # the scratch directory is made while the writer holds the bundle's lock
        BundleWriter(bundle, "medgemma", update=True, progress=progress) as w,
        tempfile.TemporaryDirectory(prefix=work_prefix(w.root, "vision"), dir=w.root.parent) as tmp,
    ):
        ref = _reference(model, spec["height"])
        fp32 = _export_fp32(
            model,
            spec["height"],
            Path(tmp) / "vision-fp32.onnx",
            heads=vc.num_attention_heads,
            hidden=vc.hidden_size,
        )
        del model
        for prec in precs:
            rel = f"medgemma/{_file_name(prec)}"
            details, written = build_encoder(prec, fp32, w.path(rel), calib, ref)
            log.info("vision-%s: cosine min %.5f vs transformers", prec, details["fidelity"]["cosine_min"])
            if prec in static:
                details["calibration"] = calib_info
            if prec == "openvino-int8":
                from export.onnx.openvino import DATA_ROLE
                from export.onnx.openvino import ROLE as OV_ROLE

                entries.append(w.add_file(rel, role=OV_ROLE, precision=prec, preprocess=spec, **details))
                w.add_file(f"medgemma/{written[1].name}", role=DATA_ROLE, precision=prec, data_of=rel)
                continue
            onnx_info = {
                "inputs": ["pixel_values"],
                "outputs": ["image_embeds"],
                "attention": "MultiHeadAttention",
            }
            entries.append(
                w.add_file(rel, role=ROLE, precision=prec, preprocess=spec, onnx=onnx_info, **details)
            )
    log.info("vision encoder export (%s) in %.1fs", ",".join(precs), time.perf_counter() - t0)
    return entries
