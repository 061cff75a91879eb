"""Benchmark (not a test): the quantization ladder of a MedGemma twin, with and without the
default importance matrix, and each file's KL report against the f16 conversion.

Two exports (``export_medgemma``, ``fidelity=False, kl=True``), each in its own child process so
its peak RSS (llama.cpp's tools included) is its own:

    plain:   F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0          (the IQ types refuse without a matrix)
    imatrix: F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, Q4_0, IQ3_M   (--imatrix default)

and per file: size, bits per weight, tensor types, quantize seconds, mean / 99th-percentile KL,
same-top-token rate and perplexity ratio on the held-out calibration text.

    .venv/bin/python benchmarks/bench_quant.py [--size tiny|wide|full] [--threads N]

``tiny`` is the test twin: its rows (64, 128) are not multiples of 256, so every K-quant and IQ
tensor falls back to a 32-wide type. ``wide`` is this benchmark's own variant of the tiny twin
(hidden 256, FFN 1024, head_dim 128: every matrix takes 256-wide blocks), so the K and IQ types
are really made. ``full`` is the 4B-sized twin (cached like bench_gguf_export.py's; ~17 GB of
disk, ~10 GB of RAM, an hour or more on 2 cores). Random weights everywhere: the figures rank
the types and time the pipeline; they say nothing about MedGemma's quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medgemma-edge" / "twins"
PLAIN = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0"
WITH_IMATRIX = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,IQ4_XS,Q4_0,IQ3_M"
WIDE = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    query_pre_attn_scalar=128,
)


def child(step: str, args: dict) -> None:
    """One step, in this (child) process."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if step == "twin":
        from export import twin

        if args["size"] == "wide":
            twin.TINY_GEMMA_TEXT.update(WIDE)  # this process only: a wider tiny twin
        twin.build_twin(
            "medgemma", size="full" if args["size"] == "full" else "tiny", out=args["out"], seed=0
        )
    elif step == "export":
        from export.gguf.convert import export_medgemma

        r = export_medgemma(
            args["src"],
            bundle=args["bundle"],
            quants=args["quants"],
            mmproj="",
            outtype="f16",
            fidelity=False,
            kl=True,
            imatrix=args["imatrix"],
            threads=args["threads"],
        )
        Path(args["report"]).write_text(
            json.dumps({"files": r.files, "kl": r.fidelity["kl"], "steps": r.steps})
        )


def run_step(step: str, args: dict) -> tuple[float, int]:
    """Run ``step`` in a child process; (seconds, peak RSS bytes of it and its tools)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--child", step, json.dumps(args)], cwd=ROOT)
    _pid, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {step} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024  # KiB on Linux


def _twin(size: str, work: Path) -> Path:
    from export.twin import twin_info

    if size == "full":
        path = CACHE / "medgemma-full"
        if twin_info(path) is None:
            shutil.rmtree(path, ignore_errors=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            run_step("twin", {"size": size, "out": str(path)})
        return path
    path = work / f"twin-{size}"
    run_step("twin", {"size": size, "out": str(path)})
    return path


def _params(twin: Path) -> int:
    from export.gguf.checkpoint import inspect_checkpoint

    return inspect_checkpoint(twin).text_params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("STEP", "ARGS"), help=argparse.SUPPRESS)
    ap.add_argument("--size", default="tiny", choices=["tiny", "wide", "full"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true", help="also print the raw reports as one JSON object")
    a = ap.parse_args()
    if a.child:
        child(a.child[0], json.loads(a.child[1]))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    try:
        twin = _twin(a.size, work)
        params = _params(twin)
        runs = {}
        for name, quants, imatrix in (("plain", PLAIN, None), ("imatrix", WITH_IMATRIX, "default")):
            report = work / f"{name}.json"
            s, rss = run_step(
                "export",
                {
                    "src": str(twin),
                    "bundle": str(work / f"b-{name}"),
                    "quants": quants,
                    "imatrix": imatrix,
                    "threads": a.threads,
                    "report": str(report),
                },
            )
            runs[name] = {"seconds": s, "rss": rss, **json.loads(report.read_text())}
            shutil.rmtree(work / f"b-{name}", ignore_errors=True)
        _print(a.size, params, runs)
        if a.json:
            print(json.dumps(runs, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _print(size: str, params: int, runs: dict) -> None:
    from medgemma_edge.verify import ppl_ratio

    first = runs["plain"]["kl"]
    print(
        f"\nMedGemma twin '{size}' ({params:,d} text params) on {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M')}; KL vs F16 over {first['text']['bytes']:,d} B held-out text, "
        f"{first['chunks']} chunks of {first['ctx']} ({first['positions']:,d} positions)"
    )
    print(
        f"{'quant':<8} {'imatrix':<7} {'size':>10} {'bpw':>6} {'quant s':>8} {'KL s':>6} {'mean KL':>9} "
        f"{'99% KL':>9} {'same top':>9} {'PPL ratio':>9}  tensor types"
    )
    for name, run in runs.items():
        steps = {s["step"]: s["seconds"] for s in run["steps"]}
        for f in run["files"]:
            if f["role"] != "text":
                continue
            q = f["quant"]
            row = run["kl"]["rows"][q]
            types = ",".join(f"{t}:{n}" for t, n in f["gguf"]["tensor_types"].items() if t != "f32")
            print(
                f"{q:<8} {'yes' if name == 'imatrix' else 'no':<7} {f['bytes'] / 2**20:>7.2f} MiB "
                f"{f['bytes'] * 8 / params:>6.2f} {steps.get(f'quantize {q}', 0):>8.2f} {row['seconds']:>6.1f} "
                f"{row['mean_kl']:>9.5f} {row['kl_p99']:>9.5f} {row['same_top'] * 100:>8.2f}% "
                f"{ppl_ratio(run['kl'], row):>9.4f}  {types}"
            )
    for name, run in runs.items():
        steps = {s["step"]: s["seconds"] for s in run["steps"]}
        print(
            f"export {name:<8}: {run['seconds']:.1f} s in all (convert {steps.get('convert text f16', 0):.1f} s, "
            f"imatrix {steps.get('imatrix', 0):.1f} s, KL report {steps.get('kl', 0):.1f} s), "
            f"peak RSS {run['rss'] / 2**20:,.0f} MiB"
        )
    print("random weights: the figures rank the types and time the pipeline, not MedGemma's quality")


if __name__ == "__main__":
    raise SystemExit(main())
