"""Synthetic twins: Hugging Face checkpoints with the real architecture and random weights.

Real MedGemma/MedSigLIP weights can't be downloaded where this project is built and tested, so
every export path is proved on *twins*: checkpoint directories a converter can't tell from the
real ones (same architecture class, config keys, file layout, tokenizer files, preprocessor
config and chat template), with weights drawn from a fixed seed.

* ``tiny``: small dimensions, float32, builds in seconds (tests).
* ``full``: the registry's real dimensions, the real dtype; weights are generated tensor by
  tensor and streamed to safetensors shards, so the 8.6 GB MedGemma twin needs ~3 GB of RAM.

Two traps measured on this project (shared/FINDINGS.md) shape the twins: llama.cpp assumes
``query_pre_attn_scalar == head_dim`` and the 5 local : 1 global layer pattern, so twins keep
both; and weights must be wide enough (std 0.2 at fan-in 64, scaled by 1/sqrt(fan-in)) that
logits are well separated and top-1 comparisons mean something. *Every* weight is drawn,
including Gemma 3's multimodal projector, which transformers initialises to zeros (a dead image
path would let every image test pass whatever the image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge.bundle import registry
from edge.bundle.manifest import writable_parent
from edge.errors import UsageError, require

log = logging.getLogger(__name__)

SIZES = ("tiny", "full")
KINDS = {"medgemma": "medgemma-4b-it", "medsiglip": "medsiglip-448"}
TWIN_KEY = "medgemma_edge_twin"  # config.json key marking a synthetic checkpoint
SHARD_BYTES = 4 << 30  # like the released checkpoints: a few GB per safetensors shard

GEMMA_CONTROL = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

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


# --- corpus and tokenizers ---------------------------------------------------------------------

_WORDS = {
    "finding": [
        "consolidation",
        "effusion",
        "pneumothorax",
        "cardiomegaly",
        "atelectasis",
        "edema",
        "nodule",
        "mass",
        "fracture",
        "opacity",
        "infiltrate",
        "lesion",
        "melanoma",
        "nevus",
        "erythema",
        "calcification",
        "emphysema",
        "fibrosis",
        "hernia",
        "pleural thickening",
    ],
    "site": [
        "right lower lobe",
        "left upper lobe",
        "lung bases",
        "mediastinum",
        "costophrenic angle",
        "hilum",
        "upper arm",
        "forearm",
        "scalp",
        "abdomen",
        "left ventricle",
        "spine",
        "pelvis",
    ],
    "modality": [
        "chest x-ray",
        "radiograph",
        "CT scan",
        "MRI",
        "dermatology photograph",
        "ultrasound",
        "fundus photograph",
        "histopathology slide",
        "mammogram",
    ],
    "verb": [
        "shows",
        "demonstrates",
        "reveals",
        "suggests",
        "is consistent with",
        "excludes",
        "raises concern for",
    ],
    "size": [
        "small",
        "moderate",
        "large",
        "subtle",
        "extensive",
        "focal",
        "diffuse",
        "bilateral",
        "3 mm",
        "12 cm",
    ],
    "q": [
        "What does this image show?",
        "Is there evidence of",
        "Describe the findings in the",
        "Which abnormality is visible in the",
        "Summarize the report for the",
    ],
}


def synthetic_corpus(seed: int, n: int = 4000) -> list[str]:
    """Deterministic clinical-style sentences: enough text to train a small vocabulary."""
    rng = random.Random(seed)
    w = _WORDS
    lines = []
    for i in range(n):
        pick = {k: rng.choice(v) for k, v in w.items()}
        form = i % 4
        if form == 0:
            s = f"The {pick['modality']} {pick['verb']} a {pick['size']} {pick['finding']} in the {pick['site']}."
        elif form == 1:
            s = f"{pick['q']} {pick['finding']} on this {pick['modality']}?"
        elif form == 2:
            s = (
                f"Impression: {pick['size']} {pick['finding']}; no {rng.choice(w['finding'])}. "
                f"Follow-up in {rng.randint(1, 12)} weeks, patient {rng.randint(18, 95)} years old."
            )
        else:
            s = (
                f"Findings: {pick['finding']} at the {pick['site']} measuring {rng.randint(1, 99)} mm, "
                f"compared with prior study from {rng.randint(2001, 2025)}-{rng.randint(1, 12):02d}."
            )
        lines.append(s)
    return lines


def _train_sentencepiece(out_prefix: Path, lines: list[str], **kw) -> Path:
    spm = require("sentencepiece", "export")
    text = out_prefix.with_suffix(".txt")
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(out_prefix),
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        input_sentence_size=len(lines),
        shuffle_input_sentence=False,
        **kw,
    )
    text.unlink()
    return out_prefix.with_suffix(".model")


def _gemma_tokenizer(work: Path, seed: int, vocab: int):
    """A Gemma-style tokenizer: BPE with byte fallback, <pad>=0 <eos>=1 <bos>=2 <unk>=3,
    the turn and image tokens as control tokens, no dummy prefix."""
    transformers = require("transformers", "export")
    model = _train_sentencepiece(
        work / "gemma_sp",
        synthetic_corpus(seed),
        model_type="bpe",
        vocab_size=vocab,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        control_symbols=GEMMA_CONTROL,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
    )
    tok = transformers.GemmaTokenizerFast(
        vocab_file=str(model),
        add_bos_token=True,
        add_eos_token=False,
        additional_special_tokens=GEMMA_CONTROL,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    return tok, model


def _siglip_tokenizer(work: Path, seed: int, vocab: int):
    """A SigLIP-style tokenizer: unigram SentencePiece on lower-cased text, <pad>=0 </s>=1 <unk>=2."""
    transformers = require("transformers", "export")
    lines = [s.lower() for s in synthetic_corpus(seed)]
    model = _train_sentencepiece(
        work / "spiece",
        lines,
        model_type="unigram",
        vocab_size=vocab,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
    )
    tok = transformers.SiglipTokenizer(vocab_file=str(model), model_max_length=64)
    return tok, model


# --- configs -----------------------------------------------------------------------------------


def gemma3_config(size: str, vocab_size: int | None = None, seed: int = 0) -> dict:
    """config.json for a MedGemma twin: the registry's real numbers, or tiny ones."""
    spec = registry.get(KINDS["medgemma"])
    cfg = json.loads(json.dumps(spec.config))  # deep copy
    if size == "tiny":
        cfg["text_config"].update(TINY_GEMMA_TEXT, vocab_size=vocab_size, max_position_embeddings=8192)
        cfg["vision_config"].update(TINY_GEMMA_VISION)
        cfg["mm_tokens_per_image"] = TINY_GEMMA_MM_TOKENS
        cfg["text_config"]["torch_dtype"] = cfg["vision_config"]["torch_dtype"] = cfg["torch_dtype"] = (
            "float32"
        )
    return cfg


