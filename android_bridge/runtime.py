"""The models a bridge serves and their states.

Two slots, one per model, each in one of the states ``uninitialized``, ``loading``, ``ready``,
``generating`` (MedGemma while it answers) or ``error`` (the last load failed; the message is
kept for ``health``). A slot is loaded from the bundle on request (the ``load`` op, or the
server's background preload) or handed an already-open model (tests, embedding apps).

MedSigLIP and the similar-case index are reached through a small interface, so the bridge does
not depend on how they are built:

* encoder (:class:`edge.medsiglip.model.MedSigLIP`): ``embed_images(images, cancel=, progress=) ->
  ndarray [N, D]``, ``embed_texts(texts, cancel=) -> ndarray [N, D]`` (L2-normalized rows),
  ``classify(image, labels=None, label_set=None)`` (ranked labels and scores).
* index (:class:`edge.cases.CaseIndex`): ``search_image(image, encoder=, k=)`` and
  ``search_text(text, encoder=, k=)`` → entries with ``id``, ``score``, ``content``, ``metadata``.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from android_bridge.protocol import ProtocolError
from edge.bundle.manifest import Bundle, open_bundle
from edge.errors import UsageError
from edge.medgemma.settings import MedGemmaSettings
from edge.medsiglip.settings import MedSigLIPSettings
from edge.settings import from_mapping

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
Opener = Callable[[str, Bundle, Any, "Progress | None"], Any]
RETRY_AFTER_S = 1.0  # what a client is told to wait while a model loads


class Slot:
    """One model's place in the runtime: its state, the model object, the last load error."""

    def __init__(self, name: str, model: Any = None):
        self.name = name
        self.model = model
        self.owned = model is None  # a model handed in is closed by whoever opened it
        self.state = "ready" if model is not None else "uninitialized"
        self.error: str | None = None
        self.lock = threading.Lock()  # held while loading or unloading

    def describe(self) -> dict:
        state = self.state
        if state == "ready" and getattr(self.model, "busy", False):
            state = "generating"
        out: dict[str, Any] = {"state": state}
        if self.error:
            out["error"] = self.error
        if state in ("ready", "generating"):
            info = getattr(self.model, "info", None)
            out["info"] = info if isinstance(info, dict) else describe_encoder(self.model)
        return out


