"""The similar-case step of ``make demo``: index sample images, search by image and text, zero-shot.

:func:`demo_cases` generates a folder of varied synthetic images (chest-film-like, skin-photo-
like, fundus-like and texture images, PNG and JPEG, 8- and 16-bit), copies a handful of
pydicom's bundled DICOM test files (found offline inside the installed package; one of them
truncated, one without pixels, so the "reported and skipped" path shows), and one corrupt file;
indexes them into ``root/cases-index``; then searches by a new image and by a text and scores
one image zero-shot. Re-running it skips everything already indexed (that is the resume path).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from edge.bundle.manifest import open_bundle
from edge.errors import InputError

PRECISION = "int8"
DICOM_SAMPLES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "JPEG2000.dcm",
    "693_J2KI.dcm",
    "examples_rgb_color.dcm",
    "examples_palette.dcm",
    "MR_truncated.dcm",  # damaged: reported and skipped
    "rtplan.dcm",  # no pixel data: reported and skipped
)


def _film(rng: np.random.Generator, size: int = 384) -> Image.Image:
    """A chest-film-like greyscale picture: two dark lung fields, random heart and lesions."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    gap = rng.uniform(0.15, 0.2)
    lungs = sum(
        np.exp(-(((xx - (0.5 + s * gap)) / 0.13) ** 2 + ((yy - 0.5) / rng.uniform(0.24, 0.3)) ** 2))
        for s in (-1, 1)
    )
    heart = np.exp(-(((xx - 0.55) / rng.uniform(0.08, 0.16)) ** 2 + ((yy - 0.62) / 0.12) ** 2))
    img = 40 + 170 * np.exp(-(((xx - 0.5) / 0.42) ** 4 + ((yy - 0.55) / 0.5) ** 4)) - 110 * lungs + 60 * heart
    for _ in range(rng.integers(0, 3)):  # "opacities"
        cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.3, 0.7), rng.uniform(0.02, 0.08)
        img += 70 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / r**2))
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="L")


def _skin(rng: np.random.Generator, size: int = 320) -> Image.Image:
    """A skin-photo-like RGB picture: a tone, and one irregular brown lesion."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    tone = np.array(rng.uniform([170, 120, 100], [240, 190, 160]))
    angle = np.arctan2(yy - 0.5, xx - 0.5)
    radius = rng.uniform(0.1, 0.25) * (1 + 0.2 * np.sin(rng.integers(3, 7) * angle))
    lesion = (np.hypot(xx - 0.5, yy - 0.5) < radius)[..., None]
    dark = np.array(rng.uniform([60, 30, 20], [130, 80, 60]))
    img = np.where(lesion, dark, tone) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="RGB")


def _fundus(rng: np.random.Generator, size: int = 320) -> Image.Image:
    """A fundus-like picture: an orange disc on black with a bright optic disc and vessels."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    disc = np.hypot(xx - 0.5, yy - 0.5) < 0.45
    img = np.zeros((size, size, 3))
    img[disc] = [200, 90, 40]
    ox, oy = rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.6)
    img += (np.exp(-((xx - ox) ** 2 + (yy - oy) ** 2) / 0.003) * 55)[..., None]
    for k in range(4):
        vessel = np.abs(np.sin((yy - oy) * rng.uniform(4, 9) + k) * 0.2 - (xx - ox)) < 0.006
        img[vessel & disc] = [120, 20, 10]
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="RGB")


