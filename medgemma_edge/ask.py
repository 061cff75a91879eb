"""``medgemma-edge ask``: one question (with images) to the bundle's MedGemma, streamed."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge.errors import InputError, UsageError
from medgemma_edge.common import default_bundle, emit_json

log = logging.getLogger(__name__)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options that choose and size the model; shared by ask, serve and bench."""
    p.add_argument(
        "-b", "--bundle", default=default_bundle(), help="bundle directory ($MEDGEMMA_EDGE_BUNDLE)"
    )
    p.add_argument(
        "--profile",
        default="auto",
        help="device profile from models/profiles.toml (phone-4GB, phone-8GB, jetson-orin-nano-8GB, "
        "laptop-8GB, laptop-16GB); default auto: chosen from this machine's RAM and kind",
    )
    p.add_argument("--quant", help="which text model of the bundle (e.g. Q4_K_M); default: the profile's")
    p.add_argument("--ctx", type=int, help="context length in tokens (default: the profile's)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--kv-type", help="KV cache type: f16, q8_0, q4_0, f32 (default: the profile's)")
    p.add_argument("--no-flash-attn", action="store_true", help="disable flash attention")
    p.add_argument("--no-mmap", action="store_true", help="read weights into RAM instead of mapping them")
    p.add_argument(
        "--no-repack", action="store_true", help="no repacked weight copy (less RAM, slower on x86)"
    )
    p.add_argument("--gpu-layers", type=int, help="layers to offload to a GPU (-1 all; needs a GPU build)")
    p.add_argument(
        "--image-cache", type=Path, help="also keep encoded images in this directory (size-bounded)"
    )
    p.add_argument(
        "--image-encoder",
        choices=("auto", "mmproj", "onnx"),
        help="onnx: the bundle's ONNX image encoder (faster, no mmproj in memory); mmproj: llama.cpp's "
        "projector; default: the profile's, when the bundle has it",
    )


def model_kwargs(args: argparse.Namespace) -> dict:
    """MedGemma keyword arguments from the profile (``--profile``, auto-detected by default),
    overridden by the flags given explicitly."""
    from edge.bundle.manifest import open_bundle
    from edge.device import profiles
    from edge.media.image_cache import ImageCache
    from medgemma_edge.common import resolve_bundle

    bundle = open_bundle(resolve_bundle(args.bundle))
    name, kwargs = profiles.medgemma_options(
        bundle,
        args.profile,
        quant=args.quant,
        n_ctx=args.ctx,
        n_threads=args.threads,
        kv_type=args.kv_type,
        flash_attn=False if args.no_flash_attn else None,
        use_mmap=False if args.no_mmap else None,
        repack=False if args.no_repack else None,
        gpu_layers=args.gpu_layers,
        image_encoder=args.image_encoder,
    )
    if args.image_cache:
        kwargs["image_cache"] = ImageCache(disk_dir=args.image_cache)
    log.info("device profile %s: %s", name, {k: v for k, v in kwargs.items() if k != "image_cache"})
    return kwargs


def add_ask_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask MedGemma a question, optionally about images (PNG, JPEG, DICOM)")
    p.add_argument("question")
    add_model_options(p)
    p.add_argument(
        "--image", action="append", default=[], type=Path, help="an image file; repeat for several"
    )
    p.add_argument("--frame", type=int, help="which frame of a multi-frame DICOM (default: the middle one)")
    p.add_argument("--system", help="system instructions (folded into the first user turn for Gemma 3)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy (the default for MedGemma)")
    p.add_argument("--seed", type=int, help="makes sampled output repeatable")
    p.add_argument("--schema", help="constrain the answer to a JSON schema: a FILE.json or 'report'")
    p.add_argument("--json", action="store_true", help="print one JSON object (answer, usage, timings, ...)")
    p.set_defaults(func=run_ask)


def load_schema(arg: str | None) -> dict | None:
    from edge.medgemma.generation import builtin_schema

    if arg is None:
        return None
    if (schema := builtin_schema(arg)) is not None:
        return schema
    path = Path(arg)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"schema {arg} not found (a JSON file, or one of: report)") from None
    except ValueError as exc:
        raise InputError(f"schema {path} is not valid JSON ({exc})") from None


def open_model(args: argparse.Namespace):
    from edge.medgemma.model import MedGemma
    from medgemma_edge.common import resolve_bundle

    return MedGemma(resolve_bundle(args.bundle), **model_kwargs(args))


def run_ask(args: argparse.Namespace) -> int:
    from edge.medgemma.model import GenerateOptions
    from edge.media.images import load_image

    if args.max_tokens is not None and args.max_tokens <= 0:
        raise UsageError("--max-tokens must be positive")
    images = [load_image(p, frame=args.frame) for p in args.image]  # bad images fail before the model loads
    options = GenerateOptions(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        schema=load_schema(args.schema),
    )
    with open_model(args) as model:

        def show(piece):
            if not args.json and piece.text:
                sys.stdout.write(piece.text)
                sys.stdout.flush()

        answer = model.ask(args.question, images=images, system=args.system, options=options, on_piece=show)
    if args.json:
        emit_json({"ok": True, **answer.to_json()})
        return 0
    t = answer.timings
    label = (
        " — SYNTHETIC TWIN, random weights: this output means nothing" if answer.model["synthetic"] else ""
    )
    print(f"\n\n[{answer.disclaimer}]{label}")
    print(
        f"{answer.usage['completion_tokens']} tokens, {t['generation_tps']:.1f} tok/s, first token "
        f"{t['ttft_s']:.2f}s, finish: {answer.finish_reason}; images: {answer.image_cache['misses']} encoded, "
        f"{answer.image_cache['hits']} from cache",
        file=sys.stderr,
    )
    return 0
