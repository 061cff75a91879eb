"""Importance-matrix quants and the KL report, on the tiny twin.

The tiny twin's rows (64, 128) are not multiples of 256, so every K-quant and IQ tensor falls back
to a 32-wide type (Q4_K_M → q5_0, IQ4_XS → iq4_nl): what is meaningful here is the 32-wide
ladder (Q8_0, Q4_0, IQ4_XS→iq4_nl), the matrix being computed and used, and the KL figures'
order and sanity. Random weights: the matrix may help little; the tests don't claim it does.
"""

import hashlib
import json
import re

import pytest
from conftest import run_cli

from edge.bundle.gguf_header import read_header
from edge.bundle.manifest import open_bundle
from edge.errors import InputError, MissingDependency, UsageError
from export import calibration
from export.gguf import imatrix, llama_tools

QUANTS = ["F16", "Q8_0", "Q4_0", "IQ4_XS"]


@pytest.fixture(scope="module")
def tools():
    """The tools `make test` built (a failure naming the make target when they are missing)."""
    try:
        return llama_tools.find_tools()
    except MissingDependency as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def iq_export(tools, medgemma_twin, tmp_path_factory):
    """The twin exported through the CLI with the default importance matrix and the KL report."""
    root = tmp_path_factory.mktemp("imatrix") / "bundle"
    r = run_cli(
        "export", "medgemma", str(medgemma_twin), "-b", str(root), "--quant", ",".join(QUANTS),
        "--mmproj", "", "--imatrix", "default", "--no-fidelity", "--kl", "--threads", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return root, r.stdout


def _tensor_bytes(path, name: str) -> bytes:
    import gguf

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return bytes(t.data.tobytes())


def _kl(bundle):
    return open_bundle(bundle).component("medgemma")["fidelity"]["kl"]


def test_imatrix_is_in_the_bundle_with_its_text(iq_export):
    root, _ = iq_export
    comp = open_bundle(root).component("medgemma")
    (entry,) = [f for f in comp["files"] if f["role"] == "imatrix"]
    assert entry["path"] == "medgemma/imatrix.gguf" and len(entry["sha256"]) == 64
    shipped = calibration.path(calibration.CALIBRATION).read_bytes()
    text = entry["imatrix"]["text"]
    assert text["sha256"] == hashlib.sha256(shipped).hexdigest() and text["bytes"] == len(shipped)
    assert "invented" in text["origin"] and text["role"] == "imatrix"
    h = read_header(root / entry["path"])
    assert h.get("general.type") == "imatrix" and h.get("imatrix.datasets") == ["calibration.txt"]
    assert entry["imatrix"]["chunks"] == h.get("imatrix.chunk_count") >= 2
    assert entry["imatrix"]["tensors"] == 42  # every matrix of the 6 layers (7 each)
    for f in comp["files"]:
        if f["role"] == "text":
            assert f.get("imatrix") == ("medgemma/imatrix.gguf" if f["quant"] != "F16" else None)
    assert comp["export"]["imatrix"] == "medgemma/imatrix.gguf"
    assert comp["export"]["llama_tools"]["level"] == "x86-64-v3"
    assert [s["step"] for s in comp["export"]["steps"]][:3] == [
        "convert text f16",
        "imatrix",
        "quantize Q8_0",
    ]
    assert "with an importance matrix computed on calibration text" in (root / "NOTICE").read_text()
    assert open_bundle(root).verify(trust_stamp=False).ok


def test_the_matrix_changes_the_quantization(iq_export, tmp_path):
    from export.gguf.quantize import quantize

    root, _ = iq_export
    with_matrix = read_header(root / "medgemma/text-Q4_0.gguf")
    assert with_matrix.get("quantize.imatrix.dataset") == "calibration.txt"
    assert with_matrix.get("quantize.imatrix.file") == "imatrix.gguf"  # no workstation path
    assert with_matrix.get("quantize.imatrix.entries_count") == 42
    plain = quantize(root / "medgemma/text-F16.gguf", tmp_path / "plain.gguf", quant="Q4_0", threads=2)
    assert read_header(plain).get("quantize.imatrix.file") is None
    # the same tensors, rounded differently: the matrix moved the quantization
    a, b = (
        _tensor_bytes(plain, "blk.0.ffn_up.weight"),
        _tensor_bytes(root / "medgemma/text-Q4_0.gguf", "blk.0.ffn_up.weight"),
    )
    assert len(a) == len(b) and a != b
    types = open_bundle(root).file("medgemma", "text", quant="IQ4_XS")["gguf"]["tensor_types"]
    assert types.get("iq4_nl", 0) == 42  # IQ4_XS's 256-wide blocks fall back to iq4_nl here


def test_kl_report_is_sane(iq_export):
    root, _ = iq_export
    kl = _kl(root)
    held = calibration.path(calibration.HELDOUT).read_bytes()
    assert kl["reference"] == "F16" and kl["imatrix"] is True
    assert kl["text"]["sha256"] == hashlib.sha256(held).hexdigest() and kl["text"]["role"] == "kl-heldout"
    assert kl["chunks"] >= 2 and kl["positions"] == kl["chunks"] * (kl["ctx"] - 1 - kl["ctx"] // 2)
    rows = kl["rows"]
    assert list(rows) == QUANTS
    ref = rows["F16"]  # the reference against itself
    assert (
        abs(ref["mean_kl"]) < 1e-4
        and ref["same_top"] == 1.0
        and ref["ppl_vs_reference"] == pytest.approx(1, abs=1e-4)
    )
    assert (
        rows["Q8_0"]["mean_kl"] < rows["Q4_0"]["mean_kl"] and rows["Q8_0"]["kl_p99"] < rows["Q4_0"]["kl_p99"]
    )
    assert rows["Q8_0"]["same_top"] > rows["Q4_0"]["same_top"] > 0.5
    for q, row in rows.items():
        assert row["kl_p99"] >= row["mean_kl"] - 1e-6 and 0 < row["ppl_vs_reference"] < 2, q
        assert row["positions"] == kl["positions"], q


def test_export_and_verify_print_the_kl_table(iq_export):
    root, out = iq_export
    for text in (out, run_cli("verify", str(root)).stdout):
        assert "KL vs F16 over held-out text" in text and "importance matrix: yes" in text
        rows = {ln.split()[0]: ln for ln in text.splitlines() if re.match(r"\s+(F16|Q8_0|Q4_0|IQ4_XS)\s", ln)}
        assert list(rows) == QUANTS and "100.00%" in rows["F16"] and "KiB" in rows["Q8_0"]
    assert "medgemma/imatrix.gguf" in out and "importance matrix:" in out
    report = json.loads(run_cli("verify", str(root), "--json").stdout)
    assert list(report["kl"]["rows"]) == QUANTS


def test_iq_types_are_refused_without_an_imatrix(medgemma_twin, tmp_path):
    from export.gguf.convert import export_medgemma

    with pytest.raises(UsageError, match="IQ4_XS, IQ3_M need an importance matrix: add --imatrix default"):
        export_medgemma(medgemma_twin, bundle=tmp_path / "b", quants="Q8_0,IQ4_XS,IQ3_M", fidelity=False)
    r = run_cli("export", "medgemma", str(medgemma_twin), "-b", str(tmp_path / "b"), "--quant", "IQ3_M")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert "IQ3_M needs an importance matrix" in line
    assert list(tmp_path.iterdir()) == []


def test_a_users_text_stays_on_the_workstation(tools, iq_export, tmp_path):
    root, _ = iq_export
    mine = tmp_path / "ward-7-notes-2024.txt"
    mine.write_text(calibration.path(calibration.CALIBRATION).read_text()[:20000])
    ts = imatrix.text_set(str(mine))
    assert ts.calibration == mine and "path not recorded" in ts.calibration_info["origin"]
    assert "ward-7" not in json.dumps(ts.calibration_info)
    work = tmp_path / "work"
    work.mkdir()
    out = imatrix.compute(tools, root / "medgemma/text-F16.gguf", mine, work / "imatrix.gguf", threads=2)
    assert read_header(out).get("imatrix.datasets") == ["calibration.txt"]  # not the user's file name


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\xff\xfe\x00 not text", "is not UTF-8"),
        (None, "does not exist"),
    ],
)
def test_unusable_user_text_is_an_input_error(tmp_path, content, message):
    p = tmp_path / "cal.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(InputError, match=message):
        imatrix.text_set(str(p))