class Runtime:
    """The loaded models of one bridge.

    Args:
        bundle: the bundle directory (MedGemma and, when present, MedSigLIP).
        medsiglip_bundle: a separate bundle for MedSigLIP (default: ``bundle``).
        index_dir: the similar-case index directory, if any.
        medgemma / encoder / index: already-open objects to serve instead of loading them.
        medgemma_settings / medsiglip_settings: what to load with; a ``load`` op's options are
            checked against the same dataclasses (:meth:`settings_for`) and applied over these.
        image_cache: MedGemma's :class:`~edge.media.image_cache.ImageCache` (default: its own).
        opener: ``opener(name, bundle, settings, progress) -> model`` (default :meth:`open_model`);
            an embedding app or a test wraps it to watch or hold a load.
        studies: the study store (edge.studies.store.StudyStore) that received DICOM goes to and
            ``{"study": ...}`` image sources come from; None: none kept.
        reports: the report store (edge.reports.store.ReportStore); None: reports aren't kept.
        delivery: where ``send_report`` delivers (android_bridge.delivery.DeliverySettings).
    """

    def __init__(
        self,
        bundle: str | Path | None = None,
        *,
        medsiglip_bundle: str | Path | None = None,
        index_dir: str | Path | None = None,
        medgemma: Any = None,
        encoder: Any = None,
        index: Any = None,
        medgemma_settings: MedGemmaSettings | None = None,
        medsiglip_settings: MedSigLIPSettings | None = None,
        image_cache: Any = None,
        opener: Opener | None = None,
        studies: Any = None,
        reports: Any = None,
        delivery: Any = None,
    ):
        self.bundle_path = Path(bundle) if bundle else None
        self.medsiglip_path = Path(medsiglip_bundle) if medsiglip_bundle else self.bundle_path
        self.index_dir = Path(index_dir) if index_dir else None
        self.index = index
        self.settings: dict[str, Any] = {
            "medgemma": medgemma_settings or MedGemmaSettings(),
            "medsiglip": medsiglip_settings or MedSigLIPSettings(),
        }
        self.image_cache = image_cache
        self.opener: Opener = opener or self.open_model
        self.slots = {"medgemma": Slot("medgemma", medgemma), "medsiglip": Slot("medsiglip", encoder)}
        self.studies = studies  # edge.studies.store.StudyStore: received DICOM (None: none kept)
        self.reports = reports  # edge.reports.store.ReportStore: saved and signed reports
        self.delivery = delivery  # android_bridge.delivery's settings: where send_report delivers

    # -- what is available -------------------------------------------------------------------

    def _bundle(self, name: str) -> Bundle | None:
        path = self.bundle_path if name == "medgemma" else self.medsiglip_path
        return open_bundle(path) if path else None

    def available(self, name: str) -> bool:
        """Whether ``name`` is loaded or its bundle has the component."""
        if self.slots[name].model is not None:
            return True
        try:
            b = self._bundle(name)
        except Exception:  # a missing or broken bundle shows up when loading, with its message
            return False
        return b is not None and name in b.components

    def states(self) -> dict:
        return {name: slot.describe() for name, slot in self.slots.items()}

    # -- load / unload ---------------------------------------------------------------------------

    def settings_for(self, name: str, options: dict | None = None):
        """``name``'s settings with a client's ``options`` applied: only the fields a client may set,
        each checked against its declaration.

        Raises:
            ProtocolError(invalid_request): an unknown option, a wrong type, a value out of range.
        """
        cls = type(self.settings[name])
        try:
            return from_mapping(
                cls, options or {}, base=self.settings[name], remote=True, where=f"load option for {name}: "
            )
        except UsageError as exc:
            raise ProtocolError("invalid_request", str(exc)) from None

    def load(self, name: str, *, options: dict | None = None, progress: Progress | None = None) -> dict:
        """Load ``name`` from the bundle (no-op when ready). Returns its ``describe()``.

        Raises:
            ProtocolError(loading): another request is loading it now.
            ProtocolError(invalid_request): ``options`` that :meth:`settings_for` refuses.
            EdgeError: the bundle lacks it, a file fails verification, not enough memory.
        """
        settings = self.settings_for(name, options)
        slot = self.slots[name]
        if not slot.lock.acquire(blocking=False):
            raise ProtocolError("loading", f"{name} is loading", retry_after=RETRY_AFTER_S)
        try:
            if slot.model is not None:
                return slot.describe()
            slot.state, slot.error = "loading", None
            t0 = time.perf_counter()
            try:
                slot.model = self._open(name, settings, progress)
            except BaseException as exc:
                slot.state, slot.error = "error", str(exc) or type(exc).__name__
                raise
            slot.owned, slot.state = True, "ready"
            log.info("bridge: %s loaded in %.2fs", name, time.perf_counter() - t0)
            return slot.describe()
        finally:
            slot.lock.release()

    def _open(self, name: str, settings: Any, progress: Progress | None) -> Any:
        bundle = self._bundle(name)
        if bundle is None:
            raise ProtocolError("invalid_request", "no bundle configured: start the runtime with -b BUNDLE")
        bundle.component(name)  # InputError naming the bundle when absent
        return self.opener(name, bundle, settings, progress)

    def open_model(self, name: str, bundle: Bundle, settings: Any, progress: Progress | None = None) -> Any:
        """Verify ``name``'s files in ``bundle`` (reporting ``progress("load", done, total)``) and
        open it with ``settings``."""

        def verify_progress(done: int, total: int) -> None:
            if progress:
                progress("load", done, total)

        if progress:
            total = sum(f["bytes"] for f in bundle.files(name))
            progress("load", 0, total)
        bundle.verify(component=name, progress=verify_progress).raise_for_failure()
        if name == "medgemma":
            from edge.medgemma.model import MedGemma

            model = MedGemma(bundle, settings, image_cache=self.image_cache)
        else:
            model = open_encoder(bundle, settings)
        if progress:
            progress("load", total, total)
        return model

    def unload(self, name: str) -> dict:
        """Close ``name``'s model (if this runtime opened it) and forget it.

        Raises:
            ProtocolError(loading | busy): it is loading, or generating.
        """
        slot = self.slots[name]
        if not slot.lock.acquire(blocking=False):
            raise ProtocolError("loading", f"{name} is loading", retry_after=RETRY_AFTER_S)
        try:
            model = slot.model
            if getattr(model, "busy", False):
                raise ProtocolError(
                    "busy", f"{name} is generating; cancel it first", retry_after=RETRY_AFTER_S
                )
            slot.model, slot.state, slot.error = None, "uninitialized", None
            if model is not None and slot.owned and hasattr(model, "close"):
                model.close()
            return slot.describe()
        finally:
            slot.lock.release()

    def require(self, name: str) -> Any:
        """The ready model ``name``, or ProtocolError(loading | not_loaded) saying what to do."""
        slot = self.slots[name]
        model = slot.model
        if model is not None:
            return model
        if slot.state == "loading":
            raise ProtocolError("loading", f"{name} is loading; retry shortly", retry_after=RETRY_AFTER_S)
        why = f" (last load failed: {slot.error})" if slot.state == "error" else ""
        raise ProtocolError("not_loaded", f"{name} is not loaded{why}; send a load op first")

    def require_index(self) -> Any:
        """The similar-case index, opening ``index_dir`` on first use."""
        if self.index is None:
            if self.index_dir is None:
                raise ProtocolError("not_loaded", "no similar-case index: start the runtime with --index DIR")
            self.index = open_index(self.index_dir, self.slots["medsiglip"].model)
        return self.index

    def close(self) -> None:
        """Close every model this runtime opened."""
        for slot in self.slots.values():
            with slot.lock:
                model, slot.model, slot.state = slot.model, None, "uninitialized"
                if model is not None and slot.owned and hasattr(model, "close"):
                    model.close()