def siglip_config(size: str, vocab_size: int | None = None) -> dict:
    spec = registry.get(KINDS["medsiglip"])
    cfg = json.loads(json.dumps(spec.config))
    if size == "tiny":
        cfg["text_config"].update(TINY_SIGLIP_TOWER, vocab_size=vocab_size, projection_size=32)
        cfg["vision_config"].update(TINY_SIGLIP_TOWER)
    return cfg


# --- weights -----------------------------------------------------------------------------------


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _draw(name: str, shape: tuple[int, ...], module_type: str, seed: int, dtype):
    """One parameter, drawn from its own seeded generator (so order and sharding don't matter)."""
    import torch

    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0), dtype=dtype)  # a trained SigLIP's ~exp(4.6)
    if name.endswith("logit_bias"):
        return torch.full(shape, -10.0, dtype=dtype)
    t = torch.empty(shape, dtype=torch.float32)
    if "RMSNorm" in module_type:  # Gemma's RMSNorm scales by (1 + w)
        t.normal_(0.0, 0.1, generator=g)
    elif "LayerNorm" in module_type:  # scales by w
        t.normal_(1.0 if leaf == "weight" else 0.0, 0.1, generator=g)
    elif len(shape) == 1 or leaf == "bias":
        t.normal_(0.0, 0.05, generator=g)
    else:
        fan_in = math.prod(shape[1:])
        t.normal_(0.0, 1.6 / math.sqrt(fan_in), generator=g)  # 0.2 at fan-in 64
    return t.to(dtype)


