"""Benchmark (not a test): two llama-cpp-python builds on the same model, e.g. native vs portable.

Each interpreter runs the same child in turn (alternating, ``--rounds`` times): load the
backends the way the runtime does (``edge.device.accel.load_backends``), evaluate a 200-token prompt and
generate 64 tokens greedily, best of 3. Prints prompt and generation tokens/s per build and the
ratio to the first build (the baseline). Not part of ``make bench``: it needs a second build.

    python benchmarks/bench_build.py --python .venv/bin/python --python /tmp/pvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from edge.device import accel
n_backends = accel.load_backends()
from edge.medgemma.llama_binding import load_llama
llm = load_llama(sys.argv[1], repack=True, n_ctx=512, n_threads=2, verbose=False)
toks = llm.tokenize(("The chest radiograph shows no acute abnormality. " * 20).encode())
best_p = best_g = 0.0
for _ in range(3):
    llm.reset(); t = time.perf_counter(); llm.eval(toks)
    best_p = max(best_p, len(toks) / (time.perf_counter() - t))
    llm.reset(); n, t0, text = 0, None, ""
    for c in llm.create_completion("Pneumonia is an infection of the", max_tokens=64, temperature=0, stream=True, stop=[]):
        n += 1; text += c["choices"][0]["text"]
        if t0 is None: t0 = time.perf_counter()
    best_g = max(best_g, (n - 1) / (time.perf_counter() - t0))
print(json.dumps({"prompt_tps": best_p, "generation_tps": best_g, "backends": n_backends, "text": text[:60]}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", action="append", required=True, help="an interpreter with a build (repeat)")
    ap.add_argument("--model", help="a GGUF (default: the real Gemma 3 270M from PyPI)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if a.model is None:
        sys.path.insert(0, str(ROOT))
        from medgemma_edge.demo.main import small_model_path

        a.model = str(small_model_path())
    runs: dict[str, list[dict]] = {p: [] for p in a.python}
    for _ in range(a.rounds):
        for py in a.python:
            out = subprocess.run(
                [py, "-c", CHILD, a.model, str(ROOT)], check=True, capture_output=True, text=True
            )
            runs[py].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = runs[a.python[0]]
    print(f"{'build (interpreter)':<40}{'prompt tok/s':>16}{'gen tok/s':>14}{'ratio':>14}  text")
    for py, rs in runs.items():
        p = [r["prompt_tps"] for r in rs]
        g = [r["generation_tps"] for r in rs]
        rp = sum(p) / sum(r["prompt_tps"] for r in base)
        rg = sum(g) / sum(r["generation_tps"] for r in base)
        print(
            f"{py:<40}{' / '.join(f'{x:.0f}' for x in p):>16}{' / '.join(f'{x:.1f}' for x in g):>14}"
            f"{rp:>7.2f}/{rg:.2f}  {rs[0]['text']!r} (backends {rs[0]['backends']})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
