"""The `full` twins' bundle the runtime benchmarks measure, built on demand and cached.

    twin medgemma --size full → export medgemma (Q4_K_M, Q4_0, Q8_0; mmproj f16; vision ONNX int8,
                                int8-static and fp32: the engines a device picks among, #20)
    twin medsiglip --size full → export medsiglip (int8) into the same bundle

Everything goes through the project's own CLI (the same code a user runs), once: later runs find
the bundle complete and reuse it. ~40 min and ~17 GB of peak RAM the first time on 2 cores
(the vision ONNX export at 896 px is the peak); ~18 GB of disk under
~/.cache/medgemma-edge/bench-full.

    .venv/bin/python benchmarks/full_bundle.py      # build (or find) it and print its path
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medgemma-edge"
TWINS = CACHE / "twins"
BUNDLE = CACHE / "bench-full"
QUANTS = ("Q4_K_M", "Q4_0", "Q8_0")
VISION = ("int8", "int8-static", "fp32")  # dynamic int8 (the fallback), static QDQ, fp32 (OpenVINO bf16)
NEEDED = {f"medgemma/text-{q}.gguf" for q in QUANTS} | {"medgemma/mmproj-f16.gguf"}
NEEDED |= {f"medgemma/vision-{p}.onnx" for p in VISION}


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "medgemma_edge.cli", *args]
    print("  $ medgemma-edge " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)


def _has(bundle: Path) -> set[str]:
    from edge.bundle.manifest import open_bundle
    from edge.errors import EdgeError

    try:
        b = open_bundle(bundle)
    except EdgeError:
        return set()
    return {f["path"] for comp in b.manifest["components"].values() for f in comp["files"]}


def _twin(kind: str) -> Path:
    from export.twin import twin_info

    path = TWINS / f"{kind}-full"
    if twin_info(path) is None:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        _cli("twin", kind, "--size", "full", "--out", str(path))
    return path


def _vision_is_current(bundle: Path) -> bool:
    from edge.bundle.manifest import open_bundle

    entries = [f for f in open_bundle(bundle).files("medgemma") if f["role"] == "vision-onnx"]
    return all(f.get("onnx", {}).get("attention") == "MultiHeadAttention" for f in entries)


def ensure(bundle: Path = BUNDLE) -> Path:
    """The benchmark bundle, complete; builds what is missing."""
    have = _has(bundle)
    if not NEEDED <= have:
        print(f"building the full-twin MedGemma bundle in {bundle} (once; cached)", flush=True)
        _cli(
            "export", "medgemma", str(_twin("medgemma")), "-b", str(bundle),
            "--quant", ",".join(QUANTS), "--mmproj", "f16", "--vision-onnx", ",".join(VISION), "--no-fidelity",
        )  # fmt: skip
        have = _has(bundle)
    if not _vision_is_current(bundle) or not NEEDED <= have:
        print(f"re-exporting the vision ONNX graphs ({', '.join(VISION)}): missing or unfused", flush=True)
        t0 = time.perf_counter()
        from export.onnx.medgemma_vision import export_vision_onnx

        export_vision_onnx(_twin("medgemma"), bundle=bundle, precisions=",".join(VISION))
        print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)
    if not any(p.startswith("medsiglip/") for p in have):
        print(f"adding the full-twin MedSigLIP (int8) to {bundle} (once; cached)", flush=True)
        _cli("export", "medsiglip", str(_twin("medsiglip")), "-b", str(bundle), "--precision", "int8")
    return bundle


if __name__ == "__main__":
    import argparse

    # --help must answer without starting a 40-minute build
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    print(ensure())
