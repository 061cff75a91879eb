"""Multiple-choice accuracy of a bundle's text files: the MedQA JSONL shape, on the device.

One question per line: ``{"question": str, "options": {"A": str, "B": str, ...}, "answer_idx":
"C"}`` (MedQA's own fields; ``"answer"`` may hold the letter, or the text of an option when
``answer_idx`` is absent). ``options`` may also be a list (lettered A, B, ... in order).

Each question is asked through the bundle's own prompt format, and the answer is constrained to
one of its option letters by a llama.cpp grammar and decoded greedily (temperature 0): the
model's most likely letter, with no parsing of free text. Per file: accuracy with a Wilson 95%
interval; against the most accurate file, the paired difference with McNemar's exact test on
the discordant questions (the same questions, so the pairing is what makes small differences
testable).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge.errors import ContextOverflow, InputError
from edge.files import read_text

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 << 20
Z95 = 1.959963984540054
INSTRUCTION = "Answer the multiple-choice question with the letter of the correct option only."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: its line in the file, text, options and right letter."""

    line: int
    question: str
    options: dict[str, str]
    answer: str


def _parse(obj: object, where: str, line: int) -> Question:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: not a JSON object; each line is one question")
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        raise InputError(f"{where}: no 'question' text")
    opts = obj.get("options")
    if isinstance(opts, list):
        opts = dict(zip(LETTERS, opts, strict=False))
    if not isinstance(opts, dict) or len(opts) < 2:
        raise InputError(f"{where}: 'options' must map at least two letters to their text")
    options: dict[str, str] = {}
    for k, v in opts.items():
        key = str(k).strip().upper()
        if len(key) != 1 or key not in LETTERS or not isinstance(v, str) or not v.strip():
            raise InputError(f"{where}: option {k!r} must be one letter A-Z with a non-empty text")
        options[key] = v.strip()
    answer = obj.get("answer_idx")
    if answer is None:
        ans = obj.get("answer")
        if isinstance(ans, str) and ans.strip().upper() in options:
            answer = ans.strip().upper()
        elif isinstance(ans, str):
            answer = next((k for k, v in options.items() if v == ans.strip()), None)
    answer = str(answer).strip().upper() if answer is not None else None
    if answer not in options:
        raise InputError(
            f"{where}: the answer must be one of the option letters {', '.join(options)} "
            "('answer_idx', or 'answer' as a letter or an option's text)"
        )
    return Question(line, q.strip(), dict(sorted(options.items())), answer)


def load_questions(path: str | Path, *, limit: int | None = None) -> list[Question]:
    """The questions of a JSONL file (blank lines skipped), the first ``limit`` of them.

    Raises:
        InputError: the file is missing, unreadable, too large, empty, or a line is not a
            question (the message names the line).
    """
    text = read_text(path, limit=MAX_FILE_BYTES, what="MCQ file")
    out: list[Question] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise InputError(
                f"{where}: not JSON ({exc.msg}); the file must hold one question per line"
            ) from None
        out.append(_parse(obj, where, n))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{path}: no questions; one JSON object per line (question, options, answer_idx)")
    return out


def prompt_message(q: Question) -> str:
    """The user turn for ``q``: instruction, question and lettered options."""
    opts = "\n".join(f"{k}. {v}" for k, v in q.options.items())
    return f"{INSTRUCTION}\n\n{q.question}\n\n{opts}"


def grammar_for(letters: list[str]) -> str:
    """GBNF allowing one of ``letters`` (after an optional space, as completion prompts end in
    "Answer:")."""
    return 'root ::= " "? (' + " | ".join(f'"{c}"' for c in letters) + ")"


