"""The MedSigLIP step of ``make demo``: export the tiny twin to ONNX, zero-shot one image.

Kept apart from ``edge/demo.py`` so each pipeline owns its step; ``run_demo`` calls
:func:`demo_medsiglip` and prints the lines it returns. The export needs the ``export`` extra
(torch, transformers) and is skipped when the bundle's ``medsiglip`` component already verifies;
the classification itself uses only onnxruntime, the bundle's preprocessing and its precomputed
label embeddings.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from edge.bundle.manifest import open_bundle
from edge.errors import InputError

LABEL_SET = "cxr"
PRECISION = "int8"


def sample_image(size: int = 512) -> Image.Image:
    """A generated grayscale "chest film": two dark lung fields in a bright thorax, some noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((xx - 0.32) / 0.13) ** 2 + ((yy - 0.5) / 0.28) ** 2)) + np.exp(
        -(((xx - 0.68) / 0.13) ** 2 + ((yy - 0.5) / 0.28) ** 2)
    )
    body = np.exp(-(((xx - 0.5) / 0.42) ** 4 + ((yy - 0.55) / 0.5) ** 4))
    img = 40 + 170 * body - 110 * lungs + np.random.default_rng(0).normal(0, 6, (size, size))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="L")


def _ensure_component(root: Path, bundle_dir: Path) -> tuple[bool, float]:
    """(exported now?, seconds): reuse a verifying medsiglip component of the tiny twin."""
    t0 = time.perf_counter()
    try:
        b = open_bundle(bundle_dir)
        comp = b.component("medsiglip")
        if PRECISION in comp.get("precisions", []) and b.verify(component="medsiglip").ok:
            return False, time.perf_counter() - t0
    except InputError:
        pass
    from export.onnx.medsiglip import export_medsiglip
    from export.twin import build_twin, twin_info

    twin = root / "twins" / "medsiglip-tiny"
    if twin_info(twin) is None:
        build_twin("medsiglip", size="tiny", out=twin, seed=0)
    export_medsiglip(twin, bundle=bundle_dir, precisions=[PRECISION, "fp32"], fidelity_images=3)
    return True, time.perf_counter() - t0


def demo_medsiglip(root: Path, bundle_dir: Path) -> dict:
    """Export (or reuse) the tiny MedSigLIP twin in ``bundle_dir`` and zero-shot a sample image.

    Returns a dict with the figures and ``lines``: what the demo prints.
    """
    from edge.medsiglip import onnx_towers

    exported, export_s = _ensure_component(Path(root), Path(bundle_dir))
    b = open_bundle(bundle_dir)
    comp = b.component("medsiglip")
    t0 = time.perf_counter()
    z = onnx_towers.zero_shot(b, sample_image(), label_set=LABEL_SET, precision=PRECISION)
    classify_s = time.perf_counter() - t0
    ranked = sorted(zip(z.labels, z.scores, z.logits, strict=True), key=lambda t: -t[2])
    fid = comp["fidelity"][PRECISION]["vision"]
    lines = [
        f"bundle {bundle_dir} medsiglip: {'exported' if exported else 'reused (verified)'} in {export_s:.1f}s; "
        f"{PRECISION} vision tower cosine vs transformers ≥ {fid['cosine_min']:.4f}",
        f"zero-shot ({LABEL_SET}, generated sample image, {classify_s:.2f}s, onnxruntime + stored label embeddings):",
        *(f"  {label:<20} score {score:.3f}  logit {logit:+.2f}" for label, score, logit in ranked[:3]),
        "Scores from a synthetic twin are meaningless; on the real model they are not probabilities of disease.",
    ]
    return {
        "bundle": str(bundle_dir),
        "exported": exported,
        "export_s": export_s,
        "classify_s": classify_s,
        "label_set": LABEL_SET,
        "precision": PRECISION,
        "top": ranked[:3],
        "lines": lines,
    }
