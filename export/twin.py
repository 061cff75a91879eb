"""Synthetic twins: Hugging Face checkpoints with the real architecture and random weights.

Real MedGemma/MedSigLIP weights can't be downloaded where this project is built and tested, so
every export path is proved on *twins*: checkpoint directories a converter can't tell from the
real ones (same architecture class, config keys, file layout, tokenizer files, preprocessor
config and chat template), with weights drawn from a fixed seed.

* ``tiny``: small dimensions, float32, builds in seconds (tests).
* ``full``: the registry's real dimensions, the real dtype; weights are generated tensor by
  tensor and streamed to safetensors shards, so the 8.6 GB MedGemma twin needs ~3 GB of RAM.
* ``tiny-27b`` (MedGemma only): MedGemma 27B's shape at tiny widths: its 62 layers (what makes
  llama.cpp treat it as its 27B type) and its attention scale ``query_pre_attn_scalar =
  hidden_size / num_attention_heads != head_dim``; float32, 15M parameters, ~11 s. Proves the
  27B export.
* ``mid-27b`` (MedGemma only): 62 layers again, every row a multiple of 256 as in the real 27B,
  so the K-quants keep their types instead of falling back; 61M parameters, 123 MB in bf16,
  ~13 s. Checks the 27B size estimate (:mod:`export.gguf.sizes`) against real quantized files.
  (A full-size 27B twin would be 54 GB: its sizes come from that estimate instead.)

Two traps measured on this project (shared/FINDINGS.md) shape the twins: llama.cpp takes the
attention scale from its model type (``head_dim``, or ``hidden_size / num_attention_heads`` for
the 62-layer 27B type) and assumes the 5 local : 1 global layer pattern, so twins keep both; and
weights must be wide enough (std 0.2 at fan-in 64, scaled by 1/sqrt(fan-in)) that
logits are well separated and top-1 comparisons mean something. *Every* weight is drawn,
including Gemma 3's multimodal projector, which transformers initialises to zeros (a dead image
path would let every image test pass whatever the image).

This module holds the configs and the build; the tokenizers are :mod:`export.twin_tokenizers`,
the weights :mod:`export.twin_weights`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge.bundle import registry
from edge.bundle.write import writable_parent
from edge.errors import UsageError, require
from export.twin_tokenizers import GEMMA_CONTROL, gemma_tokenizer, siglip_tokenizer
from export.twin_weights import meta_model, write_shards

log = logging.getLogger(__name__)

SIZES = ("tiny", "full", "tiny-27b", "mid-27b")
KINDS = {"medgemma": "medgemma-4b-it", "medsiglip": "medsiglip-448"}
# sizes of another registry entry than KINDS' (MedGemma only)
SIZE_MODELS = {"tiny-27b": "medgemma-27b-it", "mid-27b": "medgemma-27b-it"}
TWIN_KEY = "medgemma_edge_twin"  # config.json key marking a synthetic checkpoint

# Tiny dimensions. Kept: head_dim == query_pre_attn_scalar, 6 layers = 5 local + 1 global,
# image_size/patch_size = 4 * sqrt(mm_tokens_per_image) (llama.cpp's fixed 4x4 pooling).
TINY_GEMMA_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    query_pre_attn_scalar=32,
    sliding_window=64,
)
TINY_GEMMA_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=8,
    image_size=128,
)
TINY_GEMMA_MM_TOKENS = 16
# MedGemma 27B's shape at small widths: 62 layers (llama.cpp's 27B type), query_pre_attn_scalar =
# hidden/heads (27B: 5376/32 = 168) != head_dim (27B: 128), 2 query heads per KV head, FFN = 4x.
TINY_27B_TEXT = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=62,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    query_pre_attn_scalar=32,
    sliding_window=64,
)
# ... and with every row length a multiple of 256 (K-quant blocks), as all of the real 27B's are:
# hidden 256, q/o 2 x 128 = 256, FFN 1024 (query_pre_attn_scalar = hidden/heads, here = head_dim).
MID_27B_TEXT = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=62,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    query_pre_attn_scalar=128,
    sliding_window=256,
)
_SMALL_TEXT = {"tiny": TINY_GEMMA_TEXT, "tiny-27b": TINY_27B_TEXT, "mid-27b": MID_27B_TEXT}
TINY_SIGLIP_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_VOCAB = 1024


@dataclass
class TwinInfo:
    """What :func:`build_twin` made."""

    kind: str
    size: str
    seed: int
    path: Path
    model_id: str
    params: int
    bytes: int
    seconds: float


# --- configs -----------------------------------------------------------------------------------


def twin_model(kind: str, size: str) -> str:
    """The registry id a twin of ``kind`` at ``size`` copies."""
    return SIZE_MODELS.get(size, KINDS[kind]) if kind == "medgemma" else KINDS[kind]


def gemma3_config(size: str, vocab_size: int | None = None, seed: int = 0) -> dict:
    """config.json for a MedGemma twin: the registry's real numbers, or small ones (tiny, and the
    27B shapes tiny-27b and mid-27b, which keep the 27B entry's other numbers)."""
    spec = registry.get(twin_model("medgemma", size))
    cfg = json.loads(json.dumps(spec.config))  # deep copy
    if size in _SMALL_TEXT:
        cfg["text_config"].update(_SMALL_TEXT[size], vocab_size=vocab_size, max_position_embeddings=8192)
        cfg["vision_config"].update(TINY_GEMMA_VISION)
        cfg["mm_tokens_per_image"] = TINY_GEMMA_MM_TOKENS
        cfg["text_config"]["torch_dtype"] = cfg["vision_config"]["torch_dtype"] = cfg["torch_dtype"] = (
            "float32"
        )
    return cfg


