"""Device profiles: pick the runtime's settings for this machine (or a named class of device).

The profiles live in ``models/profiles.toml`` (device knobs) and a bundle's manifest (the
model's own choices per profile, copied from its registry entry at export). :func:`detect`
names the profile that fits this machine; :func:`medgemma_settings` turns a profile into
:class:`~edge.medgemma.settings.MedGemmaSettings` for a given bundle, choosing the first
quantization the bundle actually has. Explicit options (CLI flags) always win over the profile.

MedGemma 27B (models/medgemma-27b-it.toml). A bundle holds one MedGemma; which one comes from
its manifest's model facts (:func:`model_family`: 62 layers is the 27B family, as for llama.cpp).
For a 27B bundle, ``auto`` picks a clinic-workstation profile (:data:`LARGE_PROFILES`) when the
machine is of its class: a Jetson with 48 GiB of RAM or more (the AGX Orin 64 GB), a GPU of 22
GiB or more, 30 GiB of RAM or more. A device that holds two bundles (a 4B and a 27B) chooses
between them with :func:`pick_bundle`: the 27B one when the device fits it (its memory estimate
under that profile against free RAM, or against the GPU's memory when the profile offloads every
layer), else the 4B one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from edge.errors import EdgeError, UsageError
from edge.medgemma.settings import MedGemmaSettings
from edge.medsiglip.settings import MedSigLIPSettings
from edge.settings import fields as settings_fields
from edge.settings import from_mapping, overrides

log = logging.getLogger(__name__)

AUTO = "auto"
LARGE_PROFILES = ("jetson-agx-orin-64GB", "gpu-24GB", "workstation-32GB")  # for the 27B family
LARGE_LAYERS = 62  # Gemma 3 27B's layer count (llama.cpp's LLM_TYPE_27B)


@cache
def all_profiles() -> dict[str, dict]:
    from edge.bundle import registry

    return tomllib.loads(registry.read_text("profiles.toml"))


def total_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _is_jetson() -> bool:
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return "jetson" in Path("/proc/device-tree/model").read_text(errors="ignore").lower()
    except OSError:
        return False


def _is_android() -> bool:
    return "ANDROID_ROOT" in os.environ or Path("/system/build.prop").exists()


def model_family(bundle) -> str:
    """ "27b" for a bundle whose MedGemma is of the 27B family (62 layers, as the manifest's model
    facts record for an export or an import), else "4b"."""
    try:
        model = bundle.component("medgemma").get("model") or {}
    except EdgeError:
        return "4b"
    return "27b" if int(model.get("n_layers") or 0) == LARGE_LAYERS else "4b"


def detect(
    memory: int | None = None,
    *,
    jetson: bool | None = None,
    android: bool | None = None,
    gpu_memory: int | None = None,
    family: str = "4b",
) -> str:
    """The profile for this machine: Jetson → jetson-agx-orin-64GB at 48 GiB of RAM or more, else
    jetson-orin-nano-8GB; Android → phone-8GB at 7 GiB of RAM or more, else phone-4GB; other
    machines → laptop-16GB at 15 GiB or more, laptop-8GB at 6 GiB or more, else phone-4GB (a small
    board is sized like a small phone). For ``family="27b"`` (a 27B bundle) other machines first
    get gpu-24GB with a GPU of 22 GiB or more (``gpu_memory``: detected when None), then
    workstation-32GB at 30 GiB of RAM or more."""
    from edge.device import resources

    gib = (memory if memory is not None else total_memory()) / 2**30
    if jetson if jetson is not None else _is_jetson():
        return "jetson-agx-orin-64GB" if gib >= 48 else "jetson-orin-nano-8GB"
    if android if android is not None else _is_android():
        return "phone-8GB" if gib >= 7 else "phone-4GB"
    if family == "27b":
        vram = (gpu_memory if gpu_memory is not None else resources.gpu_memory()) / 2**30
        if vram >= 22:
            return "gpu-24GB"
        if gib >= 30:
            return "workstation-32GB"
    if gib >= 15:
        return "laptop-16GB"
    return "laptop-8GB" if gib >= 6 else "phone-4GB"


def get(name: str | None, bundle=None) -> tuple[str, dict]:
    """(name, profile) for ``name``; ``None`` or ``auto`` detects (for ``bundle``'s model family
    when one is given). UsageError lists the names."""
    profiles = all_profiles()
    chosen = (
        detect(family=model_family(bundle) if bundle is not None else "4b") if name in (None, AUTO) else name
    )
    if chosen not in profiles:
        raise UsageError(f"unknown device profile {name!r}; known: {', '.join(profiles)} (or auto)")
    return chosen, dict(profiles[chosen])


def medgemma_settings(bundle, name: str | None = None, **explicit) -> tuple[str, MedGemmaSettings]:
    """MedGemma's settings for ``bundle`` under profile ``name`` (auto-detected when None), with
    ``explicit`` (non-None values: the flags given) overriding. Returns (profile name, settings).

    A profile key is a settings field's name, or the ``profile`` name its declaration gives
    (``threads``, ``mmproj``); ``quant`` lists text GGUFs in order of preference and the first
    one the bundle has is chosen; ``image_encoder`` falls back to what the bundle has.
    """
    chosen, prof = get(name, bundle)
    model_says = dict((bundle.component("medgemma").get("profiles") or {}).get(chosen, {}))
    if "text" in model_says:  # bundles exported before the profiles file named it so
        model_says["quant"] = model_says.pop("text")
    prof.update(model_says)
    values = {
        f.name: prof[key]
        for f in settings_fields(MedGemmaSettings)
        if (key := f.metadata.get("profile") or f.name) in prof
    }
    values["quant"] = _quant(bundle, chosen, prof)
    values["image_encoder"] = _encoder(bundle, prof)
    settings = from_mapping(MedGemmaSettings, values, where=f"profile {chosen}: ")
    return chosen, overrides(settings, **explicit)


def _quant(bundle, chosen: str, prof: dict) -> str | None:
    """The profile's first preferred text quantization that the bundle has, unless the bundle's
    KL report measured a later one of the list as better for the device (:func:`measured_better`);
    else the bundle's first."""
    quants = prof.get("quant") or []
    quants = [quants] if isinstance(quants, str) else list(quants)
    files = {f.get("quant"): f for f in bundle.files("medgemma") if f["role"] == "text"}
    have = list(files)
    candidates = [q for q in quants if q in files]
    quant = candidates[0] if candidates else None
    if quant is not None:
        kl = ((bundle.component("medgemma").get("fidelity") or {}).get("kl") or {}).get("rows") or {}
        better = measured_better(quant, candidates[1:], files, kl)
        if better:
            log.info(
                "profile %s: %s over %s (no larger, closer to the reference in the bundle's KL report)",
                chosen,
                better,
                quant,
            )
            quant = better
    if quant is None and have:
        quant = have[0]
        log.info("profile %s: the bundle has none of %s; using %s", chosen, "/".join(quants), quant)
    return quant


