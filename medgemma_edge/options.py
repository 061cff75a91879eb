"""Command-line flags generated from the settings dataclasses, and the settings they give.

``ask``, ``serve`` and ``bench`` share :func:`add_model_options`; every MedGemma flag comes from a
field of :class:`~edge.medgemma.settings.MedGemmaSettings` (its ``flag``, help and choices), so a
new setting is a new flag with no edit here. A flag left out means "the profile's".
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edge.settings import fields, value_type
from medgemma_edge.common import default_bundle

log = logging.getLogger(__name__)


def flag_name(f) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    prefix = "--no-" if f.default is True else "--"
    return prefix + f.name.replace("_", "-")


def add_settings_flags(p: argparse.ArgumentParser, cls) -> None:
    """One flag per field of ``cls`` that the command line offers; default None (not given)."""
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        base, _ = value_type(cls, f)
        help_ = f.metadata["help"]
        if base is bool:
            const = not f.default
            switch = "turn off" if f.default else "turn on"
            p.add_argument(
                flag_name(f),
                dest=f.name,
                action="store_const",
                const=const,
                default=None,
                help=f"{switch}: {help_} (default: the profile's)",
            )
            continue
        choices = [c for c in f.metadata.get("choices") or () if c is not None] or None
        p.add_argument(
            flag_name(f),
            dest=f.name,
            type=base,
            choices=choices,
            default=None,
            help=f"{help_} (default: the profile's)",
        )


def given(args: argparse.Namespace, cls) -> dict:
    """The values of ``cls``'s flags that were given on the command line."""
    return {f.name: getattr(args, f.name, None) for f in fields(cls) if f.metadata.get("cli", True)}


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options that choose and size the model; shared by ask, serve and bench."""
    from edge.medgemma.settings import MedGemmaSettings

    p.add_argument(
        "-b", "--bundle", default=default_bundle(), help="bundle directory ($MEDGEMMA_EDGE_BUNDLE)"
    )
    p.add_argument(
        "--profile",
        default="auto",
        help="device profile from models/profiles.toml (phone-4GB, phone-8GB, jetson-orin-nano-8GB, "
        "laptop-8GB, laptop-16GB); default auto: chosen from this machine's RAM and kind",
    )
    add_settings_flags(p, MedGemmaSettings)
    p.add_argument(
        "--image-cache", type=Path, help="also keep encoded images in this directory (size-bounded)"
    )


def medgemma_settings(args: argparse.Namespace):
    """(bundle, MedGemma settings, image cache or None) from the profile (``--profile``,
    auto-detected by default) with the flags given explicitly applied."""
    from edge.bundle.manifest import open_bundle
    from edge.device import profiles
    from edge.medgemma.settings import MedGemmaSettings
    from edge.media.image_cache import ImageCache
    from medgemma_edge.common import resolve_bundle

    bundle = open_bundle(resolve_bundle(args.bundle))
    name, settings = profiles.medgemma_settings(bundle, args.profile, **given(args, MedGemmaSettings))
    log.info("device profile %s: %s", name, settings)
    cache = ImageCache(disk_dir=args.image_cache) if args.image_cache else None
    return bundle, settings, cache


def open_model(args: argparse.Namespace):
    """The MedGemma that ``args`` (``add_model_options``) describe."""
    from edge.medgemma.model import MedGemma

    bundle, settings, cache = medgemma_settings(args)
    return MedGemma(bundle, settings, image_cache=cache)
