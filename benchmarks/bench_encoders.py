"""Image encoders on this machine, same run, same image: every engine side by side.

Three tables (issue #20, and #18's MedSigLIP bullet):

1. **MedGemma's image encoder** (SigLIP tower + projector, 896 px → 256 × 2560), one image, each
   engine this machine has: onnxruntime fp32 / dynamic int8 (today's) / static QDQ int8, OpenVINO
   fp32 / bf16 / NNCF int8 + bf16 — seconds, cosine vs transformers fp32, peak RSS (each engine in
   its own process), and the ratio to today's dynamic int8 in the same run.
2. **MedSigLIP vision** (448 px): images/s at batch 1 and 8, today's graph (plain attention,
   dynamic int8) vs the new one (fused attention, static int8), and the fused fp32 graph on
   OpenVINO (bf16 compute, fp32), with cosine vs transformers and the batch-8 vs batch-1 difference.
3. **Image-token prefill**: llama.cpp's time for 256 image embeddings by quantization, n_ubatch,
   threads and repack (needs the full bundle of benchmarks/full_bundle.py; skipped without it).

``--size full`` (default) builds MedGemma-/MedSigLIP-shaped towers with random weights at their
real sizes (0.4B parameters each; the graphs are cached under ~/.cache/medgemma-edge/encoders),
``--size tiny`` the test twins' (seconds). Random weights lack real activation outliers, so real
checkpoints' int8 cosines will be lower: the export records them per bundle.

    .venv/bin/python benchmarks/bench_encoders.py [--size full|tiny] [--parts medgemma,medsiglip,prefill]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medgemma-edge"
ENGINE_FILES = {  # engine -> encoder file it runs (medgemma table)
    "ort-fp32": "vision-fp32.onnx",
    "ort-int8": "vision-int8.onnx",
    "ort-int8-static": "vision-int8-static.onnx",
    "ov-fp32": "vision-fp32.onnx",
    "ov-bf16": "vision-fp32.onnx",
    "ov-int8": "vision-openvino-int8.xml",
}


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).min())


def _seed_weights(model, seed: int = 0) -> None:
    """Deterministic random weights; zero-initialised ones (Gemma 3's projector) drawn too."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "norm" in name and "weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


# --- child process: one engine, one file ------------------------------------------------------------


def child(engine: str, path: str, inputs: str, ref: str, threads: int, runs: int, batch: int) -> dict:
    from edge.device import accel, encoders

    x, want = np.load(inputs), np.load(ref)
    e = encoders.ENGINES[engine]
    t0 = time.perf_counter()
    runner = accel.open_runner(Path(path), e.runtime, threads=threads, hint=e.ov_hint())
    open_s = time.perf_counter() - t0
    name = "pixel_values"
    times, outs = [], []
    for _ in range(runs):
        outs = []
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            outs.append(runner.run({name: x[i : i + batch]})[0])
        times.append(time.perf_counter() - t0)
    got = np.concatenate(outs)
    row = {
        "engine": engine,
        "device": runner.device,
        "open_s": open_s,
        "seconds": times,
        "cosine_min": _cos_min(want, got),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if batch > 1:  # against batch 1 (only meaningful for static graphs)
        ones = np.concatenate([runner.run({name: x[i : i + 1]})[0] for i in range(len(x))])
        row["batch_vs_1_max_abs"] = float(np.abs(ones - got).max())
    return row


def _spawn(
    engine: str, path: Path, work: Path, threads: int, runs: int, batch: int = 1, tag: str = "mg"
) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, str(path), str(work / f"{tag}-x.npy")]
    cmd += [str(work / f"{tag}-ref.npy"), str(threads), str(runs), str(batch)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        return {"engine": engine, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- table 1: MedGemma's encoder ---------------------------------------------------------------------


def _mg_setup(size: str):
    import transformers

    from edge.medsiglip.preprocess import ImageSpec
    from export.twin import gemma3_config

    cfg = transformers.Gemma3Config(**gemma3_config(size))
    vc = cfg.vision_config
    spec = {"height": vc.image_size, "width": vc.image_size, "resample": "bilinear", "mean": [0.5] * 3}
    return cfg, ImageSpec.from_json({**spec, "std": [0.5] * 3, "rescale_factor": 1 / 255}).to_json()


MG_FILES = {
    "fp32": "vision-fp32.onnx",
    "int8": "vision-int8.onnx",
    "int8-static": "vision-int8-static.onnx",
    "openvino-int8": "vision-openvino-int8.xml",
}


def build_one(size: str, prec: str, work: Path, n_calib: int) -> dict:
    """One MedGemma encoder file (its own process: a full-size stage holds several GB)."""
    from edge.medsiglip.preprocess import ImageSpec, images_to_batch
    from export.onnx import medgemma_vision as mv
    from export.onnx.fidelity import sample_images

    cfg, spec = _mg_setup(size)
    vc = cfg.vision_config
    if prec == "fp32":  # the reference (transformers fp32, the same image) and the fused graph
        import torch

        x = images_to_batch(sample_images(1), ImageSpec.from_json(spec))
        model = mv.vision_module(cfg).eval()
        _seed_weights(model)
        with torch.no_grad():
            np.save(work / "mg-ref.npy", model(torch.from_numpy(x)).numpy())
        np.save(work / "mg-x.npy", x)
        mv._export_fp32(
            model, vc.image_size, work / MG_FILES["fp32"], heads=vc.num_attention_heads, hidden=vc.hidden_size
        )
        return {"prec": prec}
    calib, _ = mv.calibration_pixels(spec, None, n_calib)
    ref = (np.load(work / "mg-x.npy"), np.load(work / "mg-ref.npy"))
    details, _ = mv.build_encoder(prec, work / MG_FILES["fp32"], work / MG_FILES[prec], calib, ref)
    return {"prec": prec, "quantization": details.get("quantization"), "fidelity": details["fidelity"]}


def medgemma_table(
    size: str, work: Path, *, threads: int, runs: int, n_calib: int, build_only=False
) -> list[dict]:
    for prec, fname in MG_FILES.items():
        if (work / fname).exists() and (work / "mg-ref.npy").exists():
            continue
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--child-build", size, prec, str(work), str(n_calib)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            print(
                f"  building {fname} failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:200]}", flush=True
            )
            continue
        print(
            f"  built {fname} in {time.perf_counter() - t0:.0f} s: {p.stdout.strip().splitlines()[-1][:200]}",
            flush=True,
        )
    if build_only:
        return []
    rows = []
    for engine, fname in ENGINE_FILES.items():
        row = _spawn(engine, work / fname, work, threads, runs)
        rows.append(row)
        print(f"  {engine:<16} {_fmt(row)}", flush=True)
    return rows


def _fmt(row: dict) -> str:
    if "error" in row:
        return f"unavailable: {row['error']}"
    s = min(row["seconds"])
    return f"{s:7.2f} s  cos {row['cosine_min']:.5f}  RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB  ({row['device']})"


# --- table 2: MedSigLIP vision, old graph vs new ---------------------------------------------------


def medsiglip_table(
    size: str, work: Path, *, threads: int, runs: int, n_calib: int, n_images: int = 8, build_only=False
):
    import torch
    import transformers

    from edge.medsiglip.preprocess import ImageSpec, images_to_batch
    from export.onnx import graph
    from export.onnx import medsiglip_fused as mf
    from export.onnx.fidelity import sample_images
    from export.onnx.static_quant import calibration_images
    from export.twin import siglip_config

    vcfg = transformers.SiglipVisionConfig(**siglip_config(size)["vision_config"])
    spec = ImageSpec(height=vcfg.image_size, width=vcfg.image_size, resample="bicubic")
    x = images_to_batch(sample_images(n_images), spec)
    old, new = work / "siglip-old-int8.onnx", work / "siglip-new-int8-static.onnx"
    fused = work / "siglip-new-fp32.onnx"  # the fused graph before quantization, for OpenVINO
    if not all(p.exists() for p in (old, new, fused, work / "sig-ref.npy")):
        model = transformers.SiglipVisionModel(vcfg).eval()
        _seed_weights(model, seed=1)
        with torch.no_grad():
            ref = model(pixel_values=torch.from_numpy(x)).pooler_output.numpy()
        np.save(work / "sig-x.npy", x)
        np.save(work / "sig-ref.npy", ref)
        if not old.exists():
            fp32 = graph.export_tower(model, "vision", work / "siglip-old-fp32.onnx")
            graph.to_int8(fp32, old, external_data=False)
            fp32.unlink()
        if not new.exists():
            calib = images_to_batch(calibration_images(None, n_calib)[0], spec)
            mf.vision_static(model.vision_model, new, calib)
        if not fused.exists():
            mf.vision_fused_fp32(model.vision_model, fused)
        del model
    if build_only:
        return []
    rows = []
    for label, path, engine in (
        ("old (dynamic int8)", old, "ort-int8"),
        ("new (fused, static int8)", new, "ort-int8-static"),
        ("fused fp32, OpenVINO bf16", fused, "ov-bf16"),
        ("fused fp32, OpenVINO fp32", fused, "ov-fp32"),
    ):
        for batch in (1, 8):
            row = _spawn(engine, path, work, threads, runs, batch, tag="sig")
            row.update(graph=label, batch=batch)
            if "error" not in row:
                row["images_per_s"] = n_images / min(row["seconds"])
                print(
                    f"  {label:<26} batch {batch}: {row['images_per_s']:.3f} img/s "
                    f"({min(row['seconds']) / n_images:.2f} s/img)  cos {row['cosine_min']:.5f}"
                    + (f"  batch-vs-1 {row['batch_vs_1_max_abs']:.1e}" if batch > 1 else ""),
                    flush=True,
                )
            rows.append(row)
    return rows


# --- table 3: the image tokens' prefill ------------------------------------------------------------


def prefill_table(bundle: Path, *, threads: int) -> list[dict]:
    from edge.bundle.manifest import open_bundle
    from edge.medgemma import llama_binding as lb

    b = open_bundle(bundle)
    texts = [f for f in b.files("medgemma") if f["role"] == "text"]
    # non-causal attention over the image needs all 256 positions in one ubatch: n_ubatch >= 256
    variants = [
        (q["quant"], nb, ub, threads, True) for q in texts for nb, ub in ((256, 256), (512, 256), (512, 512))
    ]
    variants += [(texts[0]["quant"], 512, 512, 1, True), (texts[0]["quant"], 512, 512, threads, False)]
    rows = []
    for quant, nbatch, ubatch, th, repack in variants:
        entry = next(f for f in texts if f["quant"] == quant)
        llama = lb.load_llama(
            b.path(entry),
            repack=repack,
            n_ctx=1024,
            n_batch=nbatch,
            n_ubatch=ubatch,
            n_threads=th,
            n_threads_batch=th,
            flash_attn=True,
            verbose=False,
        )
        embd = np.random.RandomState(0).standard_normal((256, llama.n_embd())).astype(np.float32) * 0.02
        lb.decode_embeddings(llama, embd)  # warm-up
        lb.clear_kv(llama)
        t0 = time.perf_counter()
        lb.decode_embeddings(llama, embd)
        s = time.perf_counter() - t0
        llama.close()
        row = {
            "quant": quant,
            "n_batch": nbatch,
            "n_ubatch": ubatch,
            "threads": th,
            "repack": repack,
            "seconds": s,
        }
        rows.append(row)
        print(
            f"  {quant:<7} n_batch {nbatch:<4} n_ubatch {ubatch:<4} threads {th} repack {'on ' if repack else 'off'} {s:6.2f} s "
            f"({256 / s:.1f} tok/s)",
            flush=True,
        )
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child-build"]:
        size, prec, work, n = argv[1:5]
        print(json.dumps(build_one(size, prec, Path(work), int(n))))
        return 0
    if argv[:1] == ["--child"]:
        e, path, xs, ref, th, runs, batch = argv[1:8]
        print(json.dumps(child(e, path, xs, ref, int(th), int(runs), int(batch))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--parts", default="medgemma,medsiglip,prefill")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per engine (the best is reported)")
    ap.add_argument("--calibration-images", type=int, default=3)
    ap.add_argument("--bundle", type=Path, default=CACHE / "bench-full", help="for the prefill table")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    ap.add_argument(
        "--build-only", action="store_true", help="build (and cache) the encoder files, time nothing"
    )
    args = ap.parse_args(argv)
    from edge.device import accel

    work = CACHE / "encoders" / args.size
    work.mkdir(parents=True, exist_ok=True)
    flags = sorted(f for f in accel.cpu_flags() if f.startswith(("avx512", "amx", "avx2", "avx_vnni")))
    print(f"CPU class {accel.cpu_class()}, {args.threads} threads; flags: {' '.join(flags)}")
    print(f"load average before: {os.getloadavg()}")
    out: dict = {"cpu_class": accel.cpu_class(), "flags": flags, "threads": args.threads, "size": args.size}
    parts = args.parts.split(",")
    if "medgemma" in parts:
        print(f"\nMedGemma image encoder ({args.size}), one image, {args.threads} threads:")
        rows = out["medgemma"] = medgemma_table(
            args.size,
            work,
            threads=args.threads,
            runs=args.runs,
            n_calib=args.calibration_images,
            build_only=args.build_only,
        )
        base = next((min(r["seconds"]) for r in rows if r["engine"] == "ort-int8" and "seconds" in r), None)
        if base:
            print(
                "  ratio to today's (ort-int8): "
                + ", ".join(f"{r['engine']} {base / min(r['seconds']):.2f}x" for r in rows if "seconds" in r)
            )
        print(f"  load average: {os.getloadavg()}")
    if "medsiglip" in parts:
        print(f"\nMedSigLIP vision ({args.size}), 8 images, {args.threads} threads:")
        out["medsiglip"] = medsiglip_table(
            args.size,
            work,
            threads=args.threads,
            runs=args.runs,
            n_calib=max(args.calibration_images, 4),
            build_only=args.build_only,
        )
        print(f"  load average: {os.getloadavg()}")
    if "prefill" in parts:
        if (args.bundle / "manifest.json").exists():
            print(f"\nImage-token prefill (256 embeddings), {args.bundle}:")
            out["prefill"] = prefill_table(args.bundle, threads=args.threads)
            print(f"  load average: {os.getloadavg()}")
        else:
            print(
                f"\nprefill table skipped: no bundle at {args.bundle} (benchmarks/full_bundle.py builds it)"
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