def measured_better(first: str, later: list[str], files: dict[str, dict], kl: dict[str, dict]) -> str | None:
    """A later candidate that dominates ``first`` by measurement: a file no larger, whose mean and
    99th-percentile KL against the reference are both lower (the bundle's own KL report). None
    when nothing does or there is no report: the profile's order (speed, kernels) stands."""
    ref = kl.get(first)
    if not ref or "bytes" not in files.get(first, {}):
        return None
    for q in later:
        row = kl.get(q)
        if (
            row
            and files[q].get("bytes", 1 << 62) <= files[first]["bytes"]
            and row["mean_kl"] < ref["mean_kl"]
            and row["kl_p99"] < ref["kl_p99"]
        ):
            return q
    return None


def medsiglip_settings(bundle, name: str | None = None, **explicit) -> MedSigLIPSettings:
    """MedSigLIP's settings under profile ``name``: its precision when the bundle has it (the
    model's own choice in the manifest first, then the device profile's), else the bundle's
    default; ``explicit`` (non-None values) overriding."""
    chosen, prof = get(name, bundle)
    settings = MedSigLIPSettings()
    try:
        comp = bundle.component("medsiglip")
    except EdgeError:
        return overrides(settings, **explicit)
    want = (comp.get("profiles") or {}).get(chosen, {}).get("precision") or prof.get("medsiglip_precision")
    if want in comp.get("precisions", []):
        settings = overrides(settings, precision=want)
    return overrides(settings, **explicit)


