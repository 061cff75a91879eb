"""The prompt as segments, and reuse of what the KV cache already holds.

A prompt is a list of segments: text (token ids) and images (their embeddings' key and length).
Every position of the context has an *identity*: the token id for text, ``(key, i)`` for the
i-th embedding of an image. After an answer the runtime remembers the identities the KV cache
holds (prompt + generated tokens); the next prompt keeps the longest common prefix and
evaluates only the rest. A follow-up in the same conversation, or a new question about the same
image, then costs its few new tokens instead of the 256 image tokens and everything before.

Gemma 3's image tokens attend to each other both ways (non-causal), so an image is kept whole
or not at all. With llama.cpp's sliding-window cache trimmed to the window (``swa_full=False``,
the phone profiles), removing positions may be impossible; the runtime then starts over.

Feeding embeddings: :func:`decode_embeddings` does what libmtmd's
``mtmd_helper_decode_image_chunk`` does for Gemma 3 (a ``llama_batch`` with ``embd`` set,
consecutive positions, causal attention off for the image) without needing a libmtmd context, so
the ONNX image path works with no mmproj loaded. ``tests/test_kv_prefix.py`` checks the logits
equal libmtmd's own helper's exactly.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from edge.errors import ResourceError

IMAGE_START, IMAGE_END = "<start_of_image>", "<end_of_image>"  # what libmtmd wraps a Gemma 3 image in


@dataclass(frozen=True)
class ImageSegment:
    key: str  # image content hash + encoder fingerprint
    n_tokens: int
    index: int  # which image of the request


Segment = list[int] | ImageSegment


def split_prompt(text: str, marker: str, tokenize) -> list[Segment]:
    """Text with ``marker`` where each image goes → [tokens, image slot, tokens, ...].

    Image slots come back as ``ImageSegment(key="", n_tokens=0, index=i)`` to be filled in by
    the caller. Tokenization is libmtmd's: each image is wrapped in ``<start_of_image>`` …
    ``<end_of_image>`` and each text piece is tokenized on its own with special tokens parsed.
    """
    pieces = text.split(marker)
    out: list[Segment] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            out.append(ImageSegment("", 0, i - 1))
            piece = IMAGE_END + piece
        if i < len(pieces) - 1:
            piece = piece + IMAGE_START
        if piece:
            out.append(tokenize(piece))
    return out


def identities(segments: list[Segment]) -> list:
    ids: list = []
    for seg in segments:
        if isinstance(seg, ImageSegment):
            ids.extend((seg.key, i) for i in range(seg.n_tokens))
        else:
            ids.extend(seg)
    return ids


def _image_start(ids: list, k: int) -> int:
    """Back ``k`` up to the start of an image that position ``k`` falls inside."""
    if 0 < k < len(ids) and isinstance(ids[k], tuple):
        return k - ids[k][1]
    return k


def reusable_prefix(held: list, wanted: list, *, keep_last: bool = True) -> int:
    """How many leading positions of ``wanted`` the cache (holding ``held``) can keep: the common
    prefix, never splitting an image, and (``keep_last``) at least one position left to
    evaluate, since the last prompt token is evaluated again so that its logits exist."""
    k = 0
    for a, b in zip(held, wanted[:-1] if keep_last else wanted, strict=False):
        if a != b:
            break
        k += 1
    return min(_image_start(held, k), _image_start(wanted, k))


def decode_embeddings(ctx, embd: np.ndarray, n_past: int, *, n_batch: int, non_causal: bool = True) -> None:
    """Put ``embd`` ([n, n_embd] float32) at positions ``n_past..n_past+n-1`` of sequence 0."""
    import llama_cpp

    n, n_embd = embd.shape
    if non_causal and n > n_batch:
        raise ResourceError(f"an image of {n} tokens needs a batch of at least {n} (have {n_batch})")
    data = np.ascontiguousarray(embd, dtype=np.float32)
    batch = llama_cpp.llama_batch_init(min(n, n_batch), n_embd, 1)
    try:
        if non_causal:
            llama_cpp.llama_set_causal_attn(ctx, False)
        for start in range(0, n, n_batch):
            m = min(n_batch, n - start)
            ctypes.memmove(batch.embd, data[start : start + m].ctypes.data, m * n_embd * 4)
            for j in range(m):
                batch.pos[j] = n_past + start + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = False
            batch.n_tokens = m
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise ResourceError(f"llama.cpp failed to decode the image embeddings (code {rc})")
    finally:
        if non_causal:
            llama_cpp.llama_set_causal_attn(ctx, True)
        llama_cpp.llama_batch_free(batch)


def remove_from(ctx, pos: int) -> bool:
    """Drop positions ``pos..`` of sequence 0 from the KV cache; False if the cache can't."""
    import llama_cpp

    mem = llama_cpp.llama_get_memory(ctx)
    return bool(llama_cpp.llama_memory_seq_rm(mem, 0, pos, -1))
