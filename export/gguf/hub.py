"""A checkpoint named by its Hugging Face id, resolved from the local cache only.

``export medgemma google/medgemma-4b-it`` finds the snapshot the Hugging Face cache holds
(``huggingface_hub``, ``local_files_only``): the export never downloads. When the cache has no
copy, one line says how to get one (the model's terms must be accepted on huggingface.co by the
person who downloads it, on a connected machine, and the cache copied here).
"""

from __future__ import annotations

import re
from pathlib import Path

from edge.errors import InputError, require

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(src: str) -> bool:
    """``org/name`` that is not an existing path (a relative directory wins over an id)."""
    return bool(_REPO_ID.match(src)) and not Path(src).exists()


def resolve(src: str, *, revision: str | None = None) -> Path:
    """The local snapshot directory of Hugging Face model ``src`` (``org/name``).

    Raises:
        InputError: the cache has no copy (with what to do).
        MissingDependency: huggingface_hub is not installed (the export extra).
    """
    hub = require("huggingface_hub", "export")
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hub.snapshot_download(repo_id=src, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        cache = hub.constants.HF_HUB_CACHE
        raise InputError(
            f"{src} is not in the Hugging Face cache ({cache}) and the export never downloads: on a "
            f"connected machine accept the model's terms at https://huggingface.co/{src}, run "
            f"`huggingface-cli download {src}`, copy its cache directory here (or set HF_HOME), "
            "or give the checkpoint directory"
        ) from None
