"""llama.cpp's tools (llama-imatrix, llama-quantize, llama-perplexity): the cached build, finding
them, and the one-line errors when they are missing or built for another CPU."""

import json
import os
import subprocess
import time

import pytest
from conftest import ROOT, run_cli

from edge.errors import EdgeError, MissingDependency
from export.gguf import llama_tools
from export.gguf.kl import parse_kl


@pytest.fixture(scope="module")
def llama_tools_dir():
    """The tools `make test` built (a failure naming the make target when they are missing)."""
    try:
        return llama_tools.find_tools()
    except MissingDependency as exc:
        pytest.fail(str(exc))


@pytest.fixture
def no_tools(tmp_path, monkeypatch):
    """A pip cache with no tools in it (and no override)."""
    monkeypatch.delenv(llama_tools.ENV, raising=False)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip"))
    llama_tools.pip_cache_dir.cache_clear()
    yield tmp_path / "pip" / llama_tools.CACHE_SUBDIR
    llama_tools.pip_cache_dir.cache_clear()


def test_the_tools_are_built_and_run(llama_tools_dir):
    for name in llama_tools.TOOLS:
        r = subprocess.run(
            [str(llama_tools_dir.path(name)), "--help"], capture_output=True, text=True, timeout=60
        )
        assert "usage" in (r.stdout + r.stderr).lower(), name
    info = llama_tools_dir.info
    assert info["origin"] == "cache" and info["llama_cpp_python"] == "0.3.36"
    assert info["level"] == "x86-64-v3" and set(info["requires"].split()) == {"avx2", "fma", "f16c", "bmi2"}
    assert "-DGGML_NATIVE=OFF" in info["cmake_flags"] and info["build_seconds"] > 0
    assert info["patch"] == "flush-log-1"  # the tools drain their log before exiting


