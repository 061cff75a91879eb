"""MedSigLIP checkpoint → bundle component ``medsiglip``: ONNX towers, preprocessing, labels.

One straight pipeline (:func:`export_medsiglip`):

1. validate the source before any work (a SigLIP config, its weights and its tokenizer);
2. one tower at a time (``SiglipVisionModel``, then ``SiglipTextModel``; fp32, eager
   attention): export it to fp32 ONNX (:mod:`export.onnx_graph`) and compute its reference
   embeddings of the fixed fidelity inputs and, for text, of the default label sets;
3. derive the requested precisions (dynamic int8, fp16) and measure each against the
   reference through the device path (:mod:`export.onnx_fidelity`);
4. write what the device needs to reproduce preprocessing (``preprocess.json``, the
   SentencePiece model with the dummy prefix switched off, as SiglipTokenizer loads it) and
   the label embeddings (``label_embeddings.npz``);
5. commit through :class:`edge.bundle.write.BundleWriter` (hashes, manifest, NOTICE, atomic swap),
   then verify the written component.

Loading one tower at a time lowers the export's peak memory (full-size twin, int8: peak RSS
7.1 GiB, against 9.0 GiB when the whole SiglipModel stayed loaded through the export).
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.bundle import registry
from edge.bundle.atomic import work_prefix
from edge.bundle.manifest import open_bundle
from edge.bundle.write import BundleWriter
from edge.errors import InputError, UsageError, require
from edge.medsiglip.preprocess import RESAMPLE_NAMES, ImageSpec, SiglipTokenizer, TextSpec, images_to_batch
from export.choices import parse_choices
from export.onnx import fidelity as fid
from export.onnx import graph
from export.onnx.labels import LABEL_SETS, label_sets_manifest

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "fp16", "int8-static")  # int8-static: export.onnx.medsiglip_fused
COMPONENT = "medsiglip"
REGISTRY_ID = "medsiglip-448"
TOWERS = ("vision", "text")
FIDELITY_BATCH = 1  # one image per run, as a device runs it (dynamic int8 depends on the batch)


@dataclass
class ExportResult:
    """What :func:`export_medsiglip` wrote."""

    bundle: Path
    precisions: list[str]
    files: list[dict]
    fidelity: dict
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


# --- validation ------------------------------------------------------------------------------------


def validate_source(src: Path) -> dict:
    """Check ``src`` is a SigLIP checkpoint with weights and a tokenizer; return its config.

    Raises:
        InputError: one line naming what is missing or wrong.
    """
    if not src.is_dir():
        raise InputError(f"{src} is not a directory; give a MedSigLIP checkpoint directory")
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{src} has no config.json; is it a Hugging Face checkpoint directory?") from None
    except ValueError as exc:
        raise InputError(f"{src}/config.json is not valid JSON ({exc})") from None
    mtype = config.get("model_type")
    if mtype != "siglip" or "vision_config" not in config or "text_config" not in config:
        arch = ",".join(config.get("architectures") or []) or "unknown architecture"
        raise InputError(
            f"{src} is a {mtype!r} checkpoint ({arch}), not SigLIP; `export medsiglip` needs a "
            "SiglipModel checkpoint such as google/medsiglip-448 (MedGemma goes to `export medgemma`)"
        )
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise InputError(f"{src}: weight shard {missing[0]} is missing ({len(missing)} of {len(shards)})")
    elif not (src / "model.safetensors").is_file():
        raise InputError(f"{src} has no weights (model.safetensors or shards); copy the whole checkpoint")
    if not (src / "spiece.model").is_file():
        raise InputError(f"{src} has no tokenizer (spiece.model); copy the whole checkpoint")
    return config


def parse_precisions(spec: str | list[str]) -> list[str]:
    """``"int8,fp32"`` → ``["int8", "fp32"]``; UsageError on an unknown name."""
    return parse_choices(
        spec,
        choices=PRECISIONS,
        what="precision",
        none_given="give at least one precision (int8, fp16, fp32)",
    )


def _source_info(src: Path, config: dict) -> dict:
    from export.twin import twin_info

    twin = twin_info(src)
    if twin:
        return {
            "description": f"synthetic twin of {twin['model']} ({twin['size']}, seed {twin['seed']})",
            "synthetic": True,
            "twin": twin,
        }
    spec = registry.get(REGISTRY_ID)
    snap = re.search(r"snapshots/([0-9a-f]{40})", str(src.resolve()))
    return {
        "description": spec.hf_id,
        "model_id": spec.hf_id,
        "revision": snap.group(1) if snap else "unknown (local directory)",
        "synthetic": False,
        "architectures": config.get("architectures"),
    }


# --- preprocessing spec ----------------------------------------------------------------------------


def preprocessing(src: Path, processor) -> tuple[ImageSpec, TextSpec, bytes]:
    """The device preprocessing spec and the tokenizer model bytes, from the checkpoint."""
    ip, tok = processor.image_processor, processor.tokenizer
    resample = ip.resample
    name = RESAMPLE_NAMES.get(int(resample)) if resample is not None else "bicubic"
    if name is None:
        raise InputError(f"{src}/preprocessor_config.json: unsupported resample {resample!r}")
    img = ImageSpec(
        height=int(ip.size["height"]),
        width=int(ip.size["width"]),
        resample=name,
        rescale_factor=float(ip.rescale_factor),
        mean=tuple(float(x) for x in ip.image_mean),
        std=tuple(float(x) for x in ip.image_std),
    )
    if not (ip.do_resize and ip.do_rescale and ip.do_normalize):
        raise InputError(f"{src}: preprocessor disables resize/rescale/normalize; not a MedSigLIP setup")
    txt = TextSpec(
        max_length=64,
        lowercase=bool(getattr(tok, "do_lower_case", True)),
        eos_token=str(tok.eos_token),
        unk_token=str(tok.unk_token),
        pad_id=int(tok.pad_token_id),
        special_tokens=tuple((str(k), int(v)) for k, v in tok.added_tokens_encoder.items()),
    )
    # SiglipTokenizer loads spiece.model with add_dummy_prefix switched off: store it that way.
    return img, txt, tok.sp_model.serialized_model_proto()


# --- running exported graphs ---------------------------------------------------------------------


def _ort_run(path: Path, name: str, x: np.ndarray, threads: int | None = None) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs: dict[str, list] = {}
    for i in range(0, len(x), FIDELITY_BATCH):
        for o, v in zip(sess.get_outputs(), sess.run(None, {name: x[i : i + FIDELITY_BATCH]}), strict=True):
            outs.setdefault(o.name, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def _openvino_fidelity(path: Path, pixels: np.ndarray, ref: dict, threads: int | None) -> dict | None:
    """The fp32 vision tower on OpenVINO with bf16 compute (what :mod:`edge.medsiglip` runs where
    the CPU has AVX512-BF16/AMX) against the reference; None without OpenVINO. On a CPU without
    native bf16 OpenVINO computes in fp32, and the figure says which."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return None
    from edge.device import accel

    runner = accel.open_runner(path, "openvino", threads=threads, hint="bf16")
    outs = [
        runner.run({"pixel_values": pixels[i : i + FIDELITY_BATCH]})
        for i in range(0, len(pixels), FIDELITY_BATCH)
    ]
    got = np.concatenate([o[runner.outputs.index("image_embeds")] for o in outs])
    compute = "bf16" if accel.cpu_class() == "bf16" else "fp32"
    return {**fid.compare(ref["image_embeds"], got), "engine": "openvino", "compute": compute}


