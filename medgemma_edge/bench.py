"""``medgemma-edge bench``: what this device does with this bundle, measured.

Load time, prompt and generation tokens/s, time to first token (text; image cold and cached),
image encode time, peak RSS, and generation as a fraction of the memory roofline: each token
reads every weight once, so tokens/s can't beat (memory bandwidth ÷ bytes of weights read per
token); the bandwidth is measured here, on this machine, by reading a buffer larger than the
caches with as many threads as the model uses. Results are appended to a history file
(JSON lines) so a regression shows as a step in the series.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import resource
import threading
import time
from pathlib import Path

import numpy as np

from edge import __version__
from edge.errors import UsageError
from medgemma_edge.common import emit_json

HISTORY = (
    Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "medgemma-edge" / "bench.jsonl"
)


def memory_bandwidth(threads: int, *, mib: int = 512, repeats: int = 3) -> float:
    """Read bandwidth in bytes/s: ``threads`` threads summing disjoint slices of a buffer far
    larger than the caches (numpy releases the GIL while it reduces). Best of ``repeats``."""
    buf = np.ones(mib * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(buf, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, buf.nbytes / (time.perf_counter() - t0))
    return best


def weight_bytes_per_token(header) -> int:
    """Bytes of weights a decode step reads: every tensor once (Gemma ties the output matrix to
    the token embeddings, so those are read in full for the logits too)."""
    from edge.bundle.gguf_header import tensor_bytes

    return sum(tensor_bytes(shape, ttype) for shape, ttype in header.tensors.values())


def _noise_image(size: int = 896):
    from PIL import Image

    from edge.media.images import load_image

    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8")).save(buf, "PNG")
    return load_image(buf.getvalue())


def run_bench(
    bundle: str | os.PathLike,
    *,
    profile: str | None = None,
    tokens: int = 64,
    prompt_tokens: int = 256,
    image: bool = True,
    image_cache=None,
    **overrides,
) -> dict:
    """Measure one bundle's MedGemma (and MedSigLIP, when the bundle has it) on this device
    under a device profile (auto-detected when None); ``overrides`` are MedGemma settings that
    win over the profile. Returns a flat dict of figures."""
    from edge.bundle.gguf_header import read_header
    from edge.bundle.manifest import open_bundle
    from edge.device import profiles
    from edge.medgemma.model import GenerateOptions, MedGemma

    opened = open_bundle(bundle)
    name, settings = profiles.medgemma_settings(opened, profile, **overrides)
    t0 = time.perf_counter()
    model = MedGemma(opened, settings, image_cache=image_cache)
    load_s = time.perf_counter() - t0
    with model:
        header = read_header(model.bundle.path(model.info["text"]))
        filler = " ".join(
            ["The chest radiograph shows no acute cardiopulmonary abnormality."] * (prompt_tokens // 10)
        )
        text = model.ask(
            filler + " Summarize.", options=GenerateOptions(max_tokens=tokens, temperature=0.0, stop=[])
        )
        est = model.memory_estimate
        out = {
            "bundle": str(model.bundle.root),
            "profile": name,
            "text": model.info["text"],
            "quant": model.info["quant"],
            "image_encoder": model.info["image_encoder"],
            "synthetic": model.info["synthetic"],
            "threads": model.n_threads,
            "n_ctx": model.n_ctx,
            "kv_type": settings.kv_type,
            "repack": settings.repack,
            "swa_full": settings.swa_full,
            "load_s": load_s,
            "prompt_tokens": text.usage["prompt_tokens"],
            "prompt_tps": text.timings["prompt_tps"],
            "ttft_text_s": text.timings["ttft_s"],
            "generated_tokens": text.usage["completion_tokens"],
            "generation_tps": text.timings["generation_tps"],
            "memory_estimate_bytes": est.total,
            "memory_estimate": {
                "weights": est.weights,
                "repacked": est.repacked,
                "kv_cache": est.kv_cache,
                "image_encoder": est.projector,
                "buffers": est.overhead,
            },
            "file_bytes": est.weights,
        }
        out["peak_rss_text_bytes"] = _peak_rss()
        if image and model.encoder is not None:
            out.update(_image_figures(model, GenerateOptions(max_tokens=8, temperature=0.0)))
    out["peak_rss_bytes"] = _peak_rss()  # before the bandwidth buffer
    if image and "medsiglip" in opened.manifest.get("components", {}):
        out.update(_medsiglip_figures(opened, settings.n_threads or model.n_threads))
    bw = memory_bandwidth(out["threads"])
    per_token = weight_bytes_per_token(header)
    out.update(
        memory_bandwidth_gbs=bw / 1e9,
        weight_bytes_per_token=per_token,
        roofline_tps=bw / per_token,
        roofline_fraction=out["generation_tps"] / (bw / per_token),
    )
    return out


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _image_figures(model, opts) -> dict:
    """Image question cold (encoder runs), a follow-up in the same conversation, a new question
    about the same image, and the same with the KV cache dropped (embeddings from the cache)."""
    img = _noise_image(model.encoder.spec.height if hasattr(model.encoder, "spec") else 896)
    question = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}
    ]

    def run(messages) -> dict:
        *_, last = model.stream(messages, images=[img], options=opts)
        return last.timings

    cold = run(question)
    answer = "The image shows a frontal chest radiograph."  # a fixed turn: the same for every run
    follow = run(
        question + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Any effusion?"}]
    )
    again = run(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the heart enlarged?"}]}]
    )
    model.forget_context()  # forget what the KV cache holds: the image comes from the embedding cache
    cached = run(question)
    model.forget_context()
    t0 = time.perf_counter()
    model.prepare_image(img)  # what the page does while the user types (embeddings cached here)
    prepare_s = time.perf_counter() - t0
    prepared = run(question)
    return {
        "prepare_prefill_s": prepare_s,
        "ttft_image_prepared_s": prepared["ttft_s"],
        "ttft_image_cold_s": cold["ttft_s"],
        "image_encode_s": cold["image_encode_s"],
        "ttft_image_followup_s": follow["ttft_s"],
        "followup_reused_tokens": follow["kv_reused_tokens"],
        "ttft_image_new_question_s": again["ttft_s"],
        "ttft_image_cached_s": cached["ttft_s"],
        "image_engine": getattr(model.encoder, "engine", None) or "mmproj",  # which engine ran the encoder
    }


def _medsiglip_figures(bundle, threads: int) -> dict:
    from edge.medsiglip.model import MedSigLIP

    img = _noise_image(448)
    sig = MedSigLIP(bundle, threads=threads)
    sig.embed_images([img])  # warm-up: session initialisation
    t0 = time.perf_counter()
    sig.embed_images([img])
    return {
        "medsiglip_encode_s": time.perf_counter() - t0,
        "medsiglip_precision": sig.precision,
        "medsiglip_engine": sig.engine,
    }


def quick_calibration(bundle, *, threads: int) -> dict:
    """``bench --quick``: :func:`edge.medgemma.vision.calibrate` on one noise image at the
    encoder's size; returns its result with the CPU class and threads."""
    from edge.device import accel
    from edge.medgemma.vision import calibrate

    entry = next(
        (
            f
            for f in bundle.component("medgemma")["files"]
            if f["role"] == "vision-onnx" and "preprocess" in f
        ),
        None,
    )
    if entry is None:
        raise UsageError(
            f"bundle {bundle.root} has no exported image encoder to calibrate; export one with "
            "`export medgemma ... --vision-onnx int8,int8-static`"
        )
    image = _noise_image(int(entry["preprocess"]["height"]))
    result = calibrate(bundle, image, threads=threads)
    return {**result, "threads": threads, "cpu": accel.cpu_class()}