def _encoder(bundle, prof: dict) -> str:
    """The profile's image encoder if the bundle has it, else whichever it has."""
    roles = {f["role"] for f in bundle.files("medgemma")}
    want = prof.get("image_encoder", "onnx")
    if want == "onnx" and "vision-onnx" in roles and importlib.util.find_spec("onnxruntime"):
        return "onnx"
    if "mmproj" in roles:
        return "mmproj"
    return "auto"


# --- two bundles on one device: 27B when it fits, else 4B --------------------------------------------


@dataclass
class Pick:
    """What :func:`pick_bundle` chose, and why (a line for the log)."""

    bundle: Any
    profile: str
    family: str
    need_bytes: int
    budget_bytes: int
    reason: str


def need_bytes(bundle, name: str) -> tuple[int, bool]:
    """(bytes ``bundle``'s MedGemma needs under profile ``name``, whether they go to the GPU): the
    load's own estimate (:func:`edge.device.resources.estimate`) of the text file the profile
    chooses, its KV cache at the profile's context and the image encoder, read from headers."""
    from edge.bundle.gguf_header import read_header
    from edge.device import resources

    _, settings = medgemma_settings(bundle, name)
    texts = [f for f in bundle.files("medgemma") if f["role"] == "text"]
    text = next((f for f in texts if f.get("quant") == settings.quant), texts[0])
    role = "vision-onnx" if settings.image_encoder == "onnx" else "mmproj"
    encoder = next((f for f in bundle.files("medgemma") if f["role"] == role), None)
    est = resources.estimate(
        bundle.path(text),
        read_header(bundle.path(text)),
        encoder=bundle.path(encoder) if encoder else None,
        n_ctx=settings.n_ctx,
        kv_type=settings.kv_type,
        repack=settings.repack,
        swa_full=settings.swa_full,
        n_batch=settings.n_batch,
    )
    offloaded = settings.gpu_layers != 0 and "vram_gib" in all_profiles()[name]
    return est.total, offloaded


def pick_bundle(
    bundles,
    *,
    memory: int | None = None,
    available: int | None = None,
    gpu_memory: int | None = None,
    jetson: bool | None = None,
    android: bool | None = None,
) -> Pick:
    """The bundle (of ``bundles``, opened) this device should run, with its profile: a 27B one
    when the machine is of a 27B profile's class and its estimate fits the budget (free RAM, or
    the GPU's memory for a profile that offloads every layer), else the first other one. When none
    fits, the smallest: its load then refuses with the numbers (exit 4).

    Raises:
        UsageError: no bundle given.
    """
    from edge.device import resources

    if not bundles:
        raise UsageError("no bundle to choose from")
    avail = available if available is not None else resources.available_memory()
    vram = gpu_memory if gpu_memory is not None else resources.gpu_memory()
    ranked = sorted(bundles, key=lambda b: model_family(b) != "27b")  # 27B first, stable otherwise
    tried = []
    for b in ranked:
        family = model_family(b)
        name = detect(memory, jetson=jetson, android=android, gpu_memory=vram, family=family)
        if family == "27b" and name not in LARGE_PROFILES:
            tried.append(f"{b.root.name}: 27B, this device is of no 27B profile's class")
            continue
        need, on_gpu = need_bytes(b, name)
        budget = vram if on_gpu else avail
        if need <= budget:
            why = f"{family} under {name}: needs {need / 2**30:.2f} GiB of {budget / 2**30:.2f} GiB"
            return Pick(b, name, family, need, budget, "; ".join([*tried, why]))
        tried.append(
            f"{b.root.name}: {family} under {name} needs {need / 2**30:.2f} GiB, {budget / 2**30:.2f} free"
        )
    smallest = min(ranked, key=lambda b: sum(f.get("bytes", 0) for f in b.files("medgemma")))
    family = model_family(smallest)
    name = detect(memory, jetson=jetson, android=android, gpu_memory=vram, family=family)
    need, on_gpu = need_bytes(smallest, name)
    log.warning("no bundle fits this device (%s); trying the smallest", "; ".join(tried))
    return Pick(smallest, name, family, need, vram if on_gpu else avail, "nothing fits: " + "; ".join(tried))
