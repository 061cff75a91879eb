"""MedSigLIP preprocessing on the device: pixels and token ids without torch or transformers.

Reproduces what transformers' ``SiglipProcessor`` does for the checkpoint a bundle was exported
from, from the spec the exporter stored in ``medsiglip/preprocess.json``:

* images: convert to RGB (PIL's ``convert``, as transformers' ``convert_to_rgb``: grayscale is
  replicated, alpha is dropped, 16-bit values are clipped to 0..255 exactly as the reference
  does), resize to the tower's size with the checkpoint's resampling filter (PIL, on 8-bit
  pixels), rescale by 1/255 in float64 then float32, normalize ``(x - mean) / std``; CHW float32.
* text: SigLIP's tokenizer rules: lower-case (not the special tokens), split on the special
  tokens, ``canonicalize_text`` (ASCII punctuation removed, whitespace collapsed), SentencePiece
  without a dummy prefix, ``</s>`` appended, truncated and padded with ``</s>`` to 64; no
  attention mask (the text tower pools the last position).

``tests/test_siglip_preprocess.py`` proves both equal transformers' output on varied inputs.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge.errors import InputError

SPIECE_UNDERLINE = "\u2581"
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
RESAMPLE_NAMES = {int(v): k for k, v in RESAMPLE.items()}  # PIL's integer codes (transformers stores these)
_PUNCT = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class ImageSpec:
    """How to turn an image into the vision tower's ``pixel_values`` row."""

    height: int = 448
    width: int = 448
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_json(cls, d: dict) -> ImageSpec:
        if d.get("resample") not in RESAMPLE:
            raise InputError(f"preprocess.json: unknown resample filter {d.get('resample')!r}")
        return cls(
            height=int(d["height"]),
            width=int(d["width"]),
            resample=d["resample"],
            rescale_factor=float(d["rescale_factor"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )

    def to_json(self) -> dict:
        return {
            "height": self.height,
            "width": self.width,
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "mean": list(self.mean),
            "std": list(self.std),
            "convert": "RGB (PIL convert; alpha dropped, 16-bit clipped as the reference does)",
            "layout": "NCHW float32",
        }


def image_to_pixels(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One PIL image → ``[3, H, W]`` float32, equal to SiglipImageProcessor's output."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((spec.width, spec.height), resample=RESAMPLE[spec.resample], reducing_gap=None)
    x = np.asarray(image)  # [H, W, 3] uint8
    x = (x.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def images_to_batch(images: list[Image.Image], spec: ImageSpec) -> np.ndarray:
    """Images → ``pixel_values`` ``[N, 3, H, W]`` float32."""
    return np.stack([image_to_pixels(im, spec) for im in images])


@dataclass(frozen=True)
class TextSpec:
    """SigLIP tokenizer settings, as the exporter read them from the checkpoint."""

    max_length: int = 64
    lowercase: bool = True
    eos_token: str = "</s>"
    unk_token: str = "<unk>"
    pad_id: int = 1
    special_tokens: tuple[tuple[str, int], ...] = (("</s>", 1), ("<unk>", 2))

    @classmethod
    def from_json(cls, d: dict) -> TextSpec:
        return cls(
            max_length=int(d["max_length"]),
            lowercase=bool(d["lowercase"]),
            eos_token=d["eos_token"],
            unk_token=d["unk_token"],
            pad_id=int(d["pad_id"]),
            special_tokens=tuple((k, int(v)) for k, v in d["special_tokens"].items()),
        )

    def to_json(self) -> dict:
        return {
            "max_length": self.max_length,
            "lowercase": self.lowercase,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_id": self.pad_id,
            "special_tokens": dict(self.special_tokens),
            "canonicalize": "remove ASCII punctuation, collapse whitespace, strip",
            "dummy_prefix": False,
            "attention_mask": False,
        }


class SiglipTokenizer:
    """SigLIP's slow tokenizer, on sentencepiece alone.

    ``model_file`` must be the bundle's ``spiece.model``, which the exporter saved with
    SentencePiece's dummy prefix switched off (as transformers' SiglipTokenizer loads it).
    """

    def __init__(self, model_file: str | Path, spec: TextSpec):
        import sentencepiece as spm

        self.spec = spec
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self._special = dict(spec.special_tokens)
        self.eos_id = self._special[spec.eos_token]
        self._unk_len = len(self.sp.encode(spec.unk_token, out_type=str))
        alts = "|".join(re.escape(t) for t in sorted(self._special, key=len, reverse=True))
        self._split = re.compile(f"({alts})")
        self._lower = re.compile(f"({alts})|(.+?)", re.DOTALL)

    @staticmethod
    def canonicalize(text: str) -> str:
        """big_vision's canonicalize_text: drop ASCII punctuation, collapse whitespace, strip."""
        return re.sub(r"\s+", " ", text.translate(_PUNCT)).strip()

    def _pieces(self, text: str) -> list[str]:
        text = self.canonicalize(text)
        pieces = self.sp.encode(self.spec.unk_token + text, out_type=str)
        return pieces[self._unk_len :] if len(pieces) >= self._unk_len else pieces

    def tokenize(self, text: str) -> list[str]:
        """Pieces (special tokens kept whole), before ``</s>`` and padding."""
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        if self.spec.lowercase:
            text = self._lower.sub(lambda m: m.group(1) or m.group(2).lower(), text)
        parts = [p for p in self._split.split(text)]
        # special tokens strip the whitespace on both sides of them (lstrip/rstrip AddedTokens)
        for i, p in enumerate(parts):
            if p in self._special:
                if i + 1 < len(parts) and parts[i + 1]:
                    parts[i + 1] = parts[i + 1].lstrip()
                if i > 0 and parts[i - 1]:
                    parts[i - 1] = parts[i - 1].rstrip()
        out: list[str] = []
        for p in parts:
            if not p:
                continue
            out.extend([p] if p in self._special else self._pieces(p))
        if len(out) > 1 and out[0] == SPIECE_UNDERLINE and out[1] in self._special:
            out = out[1:]
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids: truncated to ``max_length`` with ``</s>`` last, padded with ``</s>``."""
        ids = [
            self._special[p] if p in self._special else self.sp.piece_to_id(p) for p in self.tokenize(text)
        ]
        n = self.spec.max_length
        ids = ids[: n - 1]
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        return ids + [self.spec.pad_id] * (n - len(ids))

    def batch(self, texts: list[str]) -> np.ndarray:
        """Texts → ``input_ids`` ``[N, max_length]`` int64."""
        return np.asarray([self.encode(t) for t in texts], dtype=np.int64)
