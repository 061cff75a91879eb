"""The importance matrix: ``llama-imatrix`` over calibration text on the f16/bf16 conversion.

The matrix (per weight column, the mean squared activation the calibration text produced) tells
``llama-quantize`` which weights to keep precise; the community's good small quants are made
this way, with text like the target domain. The default text ships with the project
(:mod:`export.calibration`: invented clinical-style reports, notes, exam questions and Gemma chat
turns); a user passes their own file, which never leaves the workstation: the tool reads a copy
named ``calibration.txt`` in scratch, so the matrix (whose GGUF records its dataset's file
name) and the manifest carry only the text's size and sha256, never its path or content.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge.errors import InputError
from edge.files import FileMissing, read_bytes
from export import calibration
from export.gguf.llama_tools import Tools, count_tokens, run_tool

log = logging.getLogger(__name__)

DEFAULT = "default"
CTX = 512  # tokens per chunk: llama.cpp's and the community's usual imatrix chunk
MAX_TEXT_BYTES = 256 << 20  # a calibration file larger than this is a mistake, not a corpus
_CHUNKS = re.compile(r"computing over (\d+) chunks")
_PASS = re.compile(r"^\s*\[(\d+)\]")  # "[3]..." per chunk (with the perplexity estimate)


@dataclass(frozen=True)
class TextSet:
    """The text the importance matrix sees and the held-out text the KL report runs on."""

    calibration: Path | None  # None: no importance matrix
    calibration_info: dict | None
    heldout: Path
    heldout_info: dict


def _user_text(spec: str, *, role: str) -> tuple[Path, dict]:
    p = Path(spec).expanduser()
    data = read_bytes(p, limit=MAX_TEXT_BYTES, what=f"{role} text")
    if not data.strip():
        raise InputError(f"{role} text {spec} is empty; give a UTF-8 text file or 'default'")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{role} text {spec} is not UTF-8 (byte {exc.start}); save it as UTF-8 text"
        ) from None
    return p, calibration.describe(p, origin="user-supplied file (path not recorded)", role=role)


def text_set(imatrix: str | None, *, heldout: str | None = None) -> TextSet:
    """Resolve ``--imatrix`` (None: none; ``"default"``; or a file) and the KL report's held-out
    text (None: the project's, the same for every export so their tables compare).

    Raises:
        InputError: a given file is missing, empty, too large or not UTF-8.
    """
    try:
        if heldout in (None, DEFAULT):
            hp = calibration.path(calibration.HELDOUT)
            hinfo = calibration.describe(hp, origin=calibration.ORIGIN, role="kl-heldout")
        else:
            hp, hinfo = _user_text(heldout, role="kl-heldout")
        if imatrix is None:
            return TextSet(None, None, hp, hinfo)
        if imatrix == DEFAULT:
            cp = calibration.path(calibration.CALIBRATION)
            return TextSet(cp, calibration.describe(cp, origin=calibration.ORIGIN, role="imatrix"), hp, hinfo)
    except FileNotFoundError as exc:
        raise FileMissing(str(exc)) from None
    cp, cinfo = _user_text(imatrix, role="imatrix")
    if cinfo["sha256"] == hinfo["sha256"]:
        raise InputError(
            "the imatrix text and the KL held-out text are the same file; the KL report "
            "must run on text the importance matrix never saw"
        )
    return TextSet(cp, cinfo, hp, hinfo)


def compute(
    tools: Tools,
    model: Path,
    text: Path,
    out: Path,
    *,
    threads: int | None = None,
    ctx: int = CTX,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Run ``llama-imatrix`` on ``model`` (the unquantized conversion) over ``text``; write ``out``
    (GGUF imatrix format). Chat-template markers in the text count as control tokens
    (``--parse-special``), as they do when the runtime applies the template.

    Raises:
        InputError: the text is too short for two chunks of ``ctx`` tokens.
        EdgeError: the tool failed otherwise.
    """
    n = count_tokens(model, text, parse_special=True)
    if n < 2 * ctx:
        raise InputError(
            f"the imatrix text is too short: {n} tokens, llama-imatrix needs at least {2 * ctx} "
            f"(two chunks of {ctx}); give a longer file"
        )
    scratch = out.parent / "calibration.txt"  # the name the matrix records as its dataset
    if text.resolve() != scratch.resolve():
        shutil.copyfile(text, scratch)
    total = [0]

    def on_line(line: str) -> None:
        if m := _CHUNKS.search(line):
            total[0] = int(m.group(1))
        elif progress and total[0] and (passes := _PASS.findall(line)):
            progress(min(int(passes[-1]), total[0]), total[0])

    args = [
        "-m",
        str(model.resolve()),
        "-f",
        scratch.name,
        "-o",
        str(out.resolve()),
        "-c",
        str(ctx),
        "--no-ppl",
    ]
    args += ["--parse-special", "--output-format", "gguf"]
    if threads:
        args += ["-t", str(threads)]
    t0 = time.perf_counter()
    # -f relative to the scratch directory: the matrix records it as its dataset's name
    output = run_tool(
        tools, "llama-imatrix", args, what="computing the importance matrix", on_line=on_line, cwd=out.parent
    )
    if not out.is_file():
        raise InputError(f"llama-imatrix wrote no importance matrix ({_tail(output)})")
    log.info("imatrix %s: %d chunks of %d in %.1fs", out.name, total[0], ctx, time.perf_counter() - t0)
    if progress and total[0]:
        progress(total[0], total[0])
    return out


def _tail(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no output"


def describe(path: Path, *, text: dict) -> dict:
    """What the manifest says of an importance matrix: its chunks (read from its own GGUF
    header) and the text it was computed on."""
    from edge.bundle.gguf_header import read_header

    facts: dict = {"text": text}
    try:
        h = read_header(path)
        facts["chunks"] = int(h.get("imatrix.chunk_count", 0)) or None
        facts["chunk_size"] = int(h.get("imatrix.chunk_size", 0)) or None
        facts["tensors"] = len(h.tensors) // 2 or None  # in_sum2 + counts per weight
    except Exception as exc:  # the header reader is for model files; the count is a nicety
        log.debug("imatrix header not read: %s", exc)
    return {k: v for k, v in facts.items() if v is not None}