def test_second_make_does_not_rebuild(llama_tools_dir):
    # first ask without building: a test must never start a build (it takes minutes)
    check = subprocess.run(
        ["make", "--no-print-directory", "llama-tools"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLAMA_TOOLS_CHECK": "1"},
    )
    if check.returncode != 0:
        pytest.fail(
            f"llama.cpp's tools are not built for the current build script: run `make llama-tools` ({check.stdout.strip()})"
        )
    t0 = time.perf_counter()
    r = subprocess.run(
        ["make", "--no-print-directory", "llama-tools"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "cached in" in r.stdout and "building" not in r.stdout
    assert str(llama_tools_dir.bin.parent) in r.stdout
    assert time.perf_counter() - t0 < 20


def test_build_script_refuses_an_unknown_cpu_level(tmp_path):
    r = subprocess.run(
        ["sh", "scripts/build-llama-tools.sh", "0.3.36", str(tmp_path), "python3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "LLAMA_TOOLS_CPU": "fastest"},
        timeout=30,
    )
    assert r.returncode == 2 and "LLAMA_TOOLS_CPU must be portable or native" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_tools_name_the_make_target(no_tools):
    with pytest.raises(MissingDependency, match="not built") as e:
        llama_tools.find_tools()
    assert "make llama-tools" in str(e.value) and llama_tools.ENV in str(e.value)


def test_tools_built_for_another_cpu_are_refused(no_tools):
    d = no_tools / "llama-tools-0.3.36-x86-64-v9-00000000"
    (d / "bin").mkdir(parents=True)
    for name in llama_tools.TOOLS:
        (d / "bin" / name).write_text("#!/bin/sh\n")
        (d / "bin" / name).chmod(0o755)
    (d / "BUILD-INFO.json").write_text(json.dumps({"cpu": "portable", "requires": "avx9000"}))
    with pytest.raises(MissingDependency, match="built for another CPU.*avx9000.*make llama-tools"):
        llama_tools.find_tools()


def test_override_directory_must_hold_all_three(tmp_path, monkeypatch, llama_tools_dir):
    monkeypatch.setenv(llama_tools.ENV, str(tmp_path))
    with pytest.raises(MissingDependency, match="has no executable llama-imatrix, llama-quantize"):
        llama_tools.find_tools()
    monkeypatch.setenv(llama_tools.ENV, str(llama_tools_dir.bin))
    found = llama_tools.find_tools()
    assert found.bin == llama_tools_dir.bin and found.describe()["origin"] == llama_tools.ENV


def test_a_failing_tool_is_one_line_with_its_error(llama_tools_dir, tmp_path):
    with pytest.raises(EdgeError, match=r"llama-perplexity failed testing \(exit \d+\): .*") as e:
        llama_tools.run_tool(
            llama_tools_dir, "llama-perplexity", ["-m", str(tmp_path / "none.gguf")], what="testing"
        )
    assert "\n" not in str(e.value)


def test_export_with_imatrix_and_no_tools_is_one_line_exit_2(medgemma_twin, tmp_path, no_tools):
    r = run_cli(
        "export",
        "medgemma",
        str(medgemma_twin),
        "-b",
        str(tmp_path / "b"),
        "--imatrix",
        "--quant",
        "Q4_0",
        env={"PIP_CACHE_DIR": str(tmp_path / "pip")},
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert "make llama-tools" in line
    assert not (tmp_path / "b").exists()


SUMMARY = """
kl_divergence: computing over 11 chunks, n_ctx=512, batch_size=2048, n_seq=4
====== Perplexity statistics ======
Mean PPL(Q)                   : 4115.410325 ± 127.811923
Mean PPL(base)                : 3999.829619 ± 123.201432
Mean PPL(Q)/PPL(base)         :   1.028896 ±   0.007739
====== KL divergence statistics ======
Mean    KLD:   0.076718 ±   0.000715
Maximum KLD:   0.361845
99.0%   KLD:   0.220811
Median  KLD:   0.068750
Same top p: 77.124 ± 0.759 %
"""


def test_kl_summary_is_parsed():
    row = parse_kl(SUMMARY)
    assert row["mean_kl"] == 0.076718 and row["mean_kl_err"] == 0.000715
    assert row["kl_p99"] == 0.220811 and row["kl_max"] == 0.361845
    assert row["same_top"] == pytest.approx(0.77124) and row["ppl_ratio"] == 1.028896
    assert (row["chunks"], row["ctx"], row["positions"]) == (11, 512, 11 * 255)
    with pytest.raises(EdgeError, match="no 'kl_p99' figure"):
        parse_kl(SUMMARY.replace("99.0%", "98.0%"))
    with pytest.raises(EdgeError, match="not a number"):
        parse_kl(SUMMARY.replace("0.076718", "nan"))


def test_a_model_id_resolves_from_the_local_cache_only(medgemma_twin, tmp_path):
    import shutil

    from export.gguf import hub

    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    r = run_cli("export", "medgemma", "google/medgemma-1.5-4b-it", "-b", str(tmp_path / "b"), env=env)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert "not in the Hugging Face cache" in line and "never downloads" in line
    assert "accept the model's terms at https://huggingface.co/google/medgemma-1.5-4b-it" in line
    assert not (tmp_path / "b").exists()

    repo = tmp_path / "hub" / "models--google--medgemma-4b-it"
    shutil.copytree(medgemma_twin, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants as c

    old = c.HF_HUB_CACHE
    c.HF_HUB_CACHE = str(tmp_path / "hub")
    try:
        got = hub.resolve("google/medgemma-4b-it")
    finally:
        c.HF_HUB_CACHE = old
    assert got == repo / "snapshots" / "abc123" and (got / "config.json").is_file()
    assert hub.looks_like_repo_id("google/medgemma-4b-it") and not hub.looks_like_repo_id(str(tmp_path))


def test_tables_print_the_perplexity_over_the_references_own():
    from medgemma_edge.verify import kl_table_lines, ppl_ratio

    # the tool's ratio takes PPL(base) from the clipped saved reference: F16 vs itself read 1.85
    row = {"mean_kl": 0.0, "kl_p99": 0.0, "same_top": 1.0, "ppl": 6587146.56, "ppl_ratio": 1.852789}
    old = {"reference": "F16", "chunks": 11, "ctx": 512, "positions": 2805, "ppl_reference": 6587146.56}
    assert ppl_ratio(old, row) == pytest.approx(1.0)  # a manifest from before ppl_vs_reference
    assert ppl_ratio({}, {**row, "ppl_vs_reference": 0.9994}) == 0.9994
    assert ppl_ratio({}, {"ppl_ratio": 1.028896}) == 1.028896
    lines = kl_table_lines({**old, "rows": {"F16": row}})
    assert lines[-1].split()[-1] == "1.0000"