def siglip_config(size: str, vocab_size: int | None = None) -> dict:
    """config.json for a MedSigLIP twin: the registry's real numbers, or tiny ones."""
    spec = registry.get(KINDS["medsiglip"])
    cfg = json.loads(json.dumps(spec.config))
    if size == "tiny":
        cfg["text_config"].update(TINY_SIGLIP_TOWER, vocab_size=vocab_size, projection_size=32)
        cfg["vision_config"].update(TINY_SIGLIP_TOWER)
    return cfg


# --- the twins ---------------------------------------------------------------------------------


def _medgemma(out: Path, size: str, seed: int, progress) -> int:
    import torch
    import transformers

    work = out / ".work"
    work.mkdir()
    small = size in _SMALL_TEXT
    vocab = TINY_VOCAB if small else 8000  # the full twin's vocab *size* is padded below
    tok, _ = gemma_tokenizer(work, seed, vocab)
    n_real = len(tok)
    cfg = gemma3_config(size, seed=seed)
    if small:
        cfg["text_config"]["vocab_size"] = -(-(n_real + 1) // 64) * 64  # padded like the real 262208
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA_CONTROL}
    cfg.update(
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        eos_token_id=[1, ids["<end_of_turn>"]],
    )
    config = transformers.Gemma3Config(**cfg)
    dtype = torch.bfloat16 if size in ("full", "mid-27b") else torch.float32
    model = meta_model(transformers.Gemma3ForConditionalGeneration, config)
    params, _ = write_shards(model, out, seed, dtype, progress)
    config.torch_dtype = dtype
    config.save_pretrained(out)

    image_processor = transformers.Gemma3ImageProcessor(
        size={"height": config.vision_config.image_size, "width": config.vision_config.image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        image_seq_length=config.mm_tokens_per_image,
    )
    spec = registry.get(twin_model("medgemma", size))
    template = spec.chat_template()
    tok.chat_template = template
    processor = transformers.Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=template,
        image_seq_length=config.mm_tokens_per_image,
    )
    processor.save_pretrained(out)
    transformers.GenerationConfig(
        bos_token_id=2,
        eos_token_id=[1, ids["<end_of_turn>"]],
        pad_token_id=0,
        do_sample=False,
    ).save_pretrained(out)
    shutil.rmtree(work)
    return params


def _medsiglip(out: Path, size: str, seed: int, progress) -> int:
    import torch
    import transformers

    work = out / ".work"
    work.mkdir()
    vocab = TINY_VOCAB if size == "tiny" else 8000
    tok, _ = siglip_tokenizer(work, seed, vocab)
    cfg = siglip_config(size, vocab_size=len(tok.sp_model) if size == "tiny" else None)
    config = transformers.SiglipConfig(**cfg)
    model = meta_model(transformers.SiglipModel, config)
    params, _ = write_shards(model, out, seed, torch.float32, progress)
    config.torch_dtype = torch.float32
    config.save_pretrained(out)
    image_size = config.vision_config.image_size
    image_processor = transformers.SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    transformers.SiglipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)
    shutil.rmtree(work)
    return params


_BUILDERS = {"medgemma": _medgemma, "medsiglip": _medsiglip}


def _mark_synthetic(out: Path, kind: str, size: str, seed: int) -> None:
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[TWIN_KEY] = {
        "synthetic": True,
        "model": twin_model(kind, size),
        "size": size,
        "seed": seed,
        "note": "random weights: outputs are meaningless; for testing the pipeline only",
    }
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(
        f"# Synthetic twin of {registry.get(twin_model(kind, size)).hf_id} ({size}, seed {seed})\n\n"
        "Made by `medgemma-edge twin`. Same architecture, config keys and file layout as the\n"
        "released checkpoint; random weights. Not a medical model: its outputs mean nothing.\n"
    )


def twin_info(path: Path) -> dict | None:
    """The twin marker of a checkpoint directory, or None for a real checkpoint."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get(TWIN_KEY)
    except (OSError, ValueError):
        return None


def build_twin(
    kind: str,
    *,
    size: str = "tiny",
    out: str | os.PathLike,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> TwinInfo:
    """Write a synthetic twin checkpoint of ``kind`` ("medgemma" or "medsiglip") to ``out``.

    The directory is built beside ``out`` and renamed into place, so an interrupted build
    leaves nothing at ``out``.

    Raises:
        UsageError: unknown kind or size, or ``out`` exists and is not empty.
        InputError: ``out``'s parent can't be written.
    """
    if kind not in KINDS:
        raise UsageError(f"unknown twin model {kind!r}; choose one of: {', '.join(KINDS)}")
    if size not in SIZES:
        raise UsageError(f"unknown twin size {size!r}; choose one of: {', '.join(SIZES)}")
    if size in SIZE_MODELS and kind != "medgemma":
        raise UsageError(f"twin size {size} is MedGemma's only; choose tiny or full for {kind}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not empty; choose a new --out or remove it")
    parent = writable_parent(out, "choose another --out")
    require("torch", "export")
    require("transformers", "export")
    tmp = parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        import torch

        with torch.inference_mode():
            params = _BUILDERS[kind](tmp, size, seed, progress)
        _mark_synthetic(tmp, kind, size, seed)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    info = TwinInfo(kind, size, seed, out, twin_model(kind, size), params, nbytes, time.perf_counter() - t0)
    log.info(
        "twin %s/%s seed %d: %d params, %d bytes in %.1fs", kind, size, seed, params, nbytes, info.seconds
    )
    return info
