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

Only the bookkeeping lives here (pure Python); dropping positions from llama.cpp's cache and
feeding image embeddings to it are in :mod:`edge.medgemma.llama_binding`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """The identity of every position of ``segments``: token ids, ``(key, i)`` for image positions."""
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
