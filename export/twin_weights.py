"""The twins' weights: every tensor drawn from its own seeded generator and streamed to shards.

The model is built on the ``meta`` device (no memory), its state-dict names and shapes are
listed, and each tensor is drawn, written into a ``model-0000N-of-0000M.safetensors`` shard and
freed, so the 8.6 GB MedGemma twin needs ~3 GB of RAM. A tensor's values depend only on the
seed and its name: order and sharding don't change them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

SHARD_BYTES = 4 << 30  # like the released checkpoints: a few GB per safetensors shard


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


def write_shards(
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


def meta_model(cls, config):
    """``cls(config)`` on the meta device: shapes and names only, no memory."""
    import torch

    with torch.device("meta"):
        return cls(config)
