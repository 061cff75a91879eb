"""Benchmark: MedSigLIP full-size twin → ONNX (fp32/int8/fp16) and per-image latency vs PyTorch.

Not a test. Builds the ``full`` MedSigLIP twin once (cached in
``~/.cache/medgemma-edge/twins/medsiglip-full``, ~3.4 GB fp32), then, each in its own
subprocess so peak RSS is per step:

* export per precision (``export_medsiglip`` with that precision alone): wall time, bundle
  size of the towers, peak RSS of the exporting process;
* vision-tower latency per 448 px image at batch 1 and 4 with 2 threads: PyTorch eager
  (transformers, the baseline) and ORT fp32 / int8 / fp16, with ratios to PyTorch;
* optionally (``--int8-variants``) the dynamic-int8 variants of the vision tower: size, cosine
  vs ORT fp32 and batch-1 latency.

The load average is printed with each row: other work on the machine slows every figure.

    .venv/bin/python benchmarks/bench_onnx_export.py [--precisions fp32,int8,fp16] [--int8-variants]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "medgemma-edge"
    / "twins"
    / "medsiglip-full"
)
THREADS = 2


def _child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last. Adds peak RSS."""
    r = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )
    if r.returncode != 0:
        raise SystemExit(f"child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


_PEAK = "import resource; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"

EXPORT = """
import json, sys, time
from export.onnx.medsiglip import export_medsiglip
t = time.perf_counter()
r = export_medsiglip(sys.argv[1], bundle=sys.argv[2], precisions=[sys.argv[3]], fidelity_images=2, threads=2)
secs = time.perf_counter() - t
import resource; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
towers = sum(f["bytes"] for f in r.files if f["role"] in ("vision", "text", "vision-data", "text-data"))
print(json.dumps({"seconds": secs, "stages": r.stage_seconds, "tower_bytes": towers, "peak_rss": peak,
                  "fidelity": r.fidelity[sys.argv[3]]}))
"""

LAT_ORT = """
import json, sys, time
import numpy as np
from edge.medsiglip.onnx_towers import load_session
sess = load_session(sys.argv[1], "vision", sys.argv[2], threads=2)
assert not [m for m in ("torch", "transformers") if m in sys.modules]
x = np.random.default_rng(0).standard_normal((4, 3, 448, 448)).astype(np.float32)
sess.run(None, {"pixel_values": x[:1]})  # warm-up
t = time.perf_counter(); sess.run(None, {"pixel_values": x[:1]}); b1 = time.perf_counter() - t
t = time.perf_counter(); sess.run(None, {"pixel_values": x}); b4 = (time.perf_counter() - t) / 4
import resource; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"b1": b1, "b4": b4, "peak_rss": peak}))
"""

LAT_TORCH = """
import json, sys, time
import numpy as np, torch, transformers
torch.set_num_threads(2)
m = transformers.SiglipVisionModel.from_pretrained(sys.argv[1], dtype=torch.float32).eval()  # sdpa
x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, 448, 448)).astype(np.float32))
with torch.inference_mode():
    m(pixel_values=x[:1])  # warm-up
    t = time.perf_counter(); m(pixel_values=x[:1]); b1 = time.perf_counter() - t
    t = time.perf_counter(); m(pixel_values=x); b4 = (time.perf_counter() - t) / 4
import resource; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"b1": b1, "b4": b4, "peak_rss": peak}))
"""

VARIANT = """
import json, sys, time
from pathlib import Path
import numpy as np, onnxruntime as ort
from export.onnx import graph
src, out, variant = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
graph.to_int8(src, out, variant=variant, external_data=False)
qsecs = time.perf_counter() - t
so = ort.SessionOptions(); so.intra_op_num_threads = 2
x = np.random.default_rng(0).standard_normal((2, 3, 448, 448)).astype(np.float32)
ref = ort.InferenceSession(str(src), so).run(["image_embeds"], {"pixel_values": x})[0]
q = ort.InferenceSession(str(out), so)
q.run(None, {"pixel_values": x[:1]})
t = time.perf_counter(); got = q.run(["image_embeds"], {"pixel_values": x})[0]; b2 = (time.perf_counter() - t) / 2
cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
print(json.dumps({"quantize_s": qsecs, "bytes": out.stat().st_size, "cos_min": float(cos.min()), "b2": b2}))
"""


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default="fp32,int8,fp16")
    ap.add_argument("--int8-variants", action="store_true", help="also compare the dynamic int8 variants")
    ap.add_argument("--work", type=Path, default=None, help="where bundles go (default: a temp dir, removed)")
    ap.add_argument("--skip-export", action="store_true", help="reuse the bundles already in --work")
    args = ap.parse_args()
    precisions = args.precisions.split(",")

    free = shutil.disk_usage(tempfile.gettempdir()).free
    print(
        f"machine: {os.cpu_count()} cores, load {_load()}, {free / 2**30:.0f} GiB free disk; threads {THREADS}"
    )
    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
    print(f"memory: {mem['MemAvailable'] / 2**20:.1f} GiB available of {mem['MemTotal'] / 2**20:.1f} GiB")

    from export.twin import build_twin, twin_info

    if twin_info(CACHE) is None:
        t = time.perf_counter()
        info = build_twin("medsiglip", size="full", out=CACHE, seed=0)
        print(f"built full twin {CACHE}: {info.params:,} params in {time.perf_counter() - t:.0f}s")
    else:
        print(f"full twin: {CACHE} (cached)")

    work = args.work or Path(
        tempfile.mkdtemp(prefix="bench-onnx-", dir=Path.home() / ".cache" / "medgemma-edge")
    )
    try:
        if not args.skip_export:
            print("\n## export (one process per precision; each exports the fp32 towers first)")
            print(
                f"{'precision':<9} {'time s':>8} {'towers+ref s':>13} {'towers MiB':>11} {'peak RSS GiB':>12} "
                f"{'vision cos min':>14} {'text cos min':>12} load"
            )
            for p in precisions:
                r = _child(EXPORT, str(CACHE), str(work / f"bundle-{p}"), p)
                fp32_s = r["stages"].get("export-vision", 0) + r["stages"].get("export-text", 0)
                print(
                    f"{p:<9} {r['seconds']:>8.0f} {fp32_s:>13.0f} {r['tower_bytes'] / 2**20:>11.0f} "
                    f"{r['peak_rss'] / 2**30:>12.2f} {r['fidelity']['vision']['cosine_min']:>14.5f} "
                    f"{r['fidelity']['text']['cosine_min']:>12.5f} {_load()}"
                )

        print("\n## vision tower latency per 448 px image, 2 threads (one process each)")
        rows = {"PyTorch eager fp32": _child(LAT_TORCH, str(CACHE))}
        print(f"  PyTorch done, load {_load()}", flush=True)
        for p in precisions:
            rows[f"ORT {p}"] = _child(LAT_ORT, str(work / f"bundle-{p}"), p)
        base = rows["PyTorch eager fp32"]
        print(
            f"{'engine':<20} {'batch 1 s':>9} {'vs PT':>6} {'batch 4 s/img':>13} {'vs PT':>6} {'peak RSS GiB':>12}"
        )
        for name, r in rows.items():
            print(
                f"{name:<20} {r['b1']:>9.2f} {base['b1'] / r['b1']:>5.2f}x {r['b4']:>13.2f} "
                f"{base['b4'] / r['b4']:>5.2f}x {r['peak_rss'] / 2**30:>12.2f}"
            )
        print(f"load after latency runs: {_load()}")

        if args.int8_variants and "fp32" in precisions:
            print("\n## dynamic int8 variants of the vision tower (vs ORT fp32, 2 random images)")
            src = work / "bundle-fp32" / "medsiglip" / "vision-fp32.onnx"
            print(f"{'variant':<16} {'quantize s':>10} {'MiB':>6} {'cos min':>9} {'batch 2 s/img':>13} load")
            for v in ("per_tensor", "per_channel", "pre_per_tensor"):
                r = _child(VARIANT, str(src), str(work / f"v-{v}.onnx"), v)
                print(
                    f"{v:<16} {r['quantize_s']:>10.0f} {r['bytes'] / 2**20:>6.0f} {r['cos_min']:>9.5f} "
                    f"{r['b2']:>13.2f} {_load()}"
                )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nthis process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
