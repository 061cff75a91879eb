"""CLI glue for ``export medgemma`` and ``import medgemma``: parse, call export.gguf*, print."""

from __future__ import annotations

import argparse
import contextlib

from edge.errors import UsageError
from medgemma_edge import progress
from medgemma_edge.common import check_range, default_bundle, emit_json


class _StepBars:
    """One progress bar per step of ``progress(step, done, total)``; the previous closes on change."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._stack = contextlib.ExitStack()
        self._step: str | None = None
        self._cb = None

    def __call__(self, step: str, done: int, total: int) -> None:
        if step != self._step:
            self._stack.close()
            self._step = step
            unit = "steps" if step in ("fidelity", "kl", "imatrix") else "B"
            self._cb = self._stack.enter_context(progress.bar(step, unit=unit, enabled=self.enabled))
        self._cb(done, total)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "medgemma",
        help="MedGemma checkpoint → GGUF text model(s) + mmproj, with fidelity, into a bundle",
        description="Convert a MedGemma (Gemma3ForConditionalGeneration) checkpoint with llama.cpp's "
        "converter, quantize it, measure it against transformers and write the bundle's medgemma "
        "component atomically.",
    )
    p.add_argument(
        "src",
        help="checkpoint directory (config.json, *.safetensors, tokenizer), or a Hugging Face id "
        "(google/medgemma-4b-it) found in the local cache (never downloaded)",
    )
    p.add_argument("--bundle", "-b", default=default_bundle(), help="bundle directory to write")
    p.add_argument(
        "--quant",
        default="Q4_K_M",
        help="comma list of Q8_0,Q6_K,Q5_K_M,Q4_K_M,IQ4_XS,Q4_0,IQ3_M (F16 keeps the conversion; "
        "the IQ types need --imatrix)",
    )
    p.add_argument(
        "--imatrix",
        nargs="?",
        const="default",
        default=None,
        metavar="FILE|default",
        help="quantize with an importance matrix computed on calibration text: 'default' (the "
        "project's invented clinical-style text) or your own UTF-8 text file (it stays here; only "
        "its size and sha256 are recorded)",
    )
    p.add_argument(
        "--kl",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="KL report of every text file against the conversion over held-out text "
        "(llama-perplexity; default: with fidelity, when `make llama-tools` has built the tools)",
    )
    p.add_argument(
        "--kl-text",
        default=None,
        metavar="FILE",
        help="held-out text for the KL report (default: the project's)",
    )
    p.add_argument(
        "--mmproj", default="f16", help="comma list of f16,q8_0,f32 (vision projector types; empty: none)"
    )
    p.add_argument(
        "--outtype", default="f16", choices=["f16", "bf16", "f32"], help="text conversion precision"
    )
    p.add_argument(
        "--model", default=None, help="registry id for licence and prompt (default: from the checkpoint)"
    )
    p.add_argument("--no-fidelity", action="store_true", help="skip the llama.cpp vs transformers comparison")
    p.add_argument(
        "--vision-onnx",
        default="",
        help="also export the image encoder (vision tower + projector) to ONNX: comma list of int8 (dynamic), "
        "int8-static (QDQ, calibrated), fp32 (OpenVINO runs it in bf16), openvino-int8 (NNCF); the runtime "
        "prefers it to the mmproj (faster on CPUs) and picks the engine per device",
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="DIR",
        help="images to calibrate the static int8 encoders on (default: generated ones; real weights want real images)",
    )
    p.add_argument(
        "--calibration-images", type=int, default=4, help="how many calibration images (default 4)"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from export.gguf.convert import export_medgemma

    if not args.bundle:
        raise UsageError("give --bundle DIR or set MEDGEMMA_EDGE_BUNDLE")
    check_range("--threads", args.threads, 0, 1024)
    if args.vision_onnx:  # checked now, not after the GGUF export has run
        from export.onnx.medgemma_vision import PRECISIONS

        for p in (s.strip() for s in args.vision_onnx.split(",")):
            if p and p not in PRECISIONS:
                raise UsageError(
                    f"unknown --vision-onnx precision {p!r}; choose from {', '.join(PRECISIONS)}"
                )
    with _StepBars(enabled=not args.json) as bars:
        r = export_medgemma(
            args.src,
            bundle=args.bundle,
            quants=args.quant,
            mmproj=args.mmproj,
            outtype=args.outtype,
            model_id=args.model,
            fidelity=not args.no_fidelity,
            imatrix=args.imatrix,
            kl=args.kl,
            kl_text=args.kl_text,
            threads=args.threads,
            progress=bars,
        )
        vision = []
        if args.vision_onnx:
            from export.onnx.medgemma_vision import export_vision_onnx

            vision = export_vision_onnx(
                args.src,
                bundle=args.bundle,
                precisions=args.vision_onnx,
                calibration=args.calibration,
                calibration_images=args.calibration_images,
            )
    if args.json:
        emit_json(
            {
                "ok": True,
                "bundle": str(r.bundle),
                "files": r.files + vision,
                "fidelity": r.fidelity,
                "steps": r.steps,
                "seconds": r.seconds,
            }
        )
        return 0
    for f in r.files:
        if f["role"] == "imatrix":
            t = f["imatrix"]["text"]
            print(
                f"{f['path']:<32} {f['bytes']:>14,d} B  importance matrix: {f['imatrix'].get('chunks', '?')} "
                f"chunks of {t['bytes']:,d} B text, sha256 {t['sha256'][:12]}…"
            )
            continue
        print(f"{f['path']:<32} {f['bytes']:>14,d} B  {f['quant']:<7} RAM ~{f['ram_bytes'] / 2**20:,.0f} MiB")
    if r.fidelity and "text" in r.fidelity:
        print("fidelity vs transformers (float32):  top-1   max|Δlogit|   KL       image top-1")
        for q, row in r.fidelity["text"].items():
            img = row.get("image_prompt", {})
            print(
                f"  text {q:<8} {row['top1']:>28.3f} {row['max_abs']:>12.2e} {row['kl']:>9.2e}"
                f"   {img.get('top1', float('nan')):.3f}"
            )
        for t, row in r.fidelity["mmproj"].items():
            print(
                f"  mmproj {t:<6} image embeddings cosine {row['cosine']:.6f} (worst token {row['cosine_min_token']:.6f})"
            )
    from medgemma_edge.verify import kl_table_lines

    for line in kl_table_lines((r.fidelity or {}).get("kl"), r.files):
        print(line)
    for f in vision:
        fid = f["fidelity"]
        print(
            f"{f['path']:<32} {f['bytes']:>14,d} B  image embeddings cosine vs transformers: min {fid['cosine_min']:.5f}"
        )
    print(f"bundle {r.bundle}: medgemma component written in {r.seconds:.1f}s")
    return 0


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="add a GGUF made elsewhere (llama.cpp, Ollama, LM Studio) to a bundle",
        description="Check a Gemma 3 GGUF (and its mmproj), hash it and record it in the bundle as imported.",
    )
    p.add_argument("kind", choices=["medgemma"], help="component to import into (medgemma)")
    p.add_argument("gguf", help="the text model GGUF")
    p.add_argument("--mmproj", default=None, help="the vision projector GGUF")
    p.add_argument("--bundle", "-b", default=default_bundle(), help="bundle directory to write")
    p.add_argument("--model", default="medgemma-4b-it", help="registry id giving licence and prompt format")
    p.add_argument("--source", default=None, help="where the file came from (recorded in the manifest)")
    p.add_argument("--link", action="store_true", help="hard-link instead of copying (same filesystem)")
    p.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    p.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    from export.gguf.importer import import_gguf

    if not args.bundle:
        raise UsageError("give --bundle DIR or set MEDGEMMA_EDGE_BUNDLE")
    with progress.bar("hash", enabled=not args.json) as cb:
        r = import_gguf(
            args.gguf,
            bundle=args.bundle,
            mmproj=args.mmproj,
            model_id=args.model,
            source=args.source,
            link=args.link,
            progress=cb,
        )
    if args.json:
        emit_json({"ok": True, "bundle": str(r.bundle), "files": r.files, "seconds": r.seconds})
        return 0
    for f in r.files:
        print(f"{f['path']:<32} {f['bytes']:>14,d} B  {f['quant']:<7} imported ({f['gguf']['architecture']})")
    print(f"bundle {r.bundle}: medgemma component imported in {r.seconds:.1f}s")
    return 0