def answer(model, q: Question) -> str:
    """The letter ``model`` (an :class:`edge.medgemma.model.MedGemma`) picks for ``q``: its most
    likely option letter under the grammar, decoded greedily.

    Raises:
        ContextOverflow: the question does not fit the model's context.
    """
    from llama_cpp import LlamaGrammar

    text, _ = model.render([{"role": "user", "content": prompt_message(q)}])
    (ids,) = model.segments(text, [])
    if len(ids) + 4 > model.n_ctx:
        raise ContextOverflow(
            f"question on line {q.line} takes {len(ids)} tokens; the context is {model.n_ctx}: give a larger --ctx"
        )
    grammar = LlamaGrammar.from_string(grammar_for(list(q.options)), verbose=False)
    out = model.llama.create_completion(
        prompt=ids, grammar=grammar, max_tokens=2, temperature=0.0, top_k=1, repeat_penalty=1.0, seed=0
    )
    got = out["choices"][0]["text"].strip().upper()
    return got[:1] if got[:1] in q.options else ""


def run(model, questions: list[Question], *, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """The letter ``model`` picks for each question, in order."""
    picks = []
    for i, q in enumerate(questions, start=1):
        picks.append(answer(model, q))
        if progress:
            progress(i, len(questions))
    return picks


# --- statistics ------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes of ``n`` (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar(best: list[bool], other: list[bool]) -> dict:
    """McNemar's exact test of ``other`` against ``best`` on the same questions.

    Returns ``b`` (best right, other wrong), ``c`` (other right, best wrong), ``diff`` (other's
    accuracy minus best's), its Wald 95% interval for paired proportions, and the exact two-sided
    binomial ``p_value`` on the b + c discordant questions.
    """
    n = len(best)
    b = sum(1 for x, y in zip(best, other, strict=True) if x and not y)
    c = sum(1 for x, y in zip(best, other, strict=True) if y and not x)
    d = b + c
    tail = sum(math.comb(d, i) for i in range(min(b, c) + 1)) / 2**d if d else 1.0
    diff = (c - b) / n if n else 0.0
    se = math.sqrt(max(d - (c - b) ** 2 / n, 0.0)) / n if n else 0.0
    return {
        "b": b,
        "c": c,
        "diff": diff,
        "diff_ci95": [diff - Z95 * se, diff + Z95 * se],
        "p_value": min(1.0, 2 * tail),
    }


def summarize(questions: list[Question], picks: dict[str, list[str]]) -> dict[str, dict]:
    """Per quant (in ``picks``' order): n, correct, accuracy, ci95, and ``vs_best`` (McNemar
    against the most accurate; the first listed wins a tie, so list the larger file first)."""
    right = {q: [p == x.answer for p, x in zip(ps, questions, strict=True)] for q, ps in picks.items()}
    best = max(right, key=lambda q: sum(right[q]))  # max keeps the first of equals
    rows = {}
    for q, r in right.items():
        k, n = sum(r), len(r)
        rows[q] = {
            "n": n,
            "correct": k,
            "accuracy": k / n,
            "ci95": list(wilson(k, n)),
            "unanswered": sum(1 for p in picks[q] if not p),
            "best": q == best,
            "vs_best": None if q == best else {"best": best, **mcnemar(right[best], r)},
        }
    return rows


def evaluate(
    bundle,
    questions: list[Question],
    *,
    quants: list[str],
    n_ctx: int = 2048,
    threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Ask every question with each text file ``quants`` of ``bundle`` (one model in memory at a
    time) and summarize (:func:`summarize`). Returns ``{"rows", "picks", "seconds"}``.

    Raises:
        InputError / IntegrityError: the bundle or a file is unusable (names it).
        ContextOverflow: a question does not fit ``n_ctx``.
    """
    from edge.medgemma.model import MedGemma

    picks: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for quant in quants:
        t0 = time.perf_counter()
        with MedGemma(bundle, quant=quant, n_ctx=n_ctx, n_threads=threads, vision=False) as model:
            picks[quant] = run(
                model, questions, progress=(lambda d, t, q=quant: progress(q, d, t)) if progress else None
            )
        seconds[quant] = round(time.perf_counter() - t0, 2)
        log.info("mcq %s: %d questions in %.1fs", quant, len(questions), seconds[quant])
    rows = summarize(questions, picks)
    for q in rows:
        rows[q]["seconds"] = seconds[q]
    return {"rows": rows, "picks": picks}
