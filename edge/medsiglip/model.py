"""MedSigLIP on the device: batched image/text embeddings and zero-shot scores (onnxruntime; the
vision tower on OpenVINO where that is faster, see ``engine``).

Builds on :mod:`edge.medsiglip.onnx_towers` (which verifies each tower file and opens its onnxruntime session)
and :mod:`edge.medsiglip.preprocess` (the bundle's own resize/normalize spec and tokenizer):

```
enc = MedSigLIP(bundle, precision="int8", threads=2)
img = enc.embed_images([path_or_pil, ...])          # [N, D] float32, L2-normalized
txt = enc.embed_texts(["a chest x-ray showing ..."])  # [N, D]; the text session opens on first use
res = enc.classify(path_or_pil, label_set="cxr")     # ranked labels, SigLIP sigmoid scores
```

Images go through :func:`edge.media.images.load_image` (PNG/JPEG/DICOM with the same limits as the
LLM path) when given as paths or bytes. Work runs in batches; a ``threading.Event`` passed as
``cancel`` stops it between batches with :class:`edge.errors.Cancelled`.

Dynamic int8 graphs quantize activations per tensor, over the whole batch, so an image's int8
embedding shifts slightly with the images that share its batch. The default vision batch for
int8 is therefore 1 (embeddings independent of batching, as the export's fidelity was measured);
fp32/fp16 and ``int8-static`` (fused attention, activation scales fixed at export: a batch gives
batch-1 results up to float rounding) batch by default.

``engine`` (:class:`~edge.medsiglip.settings.MedSigLIPSettings`): an fp32 vision tower runs on
OpenVINO with bf16 compute where the export measured it within the fidelity bar, the CPU has
AVX512-BF16/AMX and OpenVINO is installed (the ``openvino`` extra), else on onnxruntime; the file
and so the embedding space (``fingerprint``) are the same either way. A device without OpenVINO
falls back with one log line. ``benchmarks/bench_encoders.py`` measures what batching and each
engine buy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from edge.bundle.manifest import Bundle, open_bundle
from edge.errors import Cancelled, InputError, UsageError
from edge.media.images import LoadedImage, load_image
from edge.medsiglip import onnx_towers
from edge.medsiglip.preprocess import image_to_pixels
from edge.medsiglip.settings import MedSigLIPSettings
from edge.settings import overrides as apply_overrides

log = logging.getLogger(__name__)

COMPONENT = onnx_towers.COMPONENT
OUTPUTS = {"vision": "image_embeds_normalized", "text": "text_embeds_normalized"}
NOT_PROBABILITIES = (
    "Scores are SigLIP similarity scores between the image and each label's text, "
    "not probabilities of disease; decision support only, not a diagnosis."
)

ImageLike = Image.Image | LoadedImage | str | os.PathLike | bytes


@dataclass
class LabelScore:
    """One label's zero-shot result: ``score = sigmoid(logit)``."""

    label: str
    score: float
    logit: float


@dataclass
class Classification:
    """Labels ranked by score (highest first) for one image. Not probabilities of disease."""

    label_set: str | None  # a bundled set's name, or None for labels given by the caller
    embeddings: str  # "bundled label embeddings" or "text tower (<precision>)"
    precision: str
    ranked: list[LabelScore]
    seconds: float
    note: str = NOT_PROBABILITIES
    image: dict = field(default_factory=dict)  # non-identifying facts: format, size, key prefix

    def to_json(self) -> dict:
        return {
            "label_set": self.label_set,
            "embeddings": self.embeddings,
            "precision": self.precision,
            "results": [vars(r) for r in self.ranked],
            "seconds": self.seconds,
            "image": self.image,
            "note": self.note,
        }


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled between batches; nothing partial was returned")