def _texture(rng: np.random.Generator, size: int = 256) -> Image.Image:
    """A 16-bit greyscale texture (exercises the high-bit-depth path)."""
    base = rng.normal(0, 1, (size // 16, size // 16))
    img = np.kron(base, np.ones((16, 16))) + rng.normal(0, 0.3, (size, size))
    return Image.fromarray(((img - img.min()) / np.ptp(img) * 60000).astype(np.uint16))


KINDS = {
    "film": (_film, "png"),
    "skin": (_skin, "jpg"),
    "fundus": (_fundus, "png"),
    "texture": (_texture, "png"),
}


def make_samples(folder: Path, *, per_kind: int = 5, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic samples (one sub-folder per kind) and the DICOM samples; kind → folder."""
    import pydicom

    rng = np.random.default_rng(seed)
    out = {}
    for kind, (make, ext) in KINDS.items():
        d = folder / kind
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_kind):
            path = d / f"{kind}-{i:02d}.{ext}"
            img = make(rng)  # always drawn, so every sample is the same on every run
            if not path.exists():
                img.save(path, **({"quality": 92} if ext == "jpg" else {}))
        out[kind] = d
    (folder / "film" / "corrupt-00.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # reported, skipped
    src = Path(pydicom.__file__).parent / "data" / "test_files"  # offline: never get_testdata_file
    d = folder / "dicom"
    d.mkdir(exist_ok=True)
    for name in DICOM_SAMPLES:
        if (src / name).is_file() and not (d / name).exists():
            shutil.copyfile(src / name, d / name)
    out["dicom"] = d
    return out


def demo_cases(root: Path, bundle_dir: Path) -> dict:
    """Index sample images into ``root/cases-index``, search by image and text, zero-shot one.

    Needs the bundle's ``medsiglip`` component (made by :func:`edge.demo_medsiglip.demo_medsiglip`
    if missing). Returns the figures and ``lines``: what the demo prints.
    """
    from edge.cases.index import CaseIndex
    from edge.medsiglip.model import MedSigLIP

    root, bundle_dir = Path(root), Path(bundle_dir)
    try:
        open_bundle(bundle_dir).component("medsiglip")
    except InputError:
        from medgemma_edge.demo.medsiglip import demo_medsiglip

        demo_medsiglip(root, bundle_dir)
    enc = MedSigLIP(bundle_dir, precision=PRECISION, threads=2)
    folders = make_samples(root / "samples")
    index_dir = root / "cases-index"
    lines = []
    try:
        idx = CaseIndex.open(index_dir, encoder=enc, create=True)
    except InputError:  # built with an earlier export of the bundle: the demo starts it afresh
        shutil.rmtree(index_dir)
        lines.append("the previous demo index was built with another export of the bundle: rebuilt")
        idx = CaseIndex.open(index_dir, encoder=enc, create=True)
    with idx:
        t0 = time.perf_counter()
        reports = {kind: idx.add([d], encoder=enc, meta={"kind": kind}) for kind, d in folders.items()}
        add_s = time.perf_counter() - t0
        added = sum(r.added for r in reports.values())
        dups = sum(r.duplicates for r in reports.values())
        failed = [(Path(p).name, e) for r in reports.values() for p, e in r.failed]
        lines.append(
            f"case index {index_dir}: {added} added, {dups} already there, {len(failed)} skipped as unreadable "
            f"({idx.count()} cases, {add_s:.1f}s, onnxruntime {PRECISION})"
        )
        lines += [f"  skipped {name}: {err}" for name, err in failed]

        query = _film(np.random.default_rng(1234))  # a new film, not in the index
        t0 = time.perf_counter()
        by_image = idx.search_image(query, encoder=enc, k=3)
        image_s = time.perf_counter() - t0
        lines.append(f"search by a new film-like image ({image_s * 1e3:.0f} ms):")
        lines += [
            f"  #{h.id:<4} {h.score:.3f}  kind={h.metadata.get('kind')}  {Path(h.content).name}"
            for h in by_image
        ]
        text = "a chest x-ray showing pleural effusion"
        t0 = time.perf_counter()
        by_text = idx.search_text(text, encoder=enc, k=3, where={"kind": "film"})
        text_s = time.perf_counter() - t0
        lines.append(f'search by text "{text}" where kind=film ({text_s * 1e3:.0f} ms):')
        lines += [f"  #{h.id:<4} {h.score:.3f}  {Path(h.content).name}" for h in by_text]
        cases = idx.count()

    skin = next(iter(sorted(folders["skin"].glob("*.jpg"))))
    z = enc.classify(skin, label_set="derm")
    lines.append(f"zero-shot {skin.name} against the bundled derm labels ({z.seconds * 1e3:.0f} ms):")
    lines += [f"  {r.label:<24} score {r.score:.3f}  logit {r.logit:+.2f}" for r in z.ranked[:3]]
    lines.append(
        z.note
        + (" Synthetic twin: random weights, so rankings mean nothing." if enc.bundle.synthetic else "")
    )
    return {
        "index": str(index_dir),
        "added": added,
        "duplicates": dups,
        "failed": failed,
        "cases": cases,
        "add_s": add_s,
        "search_image": [h.to_json() for h in by_image],
        "search_text": [h.to_json() for h in by_text],
        "classify": z.to_json(),
        "lines": lines,
    }
