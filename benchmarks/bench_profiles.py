"""Benchmark (not a test): every device profile on the `full` twins, and the image path.

Each configuration runs `medgemma-edge bench --json` in a fresh process, so each peak RSS is its
own. Printed:

1. Profiles: the settings each chooses, the RAM estimate against the measured peak RSS (the
   estimate must be within 10%), the phone bound (text generation peak ≤ file + KV + 0.7 GB),
   speeds and image latencies.
2. The image path against its baseline measured in the same run: llama.cpp's mmproj f16
   (the path before the ONNX encoder) vs the ONNX encoder on the engine the device picks; a
   follow-up question with the KV cache reused vs re-decoding the image from the embedding cache.
3. The image encoders alone, each in its own process: peak RSS of encoding one 896 px image.
4. With a MedGemma 27B bundle as well (``--bundle-27b B`` or $MEDGEMMA_EDGE_BUNDLE_27B: an export or
   an import of the real 27B; a full-size 27B twin is 54 GB, out of reach here): 4B and 27B side
   by side under each clinic-workstation profile (estimate, peak RSS, speeds, 27B / 4B ratios),
   and which bundle the auto-pick (edge.device.profiles.pick_bundle) gives this machine.

    .venv/bin/python benchmarks/bench_profiles.py [--profiles a,b] [--bundle B] [--bundle-27b B27]

The 4B bundle is built on demand and cached (benchmarks/full_bundle.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 2**30
GB = 1e9


def bench(bundle: Path, history: Path, *flags: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "medgemma_edge.cli",
        "bench",
        "-b",
        str(bundle),
        "--json",
        "--history",
        str(history),
        *flags,
    ]
    print("  $ medgemma-edge bench " + " ".join(flags), flush=True)
    out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(out.stdout)


ENCODER_CHILD = r"""
import io, json, resource, sys, time
import numpy as np
from PIL import Image
from edge.bundle.manifest import open_bundle
from edge.media.images import load_image
bundle, kind, threads = open_bundle(sys.argv[1]), sys.argv[2], int(sys.argv[3])
buf = io.BytesIO()
Image.fromarray((np.random.RandomState(0).rand(896, 896, 3) * 255).astype("uint8")).save(buf, "PNG")
img = load_image(buf.getvalue())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
entry = next(f for f in bundle.files("medgemma") if f["path"].endswith(kind))
if kind.endswith(".onnx"):
    from edge.medgemma.vision import OnnxImageEncoder
    enc = OnnxImageEncoder(bundle.path(entry), entry, threads=threads)
    n_embd = 2560
