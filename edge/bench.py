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
from edge.cli import emit_json

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
    from edge.gguf_header import tensor_bytes

    return sum(tensor_bytes(shape, ttype) for shape, ttype in header.tensors.values())


def _noise_image(size: int = 896):
    from PIL import Image

    from edge.images import load_image

    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8")).save(buf, "PNG")
    return load_image(buf.getvalue())


def run_bench(
    bundle: str | os.PathLike,
    *,
    quant: str | None = None,
    n_ctx: int = 2048,
    threads: int | None = None,
    tokens: int = 64,
    prompt_tokens: int = 256,
    image: bool = True,
) -> dict:
    """Measure one bundle's MedGemma on this device. Returns a flat dict of figures."""
    from edge.gguf_header import read_header
    from edge.llm import GenerateOptions, MedGemma

    t0 = time.perf_counter()
    model = MedGemma(bundle, quant=quant, n_ctx=n_ctx, n_threads=threads)
    load_s = time.perf_counter() - t0
    with model:
        header = read_header(model.bundle.path(model.info["text"]))
        filler = " ".join(
            ["The chest radiograph shows no acute cardiopulmonary abnormality."] * (prompt_tokens // 10)
        )
        text = model.ask(
            filler + " Summarize.", options=GenerateOptions(max_tokens=tokens, temperature=0.0, stop=[])
        )
        out = {
            "bundle": str(model.bundle.root),
            "text": model.info["text"],
            "quant": model.info["quant"],
            "synthetic": model.info["synthetic"],
            "threads": model.n_threads,
            "n_ctx": model.n_ctx,
            "load_s": load_s,
            "prompt_tokens": text.usage["prompt_tokens"],
            "prompt_tps": text.timings["prompt_tps"],
            "ttft_text_s": text.timings["ttft_s"],
            "generated_tokens": text.usage["completion_tokens"],
            "generation_tps": text.timings["generation_tps"],
            "memory_estimate_bytes": model.memory_estimate.total,
        }
        if image and model.mtmd is not None:
            img = _noise_image()
            opts = GenerateOptions(max_tokens=8, temperature=0.0)
            cold = model.ask("Describe this image.", images=[img], options=opts)
            warm = model.ask("Describe this image.", images=[img], options=opts)
            out.update(
                ttft_image_cold_s=cold.timings["ttft_s"],
                image_encode_s=cold.timings["image_encode_s"],
                ttft_image_cached_s=warm.timings["ttft_s"],
            )
    out["peak_rss_bytes"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )  # before the bandwidth buffer
    bw = memory_bandwidth(out["threads"])
    per_token = weight_bytes_per_token(header)
    out.update(
        memory_bandwidth_gbs=bw / 1e9,
        weight_bytes_per_token=per_token,
        roofline_tps=bw / per_token,
        roofline_fraction=out["generation_tps"] / (bw / per_token),
    )
    return out


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
    from edge.cli import default_bundle

    p = sub.add_parser("bench", help="measure this device with a bundle: speed, latency, memory")
    p.add_argument("-b", "--bundle", default=default_bundle())
    p.add_argument("--quant")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--threads", type=int)
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--no-image", action="store_true")
    p.add_argument("--history", type=Path, default=HISTORY, help=f"append results here (default {HISTORY})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_bench_cli)


def run_bench_cli(args: argparse.Namespace) -> int:
    from edge.llm import resolve_bundle

    r = run_bench(
        resolve_bundle(args.bundle),
        quant=args.quant,
        n_ctx=args.ctx,
        threads=args.threads,
        tokens=args.tokens,
        image=not args.no_image,
    )
    path = append_history(r, args.history)
    if args.json:
        emit_json({"ok": True, "history": str(path), **r})
        return 0
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
            (
                "first token, image (cold)",
                f"{r['ttft_image_cold_s']:.2f} s (encode {r['image_encode_s']:.2f} s)",
            ),
            ("first token, image (cached)", f"{r['ttft_image_cached_s']:.2f} s"),
        ]
    rows += [
        ("peak RSS", f"{r['peak_rss_bytes'] / gib:.2f} GiB (estimate {r['memory_estimate_bytes'] / gib:.2f})")
    ]
    print(
        f"{r['bundle']} — {r['text']}, {r['threads']} threads"
        + (" (synthetic twin)" if r["synthetic"] else "")
    )
    for k, v in rows:
        print(f"  {k:<28} {v}")
    print(f"history: {path}")
    return 0
