"""The model registry: one TOML file per supported model in ``models/`` (facts, not weights).

``models/`` is installed inside the wheel as the package ``edge.models`` (pyproject maps it) and
read through :mod:`importlib.resources`, so an installed runtime finds it wherever it lives;
``$MEDGEMMA_EDGE_MODELS`` points at another registry directory.

A registry entry gives the Hugging Face id, the real architecture config, the prompt format,
the licence, and the quantization that suits each device class. Bundles copy what the runtime
needs (prompt format, licence) into their manifest, so a device never needs the registry.
"""

from __future__ import annotations

import importlib.resources
import os
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from edge.errors import UsageError

DATA_PACKAGE = "edge.models"  # models/ in the source tree


def data_dir() -> Traversable:
    """The registry's files: ``$MEDGEMMA_EDGE_MODELS``, else the installed ``models/`` data."""
    override = os.environ.get("MEDGEMMA_EDGE_MODELS")
    return Path(override) if override else importlib.resources.files(DATA_PACKAGE)


def read_text(name: str) -> str:
    """A registry file (``profiles.toml``, ``templates/gemma3.jinja``) as text."""
    return data_dir().joinpath(*name.split("/")).read_text(encoding="utf-8")


@dataclass(frozen=True)
class ModelSpec:
    id: str
    kind: str  # "medgemma" (a GGUF language model) or "medsiglip"
    hf_id: str
    revision: str
    architecture: str
    description: str
    licence: dict
    config: dict
    preprocessor: dict
    prompt: dict
    defaults: dict
    profiles: dict
    raw: dict

    def chat_template(self) -> str | None:
        tpl = self.prompt.get("template")
        return read_text(tpl) if tpl else None

    def prompt_spec(self) -> dict[str, Any]:
        """What a bundle records so the runtime can prompt this model without the registry."""
        spec = {k: v for k, v in self.prompt.items() if k != "template"}
        if tpl := self.chat_template():
            spec["chat_template"] = tpl
        return spec


def _load(path: Traversable) -> ModelSpec:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    return ModelSpec(
        id=raw["id"],
        kind=raw["kind"],
        hf_id=raw["hf_id"],
        revision=raw.get("revision", "main"),
        architecture=raw["architecture"],
        description=raw.get("description", ""),
        licence=raw.get("licence", {}),
        config=raw.get("config", {}),
        preprocessor=raw.get("preprocessor", {}),
        prompt=raw.get("prompt", {}),
        defaults=raw.get("defaults", {}),
        profiles=raw.get("profiles", {}),
        raw=raw,
    )


@cache
def all_models() -> dict[str, ModelSpec]:
    return {
        s.id: s
        for s in (
            _load(p)
            for p in sorted(data_dir().iterdir(), key=lambda p: p.name)
            if p.name.endswith(".toml") and p.name != "profiles.toml"
        )
    }


def get(model_id: str) -> ModelSpec:
    """The registry entry ``model_id``; UsageError listing the known ids otherwise."""
    models = all_models()
    if model_id not in models:
        raise UsageError(f"unknown model {model_id!r}; known: {', '.join(models)}")
    return models[model_id]
