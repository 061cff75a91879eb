"""The export's options and disk plan, checked before any work: quantization names (and the
unquantized ones that keep the conversion), mmproj types, and the bytes every output needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from edge.errors import ResourceError, UsageError
from export.choices import parse_choices
from export.gguf.checkpoint import Checkpoint, estimate_bytes
from export.gguf.quantize import QUANTS

OUTTYPES = ("f16", "bf16", "f32")  # the unquantized text conversion
MMPROJ_TYPES = ("f16", "q8_0", "f32")


# --- options -------------------------------------------------------------------------------------


def parse_quants(spec: str | list[str]) -> list[str]:
    """``"Q4_K_M,q8_0"`` → ``["Q4_K_M", "Q8_0"]``; an unquantized type (F16, BF16, F32) keeps the
    conversion itself. UsageError on an unknown name."""
    return parse_choices(
        spec,
        choices=[*QUANTS, *(t.upper() for t in OUTTYPES)],
        what="quantization",
        normalize=str.upper,
        none_given="give at least one quantization, e.g. --quant Q4_K_M",
    )


def check_unquantized(quants: list[str], outtype: str) -> None:
    """An unquantized ``--quant`` (F16, BF16, F32) keeps the text conversion, so it must be the
    ``--outtype``: UsageError naming both otherwise (``--quant F16 --outtype f32``)."""
    base = outtype.upper()
    for q in quants:
        if q not in QUANTS and q != base:
            raise UsageError(
                f"--quant {q} keeps the text conversion, which is --outtype {outtype} here: "
                f"give --outtype {q.lower()} to keep {q} text, or --quant {base}"
            )


def parse_mmproj(spec: str | list[str]) -> list[str]:
    """``"f16,q8_0"`` → ``["f16", "q8_0"]``; UsageError on an unknown type."""
    return parse_choices(spec, choices=MMPROJ_TYPES, what="mmproj type")


# --- disk ------------------------------------------------------------------------------------------


def plan_sizes(
    ckpt: Checkpoint, *, outtype: str, quants: list[str], mmproj: list[str], kl: bool = False
) -> dict[str, int]:
    """Estimated bytes of every file the export writes, scratch included (name → bytes)."""
    plan = {f"scratch/text-{outtype.upper()}.gguf": estimate_bytes(ckpt.text_params, outtype.upper())}
    if kl:
        from export.gguf.kl import reference_bytes

        plan["scratch/kl-reference.bin"] = reference_bytes(int(ckpt.text.get("vocab_size", 262208)))
    for q in quants:
        if q != outtype.upper():
            plan[f"text-{q}.gguf"] = estimate_bytes(ckpt.text_params, q)
    for t in mmproj:
        plan[f"mmproj-{t}.gguf"] = estimate_bytes(ckpt.vision_params, t)
    return plan


def check_disk(where: Path, need: int) -> None:
    """ResourceError when the filesystem holding ``where`` has less than ``need`` bytes free."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ResourceError(
            f"not enough disk at {probe}: the export needs about {need / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB is free; free some space or choose another --bundle"
        )