else:
    from edge.medgemma.vision import MmprojImageEncoder
    from edge.medgemma.llama_binding import load_llama
    text = next(f for f in bundle.files("medgemma") if f["role"] == "text")
    llm = load_llama(bundle.path(text), repack=False, n_ctx=64, verbose=False)  # mapped, untouched
    enc = MmprojImageEncoder(bundle.path(entry), entry, llm.model, threads=threads, flash_attn=True)
    n_embd = 2560
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
enc.encode(img, n_embd)
print(json.dumps({"encode_s": time.perf_counter() - t0, "engine": getattr(enc, "engine", None) or "mmproj",
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "before_bytes": base}))
"""


def encoder_alone(bundle: Path, kind: str, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", ENCODER_CHILD, str(bundle), kind, str(threads)],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from full_bundle import ensure

    from edge.device.profiles import all_profiles

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="default: the cached full-twin bundle (built on demand)")
    ap.add_argument("--profiles", help="comma list (default: all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--bundle-27b",
        type=Path,
        default=os.environ.get("MEDGEMMA_EDGE_BUNDLE_27B") or None,
        help="a MedGemma 27B bundle to report beside the 4B one (default: $MEDGEMMA_EDGE_BUNDLE_27B)",
    )
    a = ap.parse_args()
    bundle = a.bundle or ensure()
    names = a.profiles.split(",") if a.profiles else list(all_profiles())
    hist = Path(tempfile.mkdtemp()) / "bench.jsonl"

    print(f"\n== device profiles on {bundle} ({a.threads} threads, this machine's CPU) ==", flush=True)
    runs = {n: bench(bundle, hist, "--profile", n) for n in names}
    head = (
        f"{'profile':<22}{'quant':<8}{'encoder':<8}{'ctx':>6} {'kv':<5}{'repack':<7}{'swa':<6}"
        f"{'estimate':>9}{'peak RSS':>9}{'error':>7}{'text peak':>10}{'bound':>8}"
        f"{'gen t/s':>8}  {'engine':<16}{'encode':>7}{'cold':>7}{'prepared':>9}{'follow':>8}"
    )
    print(head + "\n" + "-" * len(head))
    for n, r in runs.items():
        est, peak = r["memory_estimate_bytes"], r["peak_rss_bytes"]
        m = r["memory_estimate"]
        bound = m["weights"] + m["kv_cache"] + 0.7 * GB
        enc = "onnx" if str(r["image_encoder"]).endswith(".onnx") else "mmproj"
        print(
            f"{n:<22}{r['quant']:<8}{enc:<8}{r['n_ctx']:>6} {r['kv_type']:<5}{str(r['repack']):<7}"
            f"{str(r['swa_full']):<6}{est / GIB:>8.2f}G{peak / GIB:>8.2f}G{(est - peak) / peak * 100:>+6.1f}%"
            f"{r['peak_rss_text_bytes'] / GIB:>9.2f}G{bound / GIB:>7.2f}G"
            f"{r['generation_tps']:>8.1f}  {r.get('image_engine', '?'):<16}{r['image_encode_s']:>6.1f}s"
            f"{r['ttft_image_cold_s']:>6.1f}s{r['ttft_image_prepared_s']:>8.2f}s{r['ttft_image_followup_s']:>7.2f}s"
        )
    print(
        "estimate error = (estimate - peak) / peak; bound = file + KV + 0.7 GB (the phone target for 'text peak');\n"
        "engine/encode: the image encoder engine the profile ran and its time on one 896 px image; cold / prepared /\n"
        "follow: first token of an image question cold, after prepare_image, and of a follow-up (KV reused)"
    )

    base_name = "laptop-8GB" if "laptop-8GB" in runs else names[0]
    print(f"\n== the image path ({base_name} settings; baseline first, same run) ==", flush=True)
    mm = bench(bundle, hist, "--profile", base_name, "--image-encoder", "mmproj")
    ox = runs[base_name]
    rows = [
        ("image encode (s)", mm["image_encode_s"], ox["image_encode_s"]),
        ("first token, image cold (s)", mm["ttft_image_cold_s"], ox["ttft_image_cold_s"]),
        ("first token, embeddings cached, KV dropped (s)", mm["ttft_image_cached_s"], ox["ttft_image_cached_s"]),
        ("first token, follow-up, KV reused (s)", mm["ttft_image_followup_s"], ox["ttft_image_followup_s"]),
        ("first token, new question same image (s)", mm["ttft_image_new_question_s"], ox["ttft_image_new_question_s"]),
        ("first token after prepare_image (s)", mm["ttft_image_prepared_s"], ox["ttft_image_prepared_s"]),
        ("peak RSS (GiB)", mm["peak_rss_bytes"] / GIB, ox["peak_rss_bytes"] / GIB),
    ]  # fmt: skip
    print(f"{'':<50}{'mmproj f16':>12}{ox.get('image_engine', 'ONNX'):>12}{'ratio':>8}")
    for label, b, x in rows:
        print(f"{label:<50}{b:>12.2f}{x:>12.2f}{b / x:>7.2f}x")
    print(
        f"follow-up vs KV dropped (ONNX run): {ox['ttft_image_cached_s']:.2f} s → "
        f"{ox['ttft_image_followup_s']:.2f} s = {ox['ttft_image_cached_s'] / ox['ttft_image_followup_s']:.1f}x faster; "
        f"{ox['followup_reused_tokens']} tokens reused"
    )
    if "medsiglip_encode_s" in ox:
        print(
            f"MedSigLIP image embedding ({ox['medsiglip_precision']}, 448 px): {ox['medsiglip_encode_s']:.2f} s"
        )

    print("\n== image encoders alone, one 896 px image, own process ==", flush=True)
    print(
        f"{'encoder (engine the plan ran)':<36}{'encode':>9}{'peak RSS':>10}{'RSS before encoding':>21}{'encoding adds':>15}"
    )
    for kind in ("mmproj-f16.gguf", "vision-int8.onnx"):
        e = encoder_alone(bundle, kind, a.threads)
        label = f"{kind} ({e['engine']})" if e.get("engine") not in (None, "mmproj") else kind
        print(
            f"{label:<36}{e['encode_s']:>8.2f}s{e['peak_rss_bytes'] / GB:>8.2f}GB{e['before_bytes'] / GB:>19.2f}GB"
            f"{(e['peak_rss_bytes'] - e['before_bytes']) / GB:>13.2f}GB"
        )
    if a.bundle_27b:
        both(bundle, a.bundle_27b, hist, runs)
    print(f"\nper-run JSON: {hist}")
    return 0


def both(bundle_4b: Path, bundle_27b: Path, hist: Path, runs_4b: dict) -> None:
    """4B and 27B under each clinic-workstation profile, and the auto-pick's choice here."""
    from edge.bundle.manifest import open_bundle
    from edge.device.profiles import LARGE_PROFILES, model_family, pick_bundle

    b4, b27 = open_bundle(bundle_4b), open_bundle(bundle_27b)
    if (model_family(b4), model_family(b27)) != ("4b", "27b"):
        raise SystemExit(f"{bundle_27b} is not a MedGemma 27B bundle (or {bundle_4b} is not a 4B one)")
    print(f"\n== MedGemma 4B and 27B ({bundle_27b}), same machine, same run ==", flush=True)
    head = (
        f"{'profile':<22}{'model':<6}{'quant':<8}{'estimate':>9}{'peak RSS':>9}{'error':>7}"
        f"{'prompt t/s':>11}{'gen t/s':>8}{'cold':>7}"
    )
    print(head + "\n" + "-" * len(head))
    for name in LARGE_PROFILES:
        pair = {
            "4B": runs_4b.get(name) or bench(bundle_4b, hist, "--profile", name),
            "27B": bench(bundle_27b, hist, "--profile", name),
        }
        for model, r in pair.items():
            est, peak = r["memory_estimate_bytes"], r["peak_rss_bytes"]
            print(
                f"{name:<22}{model:<6}{r['quant']:<8}{est / GIB:>8.2f}G{peak / GIB:>8.2f}G"
                f"{(est - peak) / peak * 100:>+6.1f}%{r['prompt_tps']:>11.1f}{r['generation_tps']:>8.1f}"
                f"{r.get('ttft_image_cold_s', float('nan')):>6.1f}s"
            )
        four, big = pair["4B"], pair["27B"]
        print(
            f"{'':<22}27B/4B: memory {big['peak_rss_bytes'] / four['peak_rss_bytes']:.2f}x, generation "
            f"{big['generation_tps'] / four['generation_tps']:.2f}x the speed"
        )
    pick = pick_bundle([b4, b27])
    print(f"auto-pick on this machine: {pick.bundle.root} ({pick.family}, {pick.profile}): {pick.reason}")


if __name__ == "__main__":
    raise SystemExit(main())
