"""CLI glue for ``export medsiglip SRC --bundle B [--precision int8,int8-static,fp16,fp32] [--json]``.

Only parsing and printing; the work is :func:`export.onnx.export_medsiglip`.
"""

from __future__ import annotations

import argparse
import sys

from medgemma_edge import progress


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "medsiglip",
        help="MedSigLIP checkpoint → ONNX vision + text towers (fp32/int8/fp16) in a bundle",
        description="Export a MedSigLIP (SigLIP) checkpoint's vision and text towers to ONNX, with the "
        "device-side preprocessing spec, tokenizer and precomputed label embeddings, measuring fidelity "
        "against transformers. Writes (or updates) the bundle's medsiglip component atomically.",
    )
    p.add_argument("src", help="checkpoint directory (google/medsiglip-448 or a twin)")
    p.add_argument("--bundle", "-b", required=True, help="bundle directory to create or update")
    p.add_argument(
        "--precision",
        default="int8",
        help="comma-separated: int8 (dynamic), int8-static (fused attention, static int8: exact and "
        "faster batches), fp16, fp32 (default int8)",
    )
    p.add_argument(
        "--int8-variant",
        default=None,
        help="per_tensor (default), per_channel, pre_per_tensor, pre_per_channel (pre_ = quant_pre_process)",
    )
    p.add_argument(
        "--external-data", action="store_true", help="keep weights in .onnx.data files even when small"
    )
    p.add_argument(
        "--fidelity-images", type=int, default=6, help="fixed synthetic images for the fidelity check"
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="DIR",
        help="folder of images to calibrate int8-static on (default: generated images; use your own "
        "modality's images for real weights)",
    )
    p.add_argument(
        "--calibration-images", type=int, default=8, help="how many calibration images (default 8)"
    )
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads for the fidelity runs")
    p.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from export.onnx import graph
    from export.onnx.medsiglip import export_medsiglip
    from medgemma_edge.common import check_range, emit_json

    check_range("--threads", args.threads, 0, 1024)
    check_range("--fidelity-images", args.fidelity_images, 1, 1000)
    check_range("--calibration-images", args.calibration_images, 1, 512)

    def stage(what: str) -> None:
        print(f"medsiglip: {what}", file=sys.stderr, flush=True)

    with progress.bar("export medsiglip", unit="steps", enabled=not args.json) as cb:
        r = export_medsiglip(
            args.src,
            bundle=args.bundle,
            precisions=args.precision,
            int8_variant=args.int8_variant or graph.DEFAULT_INT8,
            external_data=True if args.external_data else None,
            fidelity_images=args.fidelity_images,
            calibration=args.calibration,
            calibration_images=args.calibration_images,
            threads=args.threads,
            progress=cb,
            stage=None if args.json else stage,
        )
    if args.json:
        emit_json(
            {
                "ok": True,
                "bundle": str(r.bundle),
                "precisions": r.precisions,
                "seconds": round(r.seconds, 2),
                "files": r.files,
                "fidelity": r.fidelity,
            }
        )
        return 0
    for f in r.files:
        print(f"{f['path']:<40} {f['bytes']:>14,d} B  {f['role']:<16} {f.get('precision', '')}")
    for prec, fd in r.fidelity.items():
        zs = " ".join(f"{k}:top1={v['top1_agreement']:.2f}" for k, v in fd["zero_shot"].items())
        print(
            f"fidelity {prec:<5} vision cos min {fd['vision']['cosine_min']:.6f} "
            f"max|Δ| {fd['vision']['max_abs_diff']:.2e}  text cos min {fd['text']['cosine_min']:.6f} "
            f"max|Δ| {fd['text']['max_abs_diff']:.2e}  {zs}"
        )
    print(f"bundle {r.bundle}: medsiglip written and verified in {r.seconds:.1f}s")
    return 0