def _ram_estimate(weight_bytes: int, cfg: dict, tower: str) -> int:
    """Rough resident memory for batch 1: weights + activations of eager attention."""
    c = cfg[f"{tower}_config"]
    seq = (c.get("image_size", 448) // c.get("patch_size", 14)) ** 2 if tower == "vision" else 64
    hidden, heads = c.get("hidden_size", 1152), c.get("num_attention_heads", 16)
    act = 3 * heads * seq * seq * 4 + 24 * seq * hidden * 4
    return int(weight_bytes * 1.1 + act + (64 << 20))


# --- the pipeline ----------------------------------------------------------------------------------


def export_medsiglip(
    src: str | Path,
    *,
    bundle: str | Path,
    precisions: list[str] | str = ("int8",),
    int8_variant: str = graph.DEFAULT_INT8,
    external_data: bool | None = None,
    fidelity_images: int = 6,
    calibration: str | Path | None = None,
    calibration_images: int = 8,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a MedSigLIP checkpoint into ``bundle`` as component ``medsiglip``.

    Args:
        src: checkpoint directory (google/medsiglip-448 or a twin).
        bundle: bundle directory (created, or updated keeping its other components).
        precisions: any of fp32, int8, fp16.
        int8_variant: one of :data:`export.graph.INT8_VARIANTS`.
        external_data: True forces weights into ``.onnx.data`` files; None: only graphs > 1.8 GB.
        fidelity_images: how many fixed synthetic images the fidelity check uses.
        calibration: a folder of images to calibrate ``int8-static`` on (None: generated images,
            a different set from the fidelity images); ``calibration_images``: how many.
        threads: onnxruntime threads for the fidelity runs (None: onnxruntime's default).
        progress: ``progress(step, steps)`` after each stage.
        stage: called with a short description as each stage starts.

    Raises:
        InputError: the source is not a usable SigLIP checkpoint (nothing is written).
        UsageError: bad precision / variant, or the bundle path is taken by something else.
    """
    t_start = time.perf_counter()
    src = Path(src)
    precisions = parse_precisions(precisions)
    if int8_variant not in graph.INT8_VARIANTS:
        raise UsageError(
            f"unknown int8 variant {int8_variant!r}; choose from {', '.join(graph.INT8_VARIANTS)}"
        )
    config = validate_source(src)
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    require("onnx", "export")
    steps = 5 + 2 * len(precisions)
    step = 0
    times: dict[str, float] = {}

    def begin(what: str) -> float:
        log.info("medsiglip export: %s", what)
        if stage:
            stage(what)
        return time.perf_counter()

    def end(what: str, t0: float) -> None:
        nonlocal step
        times[what] = time.perf_counter() - t0
        step += 1
        if progress:
            progress(step, steps)

    t0 = begin("load processor")
    try:
        processor = transformers.SiglipProcessor.from_pretrained(src, use_fast=False)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{src}: transformers can't load its processor: {str(exc).splitlines()[0]}"
        ) from None
    img_spec, txt_spec, sp_bytes = preprocessing(src, processor)
    scale, bias = logit_scale_bias(src)
    end("load", t0)
    images = fid.sample_images(fidelity_images)
    calib_px, calib_info = None, None
    if "int8-static" in precisions:
        from export.onnx.static_quant import calibration_images as _calibration

        calib_imgs, calib_info = _calibration(calibration, calibration_images)
        calib_px = images_to_batch(calib_imgs, img_spec)
    texts = [p for s in LABEL_SETS.values() for p in s.values()] + fid.EXTRA_TEXTS

    bundle = Path(bundle)
    with (
        BundleWriter(bundle, COMPONENT) as w,
        tempfile.TemporaryDirectory(prefix=work_prefix(w.root, "onnx"), dir=w.staging.parent) as work_dir,
    ):
        work = Path(work_dir)
        fp32: dict[str, Path] = {}
        ref: dict[str, np.ndarray] = {}
        ref_labels: dict[str, np.ndarray] = {}
        # one tower in memory at a time: the export itself holds ~2x the tower's weights
        for tower in TOWERS:
            t0 = begin(f"export {tower} tower (fp32 ONNX) and its reference embeddings")
            model = _load_tower(transformers, torch, src, tower)
            fp32[tower] = graph.export_tower(
                model, tower, work / f"{tower}-fp32.onnx", external_data=external_data
            )
            if tower == "vision" and calib_px is not None:  # needs the torch tower: built now
                from export.onnx.medsiglip_fused import vision_static

                vision_static(model.vision_model, work / "vision-int8-static.onnx", calib_px)
            if tower == "vision":
                ref.update(fid.reference_embeddings(processor, vision=model, images=images))
            else:
                ref.update(fid.reference_embeddings(processor, text=model, texts=texts))
                for name, s in LABEL_SETS.items():
                    emb = fid.reference_embeddings(processor, text=model, texts=list(s.values()))
                    ref_labels[name] = fid.normalize(emb["text_embeds"])
            del model
            gc.collect()
            end(f"export-{tower}", t0)

        # the device path's inputs, through edge's preprocessing
        (work / "spiece.model").write_bytes(sp_bytes)
        tokenizer = SiglipTokenizer(work / "spiece.model", txt_spec)
        pixels = images_to_batch(images, img_spec)
        ids = tokenizer.batch(texts)

        fidelity: dict[str, dict] = {}
        sizes: dict[str, int] = {}
        # fp32 last: its files are hard links of the work copies, and onnx refuses to read external
        # data with several links (a hard-link attack guard) when deriving int8 and fp16 from them
        for prec in sorted(precisions, key=lambda p: p == "fp32"):
            t0 = begin(f"{prec} towers")
            for tower in TOWERS:
                rel = f"{COMPONENT}/{tower}-{prec}.onnx"
                out = w.path(rel)
                ext = graph.has_external_data(fp32[tower])
                if prec == "fp32":
                    _link_or_copy(fp32[tower], out)
                    if ext:
                        _link_or_copy(
                            fp32[tower].with_name(fp32[tower].name + ".data"),
                            out.with_name(out.name + ".data"),
                        )
                elif prec == "int8":
                    graph.to_int8(fp32[tower], out, variant=int8_variant, external_data=ext)
                elif prec == "int8-static" and tower == "vision":
                    _link_or_copy(work / "vision-int8-static.onnx", out)
                elif prec == "int8-static":  # calibrated on the label prompts and the fidelity texts
                    from export.onnx.medsiglip_fused import text_static

                    text_static(fp32[tower], out, ids)
                else:
                    graph.to_fp16(fp32[tower], out, external_data=ext)
                static = {}
                if prec == "int8-static":
                    static = {
                        "quantization": "static QDQ per-channel (min/max)",
                        "graph": "fused attention (MultiHeadAttention)" if tower == "vision" else "plain",
                        "calibration": calib_info
                        if tower == "vision"
                        else {"kind": "texts", "texts": len(texts)},
                    }
                _add_graph(w, rel, tower, prec, config, int8_variant if prec == "int8" else None, **static)
                sizes[f"{tower}-{prec}"] = out.stat().st_size + sum(
                    p.stat().st_size for p in out.parent.glob(out.name + ".data")
                )
            end(f"convert-{prec}", t0)

            t0 = begin(f"{prec} fidelity")
            got_img = _ort_run(w.path(f"{COMPONENT}/vision-{prec}.onnx"), "pixel_values", pixels, threads)
            got_txt = _ort_run(w.path(f"{COMPONENT}/text-{prec}.onnx"), "input_ids", ids, threads)
            fidelity[prec] = {
                "vision": fid.compare(ref["image_embeds"], got_img["image_embeds"]),
                "text": fid.compare(ref["text_embeds"], got_txt["text_embeds"]),
                "zero_shot": fid.zero_shot_agreement(
                    ref["image_embeds"], got_img["image_embeds"], ref_labels, ref_labels, scale, bias
                ),
            }
            if prec == "fp32":  # the device runs this file on OpenVINO when it meets the bar
                ov = _openvino_fidelity(w.path(f"{COMPONENT}/vision-fp32.onnx"), pixels, ref, threads)
                if ov:
                    fidelity[prec]["vision_openvino"] = ov
            log.info("fidelity %s: %s", prec, json.dumps(fidelity[prec]))
            end(f"fidelity-{prec}", t0)

        fidelity = {p: fidelity[p] for p in precisions}  # in the order asked for
        t0 = begin("tokenizer, preprocessing spec, label embeddings")
        shutil.copy2(work / "spiece.model", w.path(f"{COMPONENT}/spiece.model"))
        w.add_file(f"{COMPONENT}/spiece.model", role="tokenizer", format="sentencepiece", dummy_prefix=False)
        w.path(f"{COMPONENT}/preprocess.json").write_text(
            json.dumps({"image": img_spec.to_json(), "text": txt_spec.to_json()}, indent=2) + "\n",
            encoding="utf-8",
        )
        w.add_file(f"{COMPONENT}/preprocess.json", role="preprocess")
        buf = io.BytesIO()
        np.savez(buf, **{k: v.astype(np.float32) for k, v in ref_labels.items()})
        w.path(f"{COMPONENT}/label_embeddings.npz").write_bytes(buf.getvalue())
        w.add_file(f"{COMPONENT}/label_embeddings.npz", role="label-embeddings", precision="fp32")
        end("assets", t0)

        spec = registry.get(REGISTRY_ID)
        w.component.update(
            model=REGISTRY_ID,
            architecture="SiglipModel",
            source=_source_info(src, config),
            licence=spec.licence,
            modifications=(
                "vision and text towers converted to ONNX (opset "
                f"{graph.OPSET}); precisions {', '.join(precisions)}"
                + (f" (int8: dynamic quantization, {int8_variant})" if "int8" in precisions else "")
                + ("; int8-static: fused attention, static QDQ int8" if "int8-static" in precisions else "")
                + "; default label sets embedded"
            ),
            precisions=precisions,
            default_precision=next((p for p in precisions if p in ("int8", "int8-static")), precisions[0]),
            int8_variant=int8_variant if "int8" in precisions else None,
            embedding_dim=int(ref["image_embeds"].shape[1]),
            logit_scale=scale,
            logit_bias=bias,
            zero_shot="sigmoid(exp(logit_scale) * normalize(img) @ normalize(txt).T + logit_bias)",
            preprocess=f"{COMPONENT}/preprocess.json",
            image_size=[img_spec.height, img_spec.width],
            text_length=txt_spec.max_length,
            label_sets=label_sets_manifest(),
            label_embeddings={
                "path": f"{COMPONENT}/label_embeddings.npz",
                "computed_with": "transformers SiglipModel fp32 (the reference text tower), L2-normalized",
                "note": "zero-shot on these sets needs no text tower on the device, at any precision",
            },
            fidelity={
                "reference": f"transformers {transformers.__version__} SiglipModel fp32",
                "images": len(images),
                "texts": len(texts),
                "zero_shot_uses": "exported vision tower + stored label embeddings",
                **fidelity,
            },
            sizes=sizes,
            export={
                "exporter": "torch.onnx.export (TorchScript, dynamo=False) of per-tower wrappers",
                "opset": graph.OPSET,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "onnxruntime": _ort_version(),
                "seconds": dict(times),
            },
        )
    open_bundle(bundle).verify(component=COMPONENT).raise_for_failure()
    step += 1
    if progress:
        progress(step, steps)
    files = open_bundle(bundle).component(COMPONENT)["files"]
    return ExportResult(bundle, precisions, files, fidelity, time.perf_counter() - t_start, times)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (same filesystem: the work dir sits beside the staging dir) or copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _load_tower(transformers, torch, src: Path, tower: str):
    """One tower of the checkpoint (SiglipVisionModel / SiglipTextModel), fp32, eager attention."""
    cls = transformers.SiglipVisionModel if tower == "vision" else transformers.SiglipTextModel
    try:
        return cls.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{src}: transformers can't load its {tower} tower: {str(exc).splitlines()[0]}"
        ) from None


def logit_scale_bias(src: Path) -> tuple[float, float]:
    """``logit_scale`` and ``logit_bias`` read straight from the safetensors (no model load)."""
    from safetensors import safe_open

    index = src / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    out = []
    for name in ("logit_scale", "logit_bias"):
        path = src / weight_map.get(name, "model.safetensors")
        with safe_open(str(path), framework="np") as f:
            if name not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise InputError(f"{src}: the weights have no {name}; is this a full SiglipModel checkpoint?")
            out.append(float(np.asarray(f.get_tensor(name), dtype=np.float64).reshape(-1)[0]))
    return out[0], out[1]


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _add_graph(
    w: BundleWriter, rel: str, tower: str, prec: str, config: dict, variant: str | None, **extra
) -> None:
    """Manifest entries for one graph (and its external data file, if any)."""
    out = w.path(rel)
    data = out.with_name(out.name + ".data")
    io_ = graph.graph_io(out)
    weights = out.stat().st_size + (data.stat().st_size if data.exists() else 0)
    details = {
        "precision": prec,
        "onnx": {
            "inputs": list(io_["inputs"]),
            "outputs": list(io_["outputs"]),
            "shapes": {**io_["inputs"], **io_["outputs"]},
            "opset": io_["opset"],
            "external_data": data.name if data.exists() else "",
        },
        "ram_estimate_bytes": _ram_estimate(weights, config, tower),
    }
    if variant:
        details["int8_variant"] = variant
    w.add_file(rel, role=tower, **details, **extra)
    if data.exists():
        w.add_file(f"{rel}.data", role=f"{tower}-data", precision=prec, data_of=rel)