def test_too_short_text_is_refused_before_the_tool_runs(tools, iq_export, tmp_path):
    root, _ = iq_export
    short = tmp_path / "short.txt"
    short.write_text("Chest radiograph: no acute findings.\n")
    with pytest.raises(
        InputError, match=r"imatrix text is too short: \d+ tokens, llama-imatrix needs at least 1024"
    ):
        imatrix.compute(tools, root / "medgemma/text-F16.gguf", short, tmp_path / "imatrix.gguf")
    assert InputError.exit_code == 3 and not (tmp_path / "imatrix.gguf").exists()


def test_heldout_text_is_never_the_calibration_text():
    cal = calibration.path(calibration.CALIBRATION).read_text().split("\n\n")
    held = calibration.path(calibration.HELDOUT).read_text().split("\n\n")
    assert len(cal) > 40 and len(held) > 10 and not set(cal) & set(held)
    with pytest.raises(InputError, match="the same file"):
        imatrix.text_set(
            str(calibration.path(calibration.HELDOUT)), heldout=str(calibration.path(calibration.HELDOUT))
        )


def test_profiles_prefer_a_later_file_only_when_measured_better(iq_export):
    from edge.device import profiles

    root, _ = iq_export
    b = open_bundle(root)
    kl = _kl(root)["rows"]
    # on the twin, iq4_nl (IQ4_XS's fallback) is not closer than q4_0 at the same size: the order stands
    assert kl["IQ4_XS"]["mean_kl"] > kl["Q4_0"]["mean_kl"]
    name, s = profiles.medgemma_settings(b, "phone-4GB")
    assert (name, s.quant) == ("phone-4GB", "Q4_0")
    files = {"Q4_0": {"bytes": 100}, "IQ4_XS": {"bytes": 90}, "IQ3_M": {"bytes": 80}}
    rows = {
        "Q4_0": {"mean_kl": 0.05, "kl_p99": 0.5},
        "IQ4_XS": {"mean_kl": 0.04, "kl_p99": 0.4},
        "IQ3_M": {"mean_kl": 0.09, "kl_p99": 0.9},
    }
    assert profiles.measured_better("Q4_0", ["IQ4_XS", "IQ3_M"], files, rows) == "IQ4_XS"
    assert profiles.measured_better("Q4_0", ["IQ3_M"], files, rows) is None  # smaller but worse
    assert profiles.measured_better("Q4_0", ["IQ4_XS"], {**files, "IQ4_XS": {"bytes": 101}}, rows) is None
    assert profiles.measured_better("Q4_0", ["IQ4_XS"], files, {}) is None  # no report: the order stands
