"""``make bench``: the runtime benchmarks, in turn, each printing its tables.

    bench_profiles.py   every device profile + the image path on the `full` twins (built once,
                        cached; see full_bundle.py); with $MEDGEMMA_EDGE_BUNDLE_27B set to a
                        MedGemma 27B bundle, 4B and 27B side by side under the workstation
                        profiles
    bench_llm.py        the runtime's overhead against raw llama-cpp-python (real Gemma 3 270M)
    bench_cases.py      case-index throughput and search latency (tiny twin + synthetic vectors)
    bench_encoders.py   the image encoder engines side by side (onnxruntime fp32 / dynamic int8 /
                        static QDQ int8, OpenVINO fp32 / bf16 / NNCF int8) on the full tower, and
                        the image-token prefill by n_batch / n_ubatch / threads
    bench_dicom.py      DICOM node instances/s vs dcmtk's storescp (CT slices, a 20 MB DX)
    bench_archive.py    Ray archive indexing vs `index add`; ANN search at 10^5 vs exact
                        (--sizes 100000,1000000 for the phone-scale table)

``--exports`` (``make bench-export``) adds the export pipelines (bench_gguf_export.py,
bench_onnx_export.py: each re-runs a full-size export, ~15-25 min apiece on 2 cores) and
bench_quant.py (the quantization ladder with and without an importance matrix: size, KL, time).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNTIME = (
    "bench_profiles.py",
    "bench_llm.py",
    "bench_cases.py",
    "bench_encoders.py",
    "bench_dicom.py",
    "bench_archive.py",
)
EXPORTS = ("bench_gguf_export.py", "bench_onnx_export.py", "bench_quant.py")


def main(argv: list[str]) -> int:
    scripts = list(RUNTIME) + (list(EXPORTS) if "--exports" in argv else [])
    failed = []
    t_all = time.perf_counter()
    for script in scripts:
        print(f"\n== {script} ==", flush=True)
        t0 = time.perf_counter()
        if subprocess.call([sys.executable, str(HERE / script)]) != 0:
            failed.append(script)
        print(f"[{script}: {time.perf_counter() - t0:.0f} s]", flush=True)
    print(
        f"\nall benchmarks: {time.perf_counter() - t_all:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