def _param_table(model) -> list[tuple[str, tuple[int, ...], str]]:
    """(state-dict name, shape, owning module's class) for every persistent tensor."""
    owner = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = type(module).__name__
    return [(k, tuple(v.shape), owner.get(k, "")) for k, v in model.state_dict().items()]


def _checkpoint_name(model, name: str) -> str | None:
    """The name a released checkpoint uses (transformers' legacy layout); None drops a tied copy."""
    import re

    if name in (getattr(model, "_tied_weights_keys", None) or []):
        if getattr(model.config, "tie_word_embeddings", False) or getattr(
            getattr(model.config, "text_config", None), "tie_word_embeddings", False
        ):
            return None
    for saved, runtime in (getattr(model, "_checkpoint_conversion_mapping", None) or {}).items():
        pattern = "^" + re.escape(runtime)
        if re.match(pattern, name):
            return re.sub(pattern, saved.lstrip("^"), name, count=1)
    return name


def _write_shards(
    model, out: Path, seed: int, dtype, progress: Callable[[int, int], None] | None
) -> tuple[int, int]:
    """Draw every tensor and stream them into ``model-0000N-of-0000M.safetensors`` + index."""
    import torch
    from safetensors.torch import save_file

    table = [(n, s, t, _checkpoint_name(model, n)) for n, s, t in _param_table(model)]
    table = [row for row in table if row[3] is not None]
    elem = torch.empty((), dtype=dtype).element_size()
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_n, shape, _t, _c) in enumerate(table):
        nbytes = math.prod(shape) * elem
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    n_shards = len(shards)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    params = 0
    done = 0
    for k, idxs in enumerate(shards, 1):
        fname = "model.safetensors" if n_shards == 1 else f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for i in idxs:
            name, shape, mtype, ckpt = table[i]
            tensors[ckpt] = _draw(name, shape, mtype, seed, dtype).contiguous()
            weight_map[ckpt] = fname
            params += math.prod(shape)
            done += 1
            if progress:
                progress(done, len(table))
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if n_shards > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return params, total_bytes


def _meta_model(cls, config):
    import torch

    with torch.device("meta"):
        return cls(config)


# --- the twins ---------------------------------------------------------------------------------


def _medgemma(out: Path, size: str, seed: int, progress) -> int:
    import torch
    import transformers

    work = out / ".work"
    work.mkdir()
    vocab = TINY_VOCAB if size == "tiny" else 8000  # the full twin's vocab *size* is padded below
    tok, _ = _gemma_tokenizer(work, seed, vocab)
    n_real = len(tok)
    cfg = gemma3_config(size, seed=seed)
    if size == "tiny":
        cfg["text_config"]["vocab_size"] = -(-(n_real + 1) // 64) * 64  # padded like the real 262208
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA_CONTROL}
    cfg.update(
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        eos_token_id=[1, ids["<end_of_turn>"]],
    )
    config = transformers.Gemma3Config(**cfg)
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    model = _meta_model(transformers.Gemma3ForConditionalGeneration, config)
    params, _ = _write_shards(model, out, seed, dtype, progress)
    config.torch_dtype = dtype
    config.save_pretrained(out)

    image_processor = transformers.Gemma3ImageProcessor(
        size={"height": config.vision_config.image_size, "width": config.vision_config.image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        image_seq_length=config.mm_tokens_per_image,
    )
    spec = registry.get(KINDS["medgemma"])
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
    tok, _ = _siglip_tokenizer(work, seed, vocab)
    cfg = siglip_config(size, vocab_size=len(tok.sp_model) if size == "tiny" else None)
    config = transformers.SiglipConfig(**cfg)
    model = _meta_model(transformers.SiglipModel, config)
    params, _ = _write_shards(model, out, seed, torch.float32, progress)
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
        "model": KINDS[kind],
        "size": size,
        "seed": seed,
        "note": "random weights: outputs are meaningless; for testing the pipeline only",
    }
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(
        f"# Synthetic twin of {registry.get(KINDS[kind]).hf_id} ({size}, seed {seed})\n\n"
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
    info = TwinInfo(kind, size, seed, out, KINDS[kind], params, nbytes, time.perf_counter() - t0)
    log.info(
        "twin %s/%s seed %d: %d params, %d bytes in %.1fs", kind, size, seed, params, nbytes, info.seconds
    )
    return info
