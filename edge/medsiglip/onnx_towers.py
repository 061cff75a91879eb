"""MedSigLIP on the device through onnxruntime, the vision tower optionally through OpenVINO
(minimal: sessions, embeddings, zero-shot).

Everything here reads the bundle only: the ONNX towers, ``preprocess.json``, the SentencePiece
model and the precomputed label embeddings. No torch, no transformers, no onnx package.
Each tower file is verified (size, hash or a valid stamp, ONNX header, external data) before
onnxruntime maps it, so a tampered, truncated or missing file fails with its name.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import threading
import zipfile
from dataclasses import dataclass

import numpy as np

from edge.bundle.manifest import Bundle, open_bundle
from edge.device import accel
from edge.errors import EdgeError, InputError, UsageError
from edge.files import check_regular, read_bytes, read_json
from edge.medsiglip.preprocess import ImageSpec, SiglipTokenizer, TextSpec, images_to_batch

COMPONENT = "medsiglip"
TOWERS = {"vision": "pixel_values", "text": "input_ids"}
log = logging.getLogger(__name__)
MAX_LABEL_EMBEDDINGS_BYTES = 256 << 20  # label-embeddings.npz, read whole


def _bundle(bundle: Bundle | str | os.PathLike) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else open_bundle(bundle)


def load_session(
    bundle: Bundle | str | os.PathLike,
    tower: str,
    precision: str | None = None,
    *,
    threads: int | None = None,
    engine: str = "onnxruntime",
):
    """Verify one tower's files (the .onnx and its external data) and open its session: an
    onnxruntime session, or for the vision tower with ``engine`` "openvino" an
    :class:`OpenVINOSession` (falling back to onnxruntime with one log line when OpenVINO is
    missing or can't compile the file).

    Args:
        bundle: a bundle or its directory.
        tower: "vision" or "text".
        precision: "int8", "int8-static", "fp16" or "fp32"; None picks the component's default.
        threads: onnxruntime intra-op threads (None: onnxruntime's default).

    Raises:
        InputError: no such tower/precision in the bundle.
        IntegrityError: a file is missing, truncated or altered (the message names it).
    """

    if tower not in TOWERS:
        raise InputError(f"unknown MedSigLIP tower {tower!r}; choose vision or text")
    b = _bundle(bundle)
    comp = b.component(COMPONENT)
    precision = precision or comp.get("default_precision", "int8")
    entry = b.file(COMPONENT, tower, precision=precision)
    paths = {entry["path"]} | {f["path"] for f in comp["files"] if f.get("data_of") == entry["path"]}
    b.verify(component=COMPONENT, paths=paths).raise_for_failure()
    if tower == "vision" and engine == "openvino":
        hint = "bf16" if accel.cpu_class() == "bf16" else "f32"
        try:
            return OpenVINOSession(accel.open_runner(b.path(entry), "openvino", threads=threads, hint=hint))
        except (EdgeError, ImportError, OSError, RuntimeError) as exc:
            why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            log.warning(
                "medsiglip: OpenVINO can't run %s here (%s); running it on onnxruntime", entry["path"], why
            )
    return accel.ort_session(b.path(entry), threads=threads)


# what OpenVINO runs of MedSigLIP: fp32 towers, computed in bf16 where the CPU has it natively.
# Measured (benchmarks/bench_encoders.py, full-size tower, 8 images at 448 px, 2 threads of an AMX
# Xeon): 0.84 s/image, cosine 0.99992 vs transformers, batches exact; onnxruntime's dynamic int8
# 1.39 s at 0.99869, static int8 1.41 s at 0.99906. int8/fp16 towers stay on onnxruntime.
OPENVINO_PRECISIONS = ("fp32",)
ENGINES = ("auto", "onnxruntime", "openvino")


def vision_engine(precision: str, engine: str = "auto", recorded: float | None = None) -> str:
    """The runtime that runs the vision tower at ``precision``: ``engine`` when it names one,
    else (auto) OpenVINO for an fp32 tower whose OpenVINO cosine the export ``recorded`` at or
    above :data:`edge.device.encoders.FIDELITY_BAR`, where the CPU computes bf16 natively
    (AVX512-BF16 or AMX) and OpenVINO is installed; onnxruntime otherwise."""
    from edge.device.encoders import FIDELITY_BAR

    if engine not in ENGINES:
        raise UsageError(f"MedSigLIP engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    if engine == "openvino" and precision not in OPENVINO_PRECISIONS:
        raise UsageError(
            f"OpenVINO runs MedSigLIP's {', '.join(OPENVINO_PRECISIONS)} towers, not {precision}; "
            "pick --precision fp32 or the onnxruntime engine"
        )
    if engine != "auto":
        return engine
    if (
        precision in OPENVINO_PRECISIONS
        and recorded is not None
        and recorded >= FIDELITY_BAR
        and accel.cpu_class() == "bf16"
        and importlib.util.find_spec("openvino") is not None
    ):
        return "openvino"
    return "onnxruntime"


def recorded_openvino_cosine(comp: dict, precision: str) -> float | None:
    """The min cosine the export measured for ``precision``'s vision tower on OpenVINO (None: not
    measured, or a manifest that doesn't say it as a number)."""
    fidelity = comp.get("fidelity")
    per = fidelity.get(precision) if isinstance(fidelity, dict) else None
    ov = per.get("vision_openvino") if isinstance(per, dict) else None
    value = ov.get("cosine_min") if isinstance(ov, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class OpenVINOSession:
    """An OpenVINO-compiled tower behind onnxruntime's ``run(output_names, feeds)`` call (one
    infer request, so calls are serialized)."""

    def __init__(self, runner: accel.Runner):
        self.runner, self._lock = runner, threading.Lock()

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            outs = dict(zip(self.runner.outputs, self.runner.run(feeds), strict=True))
        return [outs[n] for n in names] if names else list(outs.values())

    def get_providers(self) -> list[str]:
        return [f"OpenVINO/{self.runner.device}"]


def load_preprocessing(bundle: Bundle | str | os.PathLike) -> tuple[ImageSpec, SiglipTokenizer]:
    """The image spec and tokenizer the bundle's towers expect (verified first).

    ``preprocess.json`` is read through :func:`edge.files.read_json` (a regular file, at most
    :data:`edge.files.MAX_JSON_BYTES`, 8 MiB); the SentencePiece model is only checked to be a
    regular file (sentencepiece reads it itself).
    """
    b = _bundle(bundle)
    b.verify(component=COMPONENT, roles={"preprocess", "tokenizer"}).raise_for_failure()
    spec = read_json(b.path(b.file(COMPONENT, "preprocess")), what="MedSigLIP preprocess spec")
    try:
        text, image = TextSpec.from_json(spec["text"]), ImageSpec.from_json(spec["image"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(
            f"bundle {b.root}: the MedSigLIP preprocess spec is malformed ({type(exc).__name__}: {exc}); "
            "re-export the bundle"
        ) from None
    tok_path = b.path(b.file(COMPONENT, "tokenizer"))
    check_regular(tok_path, "MedSigLIP tokenizer")
    try:
        tok = SiglipTokenizer(tok_path, text)
    except (OSError, RuntimeError, KeyError) as exc:  # sentencepiece can't load it, no eos token
        raise InputError(
            f"MedSigLIP tokenizer {tok_path} can't be loaded ({exc}); re-export the bundle"
        ) from None
    return image, tok


def load_label_embeddings(bundle: Bundle | str | os.PathLike) -> dict[str, np.ndarray]:
    """The precomputed, L2-normalized label embeddings: set name -> ``[labels, D]``.

    The ``.npz`` is read through :func:`edge.files.read_bytes` (at most
    :data:`MAX_LABEL_EMBEDDINGS_BYTES`, 256 MiB).
    """
    b = _bundle(bundle)
    b.verify(component=COMPONENT, roles={"label-embeddings"}).raise_for_failure()
    path = b.path(b.file(COMPONENT, "label-embeddings"))
    data = read_bytes(path, limit=MAX_LABEL_EMBEDDINGS_BYTES, what="label embeddings")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"label embeddings {path} can't be read ({exc}); re-export the bundle") from None


@dataclass
class ZeroShot:
    """Scores of one image against a label set (not probabilities of disease)."""

    label_set: str
    labels: list[str]
    scores: list[float]  # sigmoid(logits)
    logits: list[float]

    @property
    def top(self) -> tuple[str, float]:
        i = int(np.argmax(self.scores))
        return self.labels[i], self.scores[i]


def zero_shot(
    bundle: Bundle | str | os.PathLike,
    image,
    *,
    label_set: str = "cxr",
    precision: str | None = None,
    threads: int | None = None,
) -> ZeroShot:
    """Score a PIL image against a default label set with the vision tower alone."""
    b = _bundle(bundle)
    comp = b.component(COMPONENT)
    sets = comp.get("label_sets", {})
    if label_set not in sets:
        raise InputError(f"unknown label set {label_set!r}; this bundle has: {', '.join(sets) or 'none'}")
    spec, _tok = load_preprocessing(b)
    sess = load_session(b, "vision", precision, threads=threads)
    emb = sess.run(["image_embeds_normalized"], {TOWERS["vision"]: images_to_batch([image], spec)})[0]
    labels = load_label_embeddings(b)[label_set]
    logits = np.exp(comp["logit_scale"]) * emb @ labels.T + comp["logit_bias"]
    scores = 1.0 / (1.0 + np.exp(-logits[0]))
    return ZeroShot(
        label_set, list(sets[label_set]["labels"]), [float(s) for s in scores], [float(x) for x in logits[0]]
    )
