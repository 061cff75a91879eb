"""``import medgemma``: put a GGUF made elsewhere (llama.cpp releases, Ollama, LM Studio) into a bundle.

The file is checked (a Gemma 3 text model; an mmproj whose projection width is the text model's
embedding width), copied or hard-linked into the bundle through :class:`edge.bundle.write.BundleWriter`
(atomic), hashed, and recorded as *imported*: no fidelity figures, provenance unknown unless the
user says. The prompt spec is the GGUF's own chat template when it has one, else the registry's.
No torch: this runs on a device too.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edge.bundle import registry
from edge.bundle.gguf_header import GGUFHeader, read_header
from edge.bundle.write import BundleWriter
from edge.errors import InputError, IntegrityError

log = logging.getLogger(__name__)

COMPONENT = "medgemma"
TEXT_ARCH = "gemma3"
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 7: "Q8_0", 15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@dataclass
class ImportResult:
    bundle: Path
    files: list[dict]
    seconds: float


def _header(path: Path, what: str) -> GGUFHeader:
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file; give the {what} GGUF")
    try:
        return read_header(path)
    except IntegrityError as exc:
        raise InputError(str(exc)) from None


def check_text(path: Path) -> GGUFHeader:
    """InputError unless ``path`` is a complete Gemma 3 text GGUF."""
    h = _header(path, "text model")
    if h.architecture != TEXT_ARCH:
        raise InputError(
            f"{path} is a {h.architecture or 'unknown'} GGUF, not a Gemma 3 model (general.architecture "
            f"{TEXT_ARCH}); MedGemma and Gemma 3 GGUFs only"
        )
    if not h.vocab_size:
        raise InputError(f"{path} has no tokenizer vocabulary; it can't be prompted")
    return h


def check_mmproj(path: Path, text: GGUFHeader) -> GGUFHeader:
    """InputError unless ``path`` is a Gemma 3 vision projector sized for ``text``."""
    h = _header(path, "mmproj")
    if h.architecture != "clip" or not h.get("clip.has_vision_encoder"):
        raise InputError(f"{path} is not a vision projector (mmproj) GGUF (architecture {h.architecture!r})")
    ptype = h.get("clip.projector_type")
    if ptype != "gemma3":
        raise InputError(
            f"{path} is a {ptype!r} projector, not Gemma 3's; it won't work with {text.path.name}"
        )
    proj, n_embd = h.get("clip.vision.projection_dim"), text.arch_key("embedding_length")
    if proj != n_embd:
        raise InputError(
            f"{path} projects images to width {proj} but {text.path.name} has embedding width {n_embd}; "
            "they are from different models"
        )
    return h


def _quant(h: GGUFHeader) -> str:
    ft = h.get("general.file_type")
    return FILE_TYPES.get(ft, f"type{ft}") if ft is not None else "unknown"


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError as exc:
            log.warning("can't hard-link %s (%s); copying", src, exc.strerror)
    shutil.copyfile(src, dst)


def import_gguf(
    text: str | os.PathLike,
    *,
    bundle: str | os.PathLike,
    mmproj: str | os.PathLike | None = None,
    model_id: str = "medgemma-4b-it",
    source: str | None = None,
    link: bool = False,
    progress=None,
) -> ImportResult:
    """Add ``text`` (and ``mmproj``) as the medgemma component of ``bundle``.

    Args:
        model_id: registry entry for licence, prompt format and defaults (e.g. ``gemma3-270m``).
        source: free text on where the file came from (recorded; otherwise "unknown").
        link: hard-link instead of copying (same filesystem only; falls back to a copy).

    Raises:
        InputError: not a Gemma 3 GGUF, truncated, or an mmproj of another width.
        UsageError: unknown ``model_id``.
    """
    t0 = time.perf_counter()
    spec = registry.get(model_id)
    text_path = Path(text)
    th = check_text(text_path)
    mh = check_mmproj(Path(mmproj), th) if mmproj else None
    prompt = spec.prompt_spec()
    if tpl := th.get("tokenizer.chat_template"):
        prompt["chat_template"] = tpl
        prompt["chat_template_from"] = "gguf"
    else:
        prompt["chat_template_from"] = f"registry:{spec.id}"
    with BundleWriter(bundle, COMPONENT, progress=progress) as w:
        files = []
        for role, h in (("text", th), ("mmproj", mh)):
            if h is None:
                continue
            q = _quant(h) if role == "text" else _quant(h).lower()
            rel = f"{COMPONENT}/{role}-{q}.gguf"
            _place(h.path, w.path(rel), link)
            size = h.path.stat().st_size
            files.append(
                w.add_file(
                    rel,
                    role=role,
                    quant=q,
                    gguf=h.facts(),
                    ram_bytes=int(size * 1.2) + (64 << 20),
                    ram_basis="file + 20% + 64 MiB (imported: no architecture-specific estimate)",
                    imported_from=h.path.name,
                )
            )
        w.component.update(
            provenance="imported",
            source={
                "model_id": spec.id,
                "hf_id": spec.hf_id,
                "description": source or f"imported GGUF {text_path.name} (provenance unknown)",
                "synthetic": False,
                "general_name": th.get("general.name"),
            },
            licence=spec.licence,
            prompt=prompt,
            defaults=spec.defaults,
            model={
                "architecture": spec.architecture,
                "n_embd": th.arch_key("embedding_length"),
                "n_layers": th.arch_key("block_count"),
                "n_ctx_train": th.arch_key("context_length"),
            },
            fidelity=None,
            requirements={f["path"]: f["ram_bytes"] for f in files},
            modifications="None by this tool: the GGUF file(s) were imported as given.",
        )
    seconds = time.perf_counter() - t0
    log.info("imported %s into %s in %.1fs", text_path, bundle, seconds)
    return ImportResult(Path(bundle), files, seconds)
