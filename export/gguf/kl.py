"""The KL report: every text GGUF against the unquantized conversion, on held-out text, with
``llama-perplexity``'s KL-divergence mode.

1. ``llama-perplexity -m REFERENCE -f HELDOUT --kl-divergence-base BASE``: the reference's
   log-probabilities over the held-out text, chunk by chunk, saved to ``BASE``;
2. ``llama-perplexity -m FILE --kl-divergence-base BASE --kl-divergence``: each file on the same
   tokens; the tool prints mean / percentile KL, the same-top-token rate and both perplexities.

Each chunk scores its second half (the model always has context), so ``positions`` is
``chunks * (ctx - 1 - ctx / 2)``. The figures are parsed from the tool's summary. One is derived:
``ppl_vs_reference``, a file's perplexity over the reference's, both computed by the tool from
full logits on the same tokens. The tool's own ``PPL(Q)/PPL(base)`` takes ``PPL(base)`` from the
saved reference, which keeps only 16 nats below each position's top log-probability; where the
true token sits below that floor (a random-weight twin: F16 against itself reads 1.85) it is
biased, so the tables print ``ppl_vs_reference`` and the manifest keeps both. The held-out text is never the text the importance matrix saw
(:mod:`export.gguf.imatrix`).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

from edge.errors import EdgeError, InputError
from export.gguf.llama_tools import Tools, count_tokens, run_tool

log = logging.getLogger(__name__)

CTX = 512  # llama-perplexity's default chunk
MAX_CHUNKS = 32  # bounds the reference file: chunks * ctx/2 * vocab * 2 bytes (1.1 GB per 8 at 4B)

_FIGURES = {  # summary line -> key (value, ± uncertainty)
    "mean_kl": r"Mean\s+KLD:\s+(\S+)\s+±\s+(\S+)",
    "kl_p99": r"99\.0%\s+KLD:\s+(\S+)",
    "kl_max": r"Maximum KLD:\s+(\S+)",
    "kl_median": r"Median\s+KLD:\s+(\S+)",
    "ppl": r"Mean PPL\(Q\)\s+:\s+(\S+)\s+±\s+(\S+)",
    "ppl_base": r"Mean PPL\(base\)\s+:\s+(\S+)\s+±\s+(\S+)",
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s+:\s+(\S+)\s+±\s+(\S+)",
    "same_top": r"Same top p:\s+(\S+)\s+±\s+(\S+)\s*%",
}
_CHUNKS = re.compile(r"(?:computing|calculating perplexity) over (\d+) chunks, n_ctx=(\d+)")
_CHUNK_ROW = re.compile(r"^\s*(\d+)\s+\S+\s+±")  # "   3    4542.39 ±  269.05 ..." per chunk
_PASS = re.compile(r"\[(\d+)\]")
_FINAL_PPL = re.compile(r"Final estimate: PPL = (\S+) \+/- (\S+)")


def reference_bytes(vocab: int, *, chunks: int = MAX_CHUNKS, ctx: int = CTX) -> int:
    """Disk the saved reference log-probabilities take (uint16 per vocabulary entry, scored
    half of each chunk): what the export plans for its scratch."""
    return chunks * (ctx // 2 + 1) * (2 * ((vocab + 1) // 2) + 4) * 2 + chunks * ctx * 4


def parse_kl(output: str) -> dict:
    """The figures of one ``--kl-divergence`` run, from its summary.

    Returns mean_kl (nats), kl_p99, kl_median, kl_max, same_top (a fraction), ppl, ppl_base,
    ppl_ratio and their ``*_err`` (the tool's ±), chunks, ctx and positions.

    Raises:
        EdgeError: the summary is missing or not numeric (another llama.cpp's output format).
    """
    row: dict = {}
    for key, pattern in _FIGURES.items():
        m = re.search(pattern, output)
        if not m:
            raise EdgeError(
                f"llama-perplexity printed no '{key}' figure; is it the llama.cpp the tools were built from?"
            )
        vals = [float(v) for v in m.groups()]
        if not all(math.isfinite(v) for v in vals):
            raise EdgeError(f"llama-perplexity's {key} is not a number ({m.group(0).strip()})")
        row[key] = vals[0]
        if len(vals) > 1:
            row[f"{key}_err"] = vals[1]
    row["same_top"] /= 100.0
    row["same_top_err"] /= 100.0
    m = _CHUNKS.search(output)
    if m:
        row["chunks"], row["ctx"] = int(m.group(1)), int(m.group(2))
        row["positions"] = row["chunks"] * (row["ctx"] - 1 - row["ctx"] // 2)
    return row


def _progress_lines(progress: Callable[[int, int], None] | None):
    total = [0]

    def on_line(line: str) -> None:
        if m := _CHUNKS.search(line):
            total[0] = int(m.group(1))
        elif progress and total[0]:
            done = _PASS.findall(line) or ([m.group(1)] if (m := _CHUNK_ROW.match(line)) else [])
            if done:
                progress(min(int(done[-1]), total[0]), total[0])

    return on_line


def reference(
    tools: Tools,
    model: Path,
    text: Path,
    base: Path,
    *,
    ctx: int = CTX,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Save the reference's log-probabilities over ``text`` to ``base``; returns its perplexity,
    chunks and ctx.

    Raises:
        InputError: the held-out text is shorter than two chunks.
    """
    n = count_tokens(model, text)
    if n < 2 * ctx:
        raise InputError(
            f"the KL held-out text is too short: {n} tokens, llama-perplexity needs at least "
            f"{2 * ctx} (two chunks of {ctx}); give a longer --kl-text"
        )
    args = ["-m", str(model), "-f", str(text), "--kl-divergence-base", str(base), "-c", str(ctx)]
    args += ["--chunks", str(MAX_CHUNKS)]
    if threads:
        args += ["-t", str(threads)]
    t0 = time.perf_counter()
    out = run_tool(
        tools, "llama-perplexity", args, what="saving the reference logits", on_line=_progress_lines(progress)
    )
    head = _base_header(base)
    if head is None:
        raise EdgeError("llama-perplexity saved no reference logits (see its log with -v)")
    m = _FINAL_PPL.search(out)  # the log's last lines can be lost by an unpatched build
    log.info("KL reference %s: %d chunks, %.1fs", model.name, head["chunks"], time.perf_counter() - t0)
    return {"ppl": float(m.group(1)) if m else None, **head}


def _base_header(base: Path) -> dict | None:
    """n_ctx and chunks from the saved reference's own header (``_logits_``, u32 n_ctx, i32
    n_vocab, i32 n_chunk), so they don't depend on the tool's log."""
    import struct

    try:
        with open(base, "rb") as f:
            raw = f.read(20)
    except OSError:
        return None
    if len(raw) < 20 or raw[:8] != b"_logits_":
        return None
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", raw[8:20])
    return {"ctx": int(n_ctx), "chunks": int(n_chunk), "vocab": int(n_vocab)} if n_chunk > 0 else None


def divergence(
    tools: Tools,
    model: Path,
    base: Path,
    *,
    ctx: int = CTX,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """One file's figures against the saved reference (:func:`parse_kl`), with its run time."""
    args = ["-m", str(model), "--kl-divergence-base", str(base), "--kl-divergence", "-c", str(ctx)]
    if threads:
        args += ["-t", str(threads)]
    t0 = time.perf_counter()
    for attempt in (1, 2):
        out = run_tool(
            tools,
            "llama-perplexity",
            args,
            what=f"measuring {model.name} against the reference",
            on_line=_progress_lines(progress),
        )
        try:
            row = parse_kl(out)
            break
        except EdgeError:
            # a build without the log patch (a $MEDGEMMA_EDGE_LLAMA_TOOLS of your own) can exit
            # before writing its summary: one more run, then the error
            if attempt == 2 or "Final estimate" in out or "KLD" in out:
                raise
            log.warning("llama-perplexity printed no summary for %s; running it again", model.name)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def report(
    tools: Tools,
    *,
    reference_file: tuple[str, Path],
    texts: dict[str, Path],
    heldout: Path,
    heldout_info: dict,
    work: Path,
    ctx: int = CTX,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The KL table: every file of ``texts`` (quant → GGUF) against ``reference_file``
    ((quant, GGUF) of the unquantized conversion). The reference itself gets a row only when it
    is one of ``texts`` (it must read ~0 KL and 100% same top token: a check of the pipeline).

    Returns ``{"reference", "tool", "text", "ctx", "chunks", "positions", "ppl_reference", "rows"}``.
    """
    ref_q, ref_path = reference_file
    base = work / "kl-reference.bin"
    total = 1 + len(texts)
    ref = reference(tools, ref_path, heldout, base, ctx=ctx, threads=threads)
    if progress:
        progress(1, total)
    rows: dict[str, dict] = {}
    try:
        for i, (quant, path) in enumerate(texts.items(), start=2):
            rows[quant] = divergence(tools, path, base, ctx=ctx, threads=threads)
            log.info(
                "KL %s: mean %.5f p99 %.5f same-top %.4f ppl ratio %.4f",
                quant,
                rows[quant]["mean_kl"],
                rows[quant]["kl_p99"],
                rows[quant]["same_top"],
                rows[quant]["ppl_ratio"],
            )
            if progress:
                progress(i, total)
    finally:
        base.unlink(missing_ok=True)
    ref_ppl = ref["ppl"] or (rows.get(ref_q) or {}).get("ppl")
    for row in rows.values():
        if ref_ppl:
            row["ppl_vs_reference"] = round(row["ppl"] / ref_ppl, 6)
    return {
        "reference": ref_q,
        "tool": "llama-perplexity --kl-divergence",
        "text": heldout_info,
        "ctx": ref["ctx"],
        "chunks": ref["chunks"],
        "positions": ref["chunks"] * (ref["ctx"] - 1 - ref["ctx"] // 2),
        "ppl_reference": ref_ppl,
        "rows": rows,
    }