# -- MedSigLIP and the similar-case index, as the bridge reaches them ----------------------------
# When a build lacks one of those modules, opening fails with a ``not_loaded`` error naming it.


def _module(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ProtocolError("not_loaded", f"{what} is not available in this build ({name}: {exc})") from None


def open_encoder(bundle: Bundle, settings: MedSigLIPSettings | None = None) -> Any:
    """The bundle's MedSigLIP (vision and text towers).

    Raises:
        ProtocolError(not_loaded): edge.medsiglip.model is not in this build.
        InputError / IntegrityError: no medsiglip component, no such precision, a damaged file.
    """
    siglip = _module("edge.medsiglip.model", "MedSigLIP")
    return siglip.MedSigLIP(bundle, settings)


def describe_encoder(enc: Any) -> dict:
    """Non-identifying facts about a loaded encoder, for ``health`` and ``load``."""
    info = getattr(enc, "info", None)
    if isinstance(info, dict):
        return info
    comp = enc.bundle.component("medsiglip") if hasattr(enc, "bundle") else {}
    return {
        "bundle": str(getattr(getattr(enc, "bundle", None), "root", "")),
        "precision": getattr(enc, "precision", None),
        "dim": getattr(enc, "dim", None),
        "fingerprint": getattr(enc, "fingerprint", None),
        "label_sets": sorted(getattr(enc, "label_sets", {}) or {}),
        "synthetic": bool(comp.get("source", {}).get("synthetic")),
    }


def open_index(directory: Path, encoder: Any = None) -> Any:
    """The similar-case index in ``directory`` (checked against ``encoder``'s fingerprint).

    Raises:
        ProtocolError(not_loaded): edge.cases.index is not in this build.
        InputError: no index there, or one built with another encoder.
    """
    cases = _module("edge.cases.index", "the similar-case index")
    return cases.CaseIndex.open(directory, encoder=encoder)


def classification(out: Any) -> dict:
    """edge.medsiglip.model's Classification (ranked) → the ``classify`` result."""
    if isinstance(out, dict):
        return out
    ranked = list(out.ranked)
    return {
        "label_set": out.label_set,
        "labels": [r.label for r in ranked],
        "scores": [float(r.score) for r in ranked],
        "logits": [float(r.logit) for r in ranked],
        "precision": out.precision,
        "note": out.note,
    }
