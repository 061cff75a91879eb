"""``medgemma-edge eval``: MedQA-style multiple choice per text file, with Wilson intervals and
McNemar against the best; on the tiny twin (meaningless figures, said so) and the real Gemma 3
270M (a real tokenizer and grammar); and the one-line errors for bad question files."""

import json

import pytest
from conftest import run_cli

from edge.errors import InputError
from edge.medgemma import mcq
from export import calibration

EXAMPLE = str(calibration.path(calibration.MCQ_EXAMPLE))


@pytest.fixture(scope="module")
def two_quant_bundle(medgemma_twin, tmp_path_factory):
    """The tiny twin with two text files (no measurements: this is about eval)."""
    from export.gguf.convert import export_medgemma

    root = tmp_path_factory.mktemp("eval") / "b"
    export_medgemma(medgemma_twin, bundle=root, quants="Q8_0,Q4_0", mmproj="", fidelity=False, threads=2)
    return root


def test_example_file_is_medqa_shaped():
    qs = mcq.load_questions(EXAMPLE)
    assert len(qs) == 12 and all(list(q.options) == ["A", "B", "C", "D"] for q in qs)
    assert qs[0].answer == "C" and qs[0].line == 1
    assert mcq.load_questions(EXAMPLE, limit=3)[-1].line == 3


def test_answer_may_be_a_letter_or_an_options_text_and_options_a_list(tmp_path):
    p = tmp_path / "q.jsonl"
    rows = [
        {"question": "Q1?", "options": {"a": "x", "b": "y"}, "answer": "b"},
        {"question": "Q2?", "options": ["left", "right", "both"], "answer": "both"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    q1, q2 = mcq.load_questions(p)
    assert (q1.answer, q1.options) == ("B", {"A": "x", "B": "y"})
    assert (q2.answer, list(q2.options)) == ("C", ["A", "B", "C"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2: not JSON"),
        ('["a"]', "line 2: not a JSON object"),
        ('{"options": {"A": "x", "B": "y"}, "answer_idx": "A"}', "line 2: no 'question' text"),
        ('{"question": "q", "options": {"A": "x"}, "answer_idx": "A"}', "at least two letters"),
        ('{"question": "q", "options": {"AA": "x", "B": "y"}, "answer_idx": "B"}', "one letter A-Z"),
        (
            '{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}',
            "one of the option letters A, B",
        ),
    ],
)
def test_malformed_questions_name_the_line(tmp_path, line, message):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question": "ok?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}\n' + line + "\n")
    with pytest.raises(InputError, match=message):
        mcq.load_questions(p)


def test_wilson_and_mcnemar_match_hand_figures():
    lo, hi = mcq.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert mcq.wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert mcq.wilson(10, 10)[1] == pytest.approx(1.0)
    best = [True] * 5 + [False] * 5
    other = [False] * 5 + [False] * 5  # 5 discordant, all for best: exact p = 2 / 2^5
    m = mcq.mcnemar(best, other)
    assert (m["b"], m["c"], m["diff"]) == (5, 0, -0.5) and m["p_value"] == pytest.approx(0.0625)
    assert mcq.mcnemar(best, best)["p_value"] == 1.0
    assert mcq.grammar_for(["A", "B"]) == 'root ::= " "? ("A" | "B")'


def test_eval_on_the_twin_prints_intervals_and_says_it_measures_nothing(two_quant_bundle):
    r = run_cli("eval", "-b", str(two_quant_bundle), "--mcq", EXAMPLE, "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("MCQ: 12 questions")
    q8 = next(ln for ln in lines if ln.split()[:1] == ["Q8_0"])
    q4 = next(ln for ln in lines if ln.split()[:1] == ["Q4_0"])
    assert "%  [" in q8 and ("best" in q8 or "vs Q4_0" in q8) and "p=" in q4 + q8
    assert "synthetic twin: random weights" in r.stdout and "invented" in r.stdout

    j = run_cli(
        "eval",
        "-b",
        str(two_quant_bundle),
        "--mcq",
        EXAMPLE,
        "--quant",
        "Q4_0,Q8_0",
        "--limit",
        "5",
        "--json",
    )
    assert j.returncode == 0, j.stderr
    out = json.loads(j.stdout)
    assert list(out["rows"]) == ["Q8_0", "Q4_0"]  # most bits first, whatever order was asked
    assert out["synthetic"] is True and out["mcq"]["questions"] == 5
    for q, row in out["rows"].items():
        assert row["n"] == 5 and 0 <= row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] <= 1, q
        assert all(p in "ABCD" and p for p in out["picks"][q]), q
    worse = [row for row in out["rows"].values() if not row["best"]]
    assert len(worse) == 1 and 0 <= worse[0]["vs_best"]["p_value"] <= 1


def test_eval_on_the_real_270m_model(small_model_bundle):
    r = run_cli("eval", "-b", str(small_model_bundle), "--mcq", EXAMPLE, "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (row,) = out["rows"].values()
    assert row["n"] == 12 and row["unanswered"] == 0 and row["best"] and row["vs_best"] is None
    assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    assert all(p in "ABCD" for p in out["picks"]["Q4_K_M"])
    assert out["synthetic"] is False
    assert any("not a medical one" in n for n in out["notes"])


def test_eval_cli_errors_are_one_line(two_quant_bundle, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "Z"}\n')
    cases = [
        (["--mcq", str(tmp_path / "none.jsonl")], 3, "does not exist"),
        (["--mcq", str(bad)], 3, "line 1: the answer must be one of the option letters"),
        (["--mcq", str(tmp_path)], 3, "directory"),
        (["--mcq", EXAMPLE, "--quant", "Q6_K"], 2, "no text file Q6_K (it has: Q8_0, Q4_0)"),
        (["--mcq", EXAMPLE, "--limit", "0"], 2, "--limit must be at least 1"),
    ]
    for args, code, message in cases:
        r = run_cli("eval", "-b", str(two_quant_bundle), *args)
        assert r.returncode == code and "Traceback" not in r.stderr, (args, r.stderr)
        (line,) = [ln for ln in r.stderr.splitlines() if "error:" in ln]
        assert message in line, (args, line)
    r = run_cli("eval", "-b", str(tmp_path / "nobundle"), "--mcq", EXAMPLE)
    assert r.returncode == 3 and "does not exist" in r.stderr
