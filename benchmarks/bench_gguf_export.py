"""Benchmark (not a test): the `full` MedGemma twin (4.3B params, bf16) through the GGUF export.

Each step runs in its own child process so its peak RSS is its own (``os.wait4``'s rusage):

    twin (only when not cached) → text bf16 → mmproj f16 → mmproj q8_0 → quantize each --quant
    → bundle (hash + atomic commit through BundleWriter) → verify (full re-hash + headers)

and the table printed is step, seconds, peak RSS, output size (and size ÷ the bf16 checkpoint).
Fidelity is not run here (an f32 transformers reference of the 4B model needs ~17 GB).

    .venv/bin/python benchmarks/bench_gguf_export.py [--quant Q4_K_M,Q8_0] [--work DIR] [--keep]

The twin is cached in ~/.cache/medgemma-edge/twins/medgemma-full (~8.6 GB, ~2 min to build).
Needs ~17 GB of free disk for the outputs and ~6 GB of free RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medgemma-edge" / "twins"


def child(step: str, args: dict) -> None:
    """One step, in this (child) process."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if step == "twin":
        from export.twin import build_twin

        build_twin("medgemma", size="full", out=args["out"], seed=0)
        return
    from export.gguf import convert
    from export.gguf.checkpoint import inspect_checkpoint
    from export.gguf.component import gguf_facts
    from export.gguf.quantize import quantize

    if step == "convert":
        ckpt = inspect_checkpoint(args["src"])
        convert.convert(
            ckpt, kind=args["kind"], outtype=args["outtype"], out=Path(args["out"]), model_name="bench"
        )
    elif step == "quantize":
        quantize(Path(args["src"]), Path(args["out"]), quant=args["quant"])
    elif step == "bundle":
        from edge.bundle.write import BundleWriter

        with BundleWriter(args["bundle"], "medgemma") as w:
            for rel, src in args["files"].items():
                os.link(src, w.path(rel))
                w.add_file(rel, role=rel.split("/")[1].split("-")[0], gguf=gguf_facts(w.path(rel)))
            w.component.update(source={"description": "bench: full twin", "synthetic": True})
    elif step == "verify":
        from edge.bundle.manifest import open_bundle

        open_bundle(args["bundle"]).verify(trust_stamp=False).raise_for_failure()
    else:
        raise SystemExit(f"unknown step {step}")


def run_step(step: str, args: dict) -> tuple[float, int]:
    """Run ``step`` in a child process; (seconds, peak RSS bytes)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--child", step, json.dumps(args)], cwd=ROOT)
    _pid, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"step {step} failed with exit code {p.returncode}")
    return seconds, usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("STEP", "ARGS"), help=argparse.SUPPRESS)
    ap.add_argument("--quant", default="Q4_K_M,Q8_0")
    ap.add_argument("--outtype", default="bf16", choices=["bf16", "f16"])
    ap.add_argument("--work", type=Path, default=CACHE.parent / "bench-gguf")
    ap.add_argument("--twin", type=Path, default=None, help="use this checkpoint instead (smoke test)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (default: delete them at the end)")
    a = ap.parse_args()
    if a.child:
        child(a.child[0], json.loads(a.child[1]))
        return 0

    from export.twin import twin_info

    twin = a.twin or CACHE / "medgemma-full"
    rows: list[tuple[str, float | None, int | None, int | None]] = []
    if a.twin is None and twin_info(twin) is None:
        shutil.rmtree(twin, ignore_errors=True)
        twin.parent.mkdir(parents=True, exist_ok=True)
        s, rss = run_step("twin", {"out": str(twin)})
        rows.append(("build full twin (bf16 safetensors)", s, rss, None))
    src_bytes = sum(p.stat().st_size for p in twin.glob("*.safetensors"))
    rows.append(("checkpoint (cached twin)", None, None, src_bytes))

    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    out = a.work / "files"
    out.mkdir()
    files: dict[str, str] = {}
    base = out / f"text-{a.outtype.upper()}.gguf"
    s, rss = run_step("convert", {"src": str(twin), "kind": "text", "outtype": a.outtype, "out": str(base)})
    rows.append((f"text → {a.outtype} GGUF", s, rss, base.stat().st_size))
    for t in ("f16", "q8_0"):
        p = out / f"mmproj-{t}.gguf"
        s, rss = run_step("convert", {"src": str(twin), "kind": "mmproj", "outtype": t, "out": str(p)})
        rows.append((f"mmproj → {t}", s, rss, p.stat().st_size))
        files[f"medgemma/mmproj-{t}.gguf"] = str(p)
    for q in a.quant.split(","):
        p = out / f"text-{q}.gguf"
        s, rss = run_step("quantize", {"src": str(base), "out": str(p), "quant": q})
        rows.append((f"quantize {a.outtype} → {q}", s, rss, p.stat().st_size))
        files[f"medgemma/text-{q}.gguf"] = str(p)
    bundle = a.work / "bundle"
    s, rss = run_step("bundle", {"bundle": str(bundle), "files": files})
    rows.append(
        (
            f"bundle: hash + commit {len(files)} files",
            s,
            rss,
            sum(Path(f).stat().st_size for f in files.values()),
        )
    )
    s, rss = run_step("verify", {"bundle": str(bundle)})
    rows.append(("verify (full re-hash + headers)", s, rss, None))

    print(f"\nMedGemma 4B full twin → GGUF on {os.cpu_count()} CPUs ({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"{'step':<38} {'seconds':>8} {'peak RSS':>10} {'size':>10} {'÷ ckpt':>7}")
    for name, sec, rss, size in rows:
        print(
            f"{name:<38} {(f'{sec:.1f}' if sec is not None else '-'):>8} "
            f"{(f'{rss / 2**30:.2f} GiB' if rss else '-'):>10} "
            f"{(f'{size / 1e9:.2f} GB' if size else '-'):>10} "
            f"{(f'{size / src_bytes:.3f}' if size else '-'):>7}"
        )
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
