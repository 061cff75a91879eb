"""Fidelity of exported MedSigLIP towers against transformers, on fixed inputs.

The reference is transformers' ``SiglipModel`` fed by transformers' ``SiglipProcessor``; the
exported towers are fed by the device-side preprocessing (``edge.medsiglip.preprocess``), so the
figures cover the whole device path. Per precision: cosine (min/mean) and max abs difference
of the raw embeddings, for images and texts, and zero-shot agreement per label set (the top
label from the exported vision tower against the stored label embeddings, vs the reference).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

EXTRA_TEXTS = [
    "A CHEST X-RAY, PA VIEW: no pneumothorax!",
    "Zoster (shingles) — dermatomal vesicles on the left flank; ünïcode test ✓",
    " ".join(["bilateral lower lobe opacities with small effusions"] * 10),  # > 64 tokens
    "",
]


def sample_images(n: int = 6, seed: int = 0) -> list[Image.Image]:
    """Deterministic synthetic images of varied kinds (not medical; they exercise the path)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:512, 0:512] / 512.0
    disk = ((xx - 0.5) ** 2 + (yy - 0.55) ** 2 < 0.12).astype(np.float64)
    kinds = [
        Image.fromarray(
            (255 * (0.2 + 0.6 * disk * (1 - yy)) + rng.normal(0, 12, disk.shape))
            .clip(0, 255)
            .astype(np.uint8)
        ),  # "x-ray" L
        Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)),  # noise RGB
        Image.fromarray((np.stack([xx, yy, 1 - xx], -1) * 255).astype(np.uint8)),  # gradient RGB
        Image.fromarray(((np.indices((97, 61)).sum(0) % 2) * 255).astype(np.uint8)).convert(
            "RGB"
        ),  # checkerboard
        Image.fromarray((disk * 40000 + 3000).astype(np.uint16)),  # 16-bit
        Image.fromarray(
            np.dstack(
                [(rng.random((200, 150, 3)) * 200 + 30).astype(np.uint8), np.full((200, 150), 200, np.uint8)]
            )
        ),  # RGBA
        Image.fromarray(
            (np.stack([0.9 * np.ones_like(xx), 0.7 - 0.5 * disk, 0.6 - 0.4 * disk], -1) * 255).astype(
                np.uint8
            )
        ),  # "skin lesion"
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def reference_embeddings(
    processor, *, vision=None, text=None, images: list[Image.Image] = (), texts: list[str] = ()
) -> dict[str, np.ndarray]:
    """transformers' raw embeddings (fp32) of ``images`` / ``texts``.

    ``vision``/``text``: a SiglipVisionModel / SiglipTextModel, or a SiglipModel's
    ``vision_model`` / ``text_model``; their ``pooler_output`` is what ``get_image_features`` /
    ``get_text_features`` return.
    """
    import torch

    out = {}
    with torch.inference_mode():
        if vision is not None and images:
            rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
            px = processor(images=rgb, return_tensors="pt")["pixel_values"]
            out["image_embeds"] = vision(pixel_values=px).pooler_output.float().numpy()
        if text is not None and texts:
            ids = processor(
                text=list(texts), padding="max_length", truncation=True, max_length=64, return_tensors="pt"
            )
            out["text_embeds"] = text(input_ids=ids["input_ids"]).pooler_output.float().numpy()
    return out


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Cosine (min, mean) per row and max abs difference of two ``[N, D]`` arrays."""
    cos = np.sum(normalize(ref.astype(np.float64)) * normalize(got.astype(np.float64)), axis=-1)
    return {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "max_abs_diff": float(np.abs(ref - got).max()),
    }


def zero_shot_scores(img: np.ndarray, labels: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """SigLIP's scores: ``sigmoid(exp(scale) * img_n @ labels_n.T + bias)``, ``[images, labels]``."""
    logits = np.exp(scale) * normalize(img) @ normalize(labels).T + bias
    return 1.0 / (1.0 + np.exp(-logits))


def zero_shot_agreement(
    ref_img: np.ndarray,
    got_img: np.ndarray,
    ref_labels: dict[str, np.ndarray],
    got_labels: dict[str, np.ndarray],
    scale: float,
    bias: float,
) -> dict[str, dict[str, float]]:
    """Per label set: fraction of images with the same top label, and max score difference."""
    out = {}
    for name, ref_l in ref_labels.items():
        a = zero_shot_scores(ref_img, ref_l, scale, bias)
        b = zero_shot_scores(got_img, got_labels[name], scale, bias)
        out[name] = {
            "top1_agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
            "max_score_diff": float(np.abs(a - b).max()),
        }
    return out