class MedSigLIP:
    """The bundle's MedSigLIP towers through onnxruntime (no torch, no transformers).

    Args:
        bundle: a :class:`Bundle` or its directory.
        settings: precision and threads (:class:`~edge.medsiglip.settings.MedSigLIPSettings`;
            a precision of None means the component's default); ``**overrides`` apply over them.
        towers: which towers this instance may load. The vision session opens at construction
            (so a bad file fails early); the text session opens on first use.

    Raises:
        InputError / IntegrityError: no medsiglip component, no such precision, a damaged file.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        settings: MedSigLIPSettings | None = None,
        *,
        towers: Sequence[str] = ("vision", "text"),
        **overrides,
    ):
        self.settings = apply_overrides(settings or MedSigLIPSettings(), **overrides)
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        comp = self.bundle.component(COMPONENT)
        self.precision = self.settings.precision or comp.get("default_precision", "int8")
        have = comp.get("precisions", [])
        if self.precision not in have:
            raise InputError(
                f"bundle {self.bundle.root} has no {self.precision} MedSigLIP towers (it has: "
                f"{', '.join(have) or 'none'}); pick one of those or re-export with --precision {self.precision}"
            )
        unknown = set(towers) - set(OUTPUTS)
        if unknown or not towers:
            raise UsageError(f"towers must be some of vision, text (got {', '.join(towers) or 'none'})")
        self.threads = self.settings.threads
        # OpenVINO or onnxruntime for the vision tower (same embedding space: same file and precision)
        recorded = onnx_towers.recorded_openvino_cosine(comp, self.precision)
        self.engine = onnx_towers.vision_engine(self.precision, self.settings.engine, recorded)
        self.towers = tuple(towers)
        self.dim = int(comp["embedding_dim"])
        self.logit_scale = float(comp["logit_scale"])
        self.logit_bias = float(comp["logit_bias"])
        self.label_sets: dict[str, dict] = comp.get("label_sets", {})
        self.spec, self.tokenizer = onnx_towers.load_preprocessing(self.bundle)
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()
        self._labels: dict[str, np.ndarray] | None = None
        if "vision" in self.towers:
            self._session("vision")

    @property
    def fingerprint(self) -> str:
        """Identifies the embedding space: the component's exact files + the tower precision."""
        return f"{self.bundle.fingerprint(COMPONENT)}-{self.precision}"

    @property
    def open_towers(self) -> set[str]:
        """The towers whose onnxruntime session is open now (the text tower opens on first use)."""
        return set(self._sessions)

    def _session(self, tower: str):
        if tower not in self.towers:
            raise UsageError(f"this MedSigLIP instance was opened without its {tower} tower")
        with self._lock:
            if tower not in self._sessions:
                t0 = time.perf_counter()
                engine = self.engine if tower == "vision" else "onnxruntime"
                sess = onnx_towers.load_session(
                    self.bundle, tower, self.precision, threads=self.threads, engine=engine
                )
                if tower == "vision":
                    self.engine = (
                        "openvino" if isinstance(sess, onnx_towers.OpenVINOSession) else "onnxruntime"
                    )
                self._sessions[tower] = sess
                log.info(
                    "medsiglip %s-%s session ready in %.2fs (%s, threads=%s)",
                    tower,
                    self.precision,
                    time.perf_counter() - t0,
                    engine if tower != "vision" else self.engine,
                    self.threads,
                )
            return self._sessions[tower]

    # -- images ------------------------------------------------------------------------------------

    def default_batch(self) -> int:
        """Vision batch size: 1 for dynamic int8 (batch-independent embeddings), else 8."""
        return 1 if self.precision == "int8" else 8

    def pixels(self, image: ImageLike) -> np.ndarray:
        """One image (PIL, LoadedImage, path or bytes) → ``[3, H, W]`` float32 per the bundle's spec."""
        if isinstance(image, LoadedImage):
            image = image.image
        elif not isinstance(image, Image.Image):
            image = load_image(image).image
        return image_to_pixels(image, self.spec)

    def embed_pixels(self, pixels: np.ndarray, *, batch_size: int | None = None, cancel=None) -> np.ndarray:
        """``pixel_values`` ``[N, 3, H, W]`` → normalized embeddings ``[N, D]`` float32."""
        sess = self._session("vision")
        bs = batch_size or self.default_batch()
        if bs < 1:
            raise UsageError(f"batch_size must be at least 1 (got {bs})")
        out = []
        for i in range(0, len(pixels), bs):
            _check_cancel(cancel)
            out.append(sess.run([OUTPUTS["vision"]], {onnx_towers.TOWERS["vision"]: pixels[i : i + bs]})[0])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    def embed_images(
        self,
        images: Sequence[ImageLike],
        *,
        batch_size: int | None = None,
        cancel: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Images → L2-normalized embeddings ``[N, D]`` float32, in batches.

        Args:
            images: PIL images, :class:`LoadedImage`, paths or file bytes (PNG/JPEG/DICOM).
            batch_size: images per onnxruntime run (default :meth:`default_batch`).
            cancel: set it from another thread to stop between batches.
            progress: ``progress(done, total)`` after each batch.
        Raises:
            InputError / TooLargeError: an unreadable or oversized image.
            Cancelled: ``cancel`` was set.
        """
        bs = batch_size or self.default_batch()
        if bs < 1:
            raise UsageError(f"batch_size must be at least 1 (got {bs})")
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(images), bs):
            _check_cancel(cancel)
            px = np.stack([self.pixels(im) for im in images[i : i + bs]])
            out.append(self.embed_pixels(px, batch_size=bs))
            if progress:
                progress(min(i + bs, len(images)), len(images))
        log.info("embedded %d images in %.2fs (batch %d)", len(images), time.perf_counter() - t0, bs)
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    # -- texts -------------------------------------------------------------------------------------

    def embed_texts(
        self, texts: Sequence[str], *, batch_size: int | None = None, cancel: threading.Event | None = None
    ) -> np.ndarray:
        """Texts → L2-normalized embeddings ``[N, D]`` float32 (opens the text tower on first use).

        ``batch_size`` defaults to 1 for int8 (batch-independent results, see the module note), else 16.
        """
        if isinstance(texts, str):
            raise UsageError("embed_texts takes a list of texts, not one string")
        batch_size = batch_size or (1 if self.precision == "int8" else 16)
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1 (got {batch_size})")
        sess = self._session("text")
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(texts), batch_size):
            _check_cancel(cancel)
            ids = self.tokenizer.batch(list(texts[i : i + batch_size]))  # [n, 64] int64
            out.append(sess.run([OUTPUTS["text"]], {onnx_towers.TOWERS["text"]: ids})[0])
        log.info("embedded %d texts in %.2fs", len(texts), time.perf_counter() - t0)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    # -- zero-shot ---------------------------------------------------------------------------------

    def label_embeddings(self, label_set: str) -> tuple[list[str], np.ndarray]:
        """A bundled label set: its labels and their stored embeddings ``[L, D]``."""
        if label_set not in self.label_sets:
            raise InputError(
                f"unknown label set {label_set!r}; this bundle has: {', '.join(self.label_sets) or 'none'} "
                '(or give your own with --labels "a,b,c")'
            )
        if self._labels is None:
            self._labels = onnx_towers.load_label_embeddings(self.bundle)
        return list(self.label_sets[label_set]["labels"]), self._labels[label_set]

    def scores(self, image_emb: np.ndarray, label_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SigLIP zero-shot: ``logits = exp(scale) * img @ txt.T + bias``; returns (logits, sigmoid)."""
        logits = np.exp(self.logit_scale) * (image_emb @ label_emb.T) + self.logit_bias
        return logits, 1.0 / (1.0 + np.exp(-logits))

    def classify(
        self,
        image: ImageLike,
        *,
        labels: Sequence[str] | None = None,
        label_set: str | None = None,
    ) -> Classification:
        """Score one image against labels; ranked highest first.

        Args:
            labels: free-text labels, embedded with the text tower (e.g. "pleural effusion").
            label_set: a bundled set ("cxr", "derm"): its precomputed embeddings, no text tower.
                With neither given, "cxr".
        Raises:
            UsageError: both or an empty label list given.
            InputError: an unknown label set or an unreadable image.
        """
        if labels is not None and label_set is not None:
            raise UsageError("give either labels or a label set, not both")
        t0 = time.perf_counter()
        if labels is not None:
            names = [s.strip() for s in labels if s and s.strip()]
            if not names:
                raise UsageError('give at least one label, e.g. --labels "pneumothorax,no acute findings"')
            label_emb = self.embed_texts(names)
            how = f"text tower ({self.precision})"
        else:
            label_set = label_set or "cxr"
            names, label_emb = self.label_embeddings(label_set)
            how = "bundled label embeddings"
        loaded = image if isinstance(image, LoadedImage | Image.Image) else load_image(image)
        facts = {}
        if isinstance(loaded, LoadedImage):
            facts = {"format": loaded.format, "size": list(loaded.source_size), "key": loaded.key[:12]}
        emb = self.embed_images([loaded], batch_size=1)
        logits, probs = self.scores(emb, label_emb)
        order = np.argsort(-logits[0], kind="stable")
        ranked = [LabelScore(names[i], float(probs[0, i]), float(logits[0, i])) for i in order]
        return Classification(label_set, how, self.precision, ranked, time.perf_counter() - t0, image=facts)
