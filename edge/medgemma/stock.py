"""Load a bundle's model files only after they verify (minimal; the full runtime is edge.medgemma.model).

Hashing a 2.5 GB GGUF at every start is slow on a phone, so loading trusts the verify stamp
(keyed by size and mtime) that an earlier successful verify left, and re-hashes a file whose size
or mtime changed. A file that doesn't match its manifest is refused with IntegrityError naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge.bundle.manifest import Bundle, open_bundle


def load_checked(
    bundle: Bundle | str | os.PathLike,
    component: str = "medgemma",
    *,
    roles: set[str] | None = None,
    paths: set[str] | None = None,
) -> dict[str, Path]:
    """Verify ``component``'s files (or only those with ``roles``/``paths``), trusting the stamp.

    Returns:
        {bundle-relative path: absolute path} of the verified files.

    Raises:
        InputError: no such bundle or component.
        IntegrityError: a file is missing, resized, re-hashes differently or has a bad header;
            the message names the file.
    """
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    b.component(component)  # InputError naming the bundle if absent
    report = b.verify(component=component, roles=roles, paths=paths, trust_stamp=True)
    report.raise_for_failure()
    return {f.path: b.path(f.path) for f in report.files}


def open_medgemma(
    bundle: Bundle | str | os.PathLike,
    *,
    quant: str | None = None,
    mmproj: str | None = None,
    n_ctx: int = 2048,
    threads: int | None = None,
    verbose: bool = False,
):
    """A ``llama_cpp.Llama`` over a verified text GGUF (``quant``, default the first listed), with
    an ``MTMDChatHandler`` for images when the bundle has an mmproj (``mmproj`` type, default the
    first listed)."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from edge.medgemma.llama_binding import load_llama

    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    text = b.file("medgemma", "text", **({"quant": quant} if quant else {}))
    mm = None
    if mmproj or any(f["role"] == "mmproj" for f in b.files("medgemma")):
        mm = b.file("medgemma", "mmproj", **({"quant": mmproj} if mmproj else {}))
    checked = load_checked(b, "medgemma", paths={text["path"]} | ({mm["path"]} if mm else set()))
    paths = [checked[text["path"]]] + ([checked[mm["path"]]] if mm else [])
    handler = MTMDChatHandler(clip_model_path=str(paths[1]), verbose=verbose) if mm else None
    return load_llama(  # llama-cpp-python's defaults (repacking on), as this CPU can take them
        paths[0],
        repack=True,
        chat_handler=handler,
        n_ctx=n_ctx,
        n_threads=threads,
        verbose=verbose,
        seed=0,
    )