def append_history(result: dict, path: Path = HISTORY) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **result,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return path


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from medgemma_edge.options import add_model_options

    p = sub.add_parser("bench", help="measure this device with a bundle: speed, latency, memory")
    add_model_options(p)
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--no-image", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="only the one-time device calibration: time each image-encoder engine on one image and "
        "record the fastest that meets the fidelity bar (the runtime then uses it)",
    )
    p.add_argument("--history", type=Path, default=HISTORY, help=f"append results here (default {HISTORY})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_bench_cli)


def run_bench_cli(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from edge.files import kind_of
    from medgemma_edge.common import check_range
    from medgemma_edge.options import medgemma_settings

    check_range("--tokens", args.tokens, 1, 1 << 20)
    if args.history.exists() and not args.history.is_file():  # checked before the minutes of measuring
        raise UsageError(f"--history {args.history} is {kind_of(args.history.stat().st_mode)}, not a file")
    bundle, settings, cache = medgemma_settings(args)  # the profile's choices with the flags applied
    if args.quick:
        q = quick_calibration(bundle, threads=settings.n_threads or os.cpu_count() or 1)
        if args.json:
            emit_json({"ok": True, **q})
            return 0
        print(f"{bundle.root} — image encoder engines on this device ({q['threads']} threads, {q['cpu']})")
        for name, row in q["engines"].items():
            cos = row.get("cosine_min_vs_fp32")
            mark = "  <- chosen" if name == q["choice"] else ("" if row["meets_bar"] else "  (below the bar)")
            print(
                f"  {name:<16} {row['seconds']:>7.2f} s  open {row['open_seconds']:>5.2f} s  "
                f"cosine vs fp32 {'-' if cos is None else f'{cos:.5f}'}{mark}"
            )
        print(f"recorded in {q['state']}")
        return 0
    r = run_bench(
        bundle.root,
        profile=args.profile,
        tokens=args.tokens,
        image=not args.no_image,
        image_cache=cache,
        **asdict(settings),
    )
    path = append_history(r, args.history)
    if args.json:
        emit_json({"ok": True, "history": str(path), **r})
        return 0
    print(
        f"{r['bundle']} — {r['text']}, profile {r['profile']}, {r['threads']} threads"
        + (" (synthetic twin)" if r["synthetic"] else "")
    )
    for k, v in table_rows(r):
        print(f"  {k:<30} {v}")
    print(f"history: {path}")
    return 0


def table_rows(r: dict) -> list[tuple[str, str]]:
    gib = 2**30
    rows = [
        ("load", f"{r['load_s']:.2f} s"),
        ("prompt", f"{r['prompt_tps']:.1f} tok/s ({r['prompt_tokens']} tokens)"),
        ("generation", f"{r['generation_tps']:.1f} tok/s ({r['generated_tokens']} tokens)"),
        (
            "  roofline",
            f"{r['roofline_tps']:.1f} tok/s = {r['memory_bandwidth_gbs']:.1f} GB/s ÷ "
            f"{r['weight_bytes_per_token'] / 1e9:.2f} GB/token → {r['roofline_fraction'] * 100:.0f}% of it",
        ),
        ("first token, text", f"{r['ttft_text_s']:.2f} s"),
    ]
    if "ttft_image_cold_s" in r:
        rows += [
            ("image encoder", str(r["image_encoder"])),
            (
                "first token, image cold",
                f"{r['ttft_image_cold_s']:.2f} s (encode {r['image_encode_s']:.2f} s)",
            ),
            (
                "first token, follow-up",
                f"{r['ttft_image_followup_s']:.2f} s ({r['followup_reused_tokens']} tokens reused)",
            ),
            ("first token, same image", f"{r['ttft_image_new_question_s']:.2f} s (new question)"),
            ("first token, KV dropped", f"{r['ttft_image_cached_s']:.2f} s (embeddings from cache)"),
            (
                "first token, after prepare",
                f"{r['ttft_image_prepared_s']:.2f} s (prepare_image: prefill {r['prepare_prefill_s']:.2f} s)",
            ),
        ]
    if "medsiglip_encode_s" in r:
        rows.append(("MedSigLIP image", f"{r['medsiglip_encode_s']:.2f} s ({r['medsiglip_precision']})"))
    rows.append(
        ("peak RSS", f"{r['peak_rss_bytes'] / gib:.2f} GiB (estimate {r['memory_estimate_bytes'] / gib:.2f})")
    )
    return rows
