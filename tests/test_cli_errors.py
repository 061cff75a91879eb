"""Every CLI verb, given bad flags, paths and combinations: one line on stderr and exit 2 or 3.

Each case is one real ``medgemma-edge`` process (``conftest.run_cli``); they run a few at a time
in one module fixture, then each case is its own parametrized test. The inputs are the usual
suspects of issue #14: missing paths, a directory where a file belongs, a FIFO, a Unix socket
and ``/dev/zero`` given as an image, a bundle, a manifest, a schema or an archive, numbers out
of range, unknown choices and flags that conflict. Nothing here builds a model: the bundles are
the session's (the imported Gemma 3 270M, the tiny MedGemma twin checkpoint) or hand-written
manifests, and every case must fail before any model loads.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_cli

from medgemma_edge.cli import COMMANDS

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero are POSIX")

EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# (id, argv). {T}: a scratch folder of special files, {B}: the 270M bundle, {TW}: the twin checkpoint.
CASES: list[tuple[str, list[str]]] = [
    ("no-such-verb", ["frobnicate"]),
    # twin
    ("twin-unknown-model", ["twin", "llama", "--out", "{T}/t1"]),
    ("twin-out-is-dev-zero", ["twin", "medsiglip", "--out", "/dev/zero"]),
    ("twin-seed-not-a-number", ["twin", "medsiglip", "--seed", "abc", "--out", "{T}/t2"]),
    # export medgemma
    (
        "export-quant-F16-outtype-f32",
        ["export", "medgemma", "{TW}", "--bundle", "{T}/e1", "--quant", "F16", "--outtype", "f32"],
    ),
    ("export-unknown-quant", ["export", "medgemma", "{TW}", "--bundle", "{T}/e2", "--quant", "Q9_X"]),
    ("export-outtype-choice", ["export", "medgemma", "{TW}", "--bundle", "{T}/e3", "--outtype", "f8"]),
    ("export-src-missing", ["export", "medgemma", "{T}/nope", "--bundle", "{T}/e4"]),
    ("export-config-is-fifo", ["export", "medgemma", "{T}/ckpt-fifo", "--bundle", "{T}/e5"]),
    ("export-config-not-object", ["export", "medgemma", "{T}/ckpt-list", "--bundle", "{T}/e6"]),
    ("export-bundle-is-dev-zero", ["export", "medgemma", "{TW}", "--bundle", "/dev/zero"]),
    ("export-threads-negative", ["export", "medgemma", "{TW}", "--bundle", "{T}/e7", "--threads", "-5"]),
    (
        "export-vision-onnx-unknown",
        ["export", "medgemma", "{TW}", "--bundle", "{T}/e8", "--vision-onnx", "int3"],
    ),
    # export medsiglip
    ("export-medsiglip-src-fifo", ["export", "medsiglip", "{T}/fifo", "--bundle", "{T}/e9"]),
    (
        "export-medsiglip-precision",
        ["export", "medsiglip", "{TW}", "--bundle", "{T}/e10", "--precision", "int4"],
    ),
    (
        "export-medsiglip-fidelity-0",
        ["export", "medsiglip", "{TW}", "--bundle", "{T}/e11", "--fidelity-images", "0"],
    ),
    ("export-medsiglip-no-bundle", ["export", "medsiglip", "{TW}"]),
    # import
    ("import-gguf-dev-zero", ["import", "medgemma", "/dev/zero", "--bundle", "{T}/i1"]),
    ("import-gguf-is-png", ["import", "medgemma", "{T}/a.png", "--bundle", "{T}/i2"]),
    ("import-kind-choice", ["import", "llama", "{T}/a.png", "--bundle", "{T}/i3"]),
    # verify
    ("verify-bundle-fifo", ["verify", "{T}/fifo"]),
    ("verify-manifest-fifo", ["verify", "{T}/bm-fifo"]),
    ("verify-manifest-dev-zero", ["verify", "{T}/bm-zero"]),
    ("verify-manifest-dir", ["verify", "{T}/bm-dir"]),
    ("verify-manifest-list", ["verify", "{T}/bm-list", "--json"]),
    ("verify-model-file-fifo", ["verify", "{T}/bm-fifofile"]),
    # ask
    ("ask-image-dev-zero", ["ask", "q", "--image", "/dev/zero"]),
    ("ask-image-fifo", ["ask", "q", "--image", "{T}/fifo"]),
    ("ask-image-dir", ["ask", "q", "--image", "{T}/dir"]),
    ("ask-image-socket", ["ask", "q", "--image", "{T}/sock"]),
    ("ask-schema-fifo", ["ask", "q", "--schema", "{T}/fifo"]),
    ("ask-schema-dev-zero", ["ask", "q", "--schema", "/dev/zero"]),
    ("ask-schema-bad-json", ["ask", "q", "--schema", "{T}/bad.json"]),
    ("ask-bundle-fifo", ["ask", "q", "-b", "{T}/fifo"]),
    ("ask-ctx-0", ["ask", "q", "-b", "{B}", "--ctx", "0"]),
    ("ask-max-tokens-negative", ["ask", "q", "-b", "{B}", "--max-tokens", "-1"]),
    ("ask-threads-negative", ["ask", "q", "-b", "{B}", "--threads", "-5"]),
    ("ask-temperature-nan", ["ask", "q", "-b", "{B}", "--temperature", "nan"]),
    ("ask-kv-type-choice", ["ask", "q", "-b", "{B}", "--kv-type", "f8"]),
    # bench
    ("bench-tokens-0", ["bench", "-b", "{B}", "--tokens", "0"]),
    ("bench-history-dir", ["bench", "-b", "{B}", "--history", "{T}/dir"]),
    # classify
    ("classify-labels-and-set", ["classify", "{T}/a.png", "--labels", "a", "--label-set", "cxr"]),
    ("classify-empty-labels", ["classify", "{T}/a.png", "-b", "{B}", "--labels", ",,"]),
    ("classify-image-dev-zero", ["classify", "/dev/zero", "-b", "{B}"]),
    # index
    ("index-add-no-index", ["index", "add", "{T}/a.png", "-b", "{B}"]),
    ("index-add-fifo", ["index", "--index", "{T}/x1", "add", "{T}/fifo", "-b", "{B}"]),
    ("index-info-fifo", ["index", "--index", "{T}/fifo", "info"]),
    ("index-export-over-dev-zero", ["index", "--index", "{T}/x2", "export", "/dev/zero"]),
    ("index-import-dev-zero", ["index", "--index", "{T}/x3", "import", "/dev/zero"]),
    ("index-import-fifo", ["index", "--index", "{T}/x4", "import", "{T}/fifo"]),
    ("index-import-symlink-member", ["index", "--index", "{T}/x5", "import", "{T}/symlink.tar"]),
    ("index-import-not-a-tar", ["index", "--index", "{T}/x6", "import", "{T}/junk.tar"]),
    # search
    ("search-k-0", ["search", "--k", "0", "--text", "x", "--index", "{T}/x7", "-b", "{B}"]),
    ("search-k-not-a-number", ["search", "--k", "abc", "--text", "x"]),
    ("search-image-and-text", ["search", "{T}/a.png", "--text", "x"]),
    # lan
    ("lan-no-endpoint-file", ["lan", "--endpoint-file", "{T}/nope.json", "devices"]),
    ("lan-endpoint-dev-zero", ["lan", "--endpoint-file", "/dev/zero", "devices"]),
    ("lan-revoke-no-id", ["lan", "revoke"]),
    ("serve-lan-and-stdio", ["serve", "-b", "{B}", "--lan", "--stdio"]),
    ("serve-lan-flag-without-lan", ["serve", "-b", "{B}", "--lan-queue", "4"]),
    ("serve-lan-rate-zero", ["serve", "-b", "{B}", "--lan", "--lan-rate", "0"]),
    ("serve-lan-no-data", ["serve", "-b", "{B}", "--lan", "--no-data"]),
    # serve (every case must fail before it would listen)
    ("serve-bundle-dev-zero", ["serve", "-b", "/dev/zero"]),
    ("serve-max-body-not-a-size", ["serve", "-b", "{B}", "--max-body", "lots"]),
    ("serve-port-out-of-range", ["serve", "-b", "{B}", "--port", "70000"]),
    ("serve-stdio-and-unix-socket", ["serve", "-b", "{B}", "--stdio", "--unix-socket", "{T}/s"]),
    ("serve-dicom-port-out-of-range", ["serve", "-b", "{B}", "--dicom-port", "70000"]),
    ("serve-ae-title-too-long", ["serve", "-b", "{B}", "--dicom-port", "0", "--ae-title", "A" * 17]),
    ("serve-allow-peer-not-an-address", ["serve", "-b", "{B}", "--dicom-port", "0", "--allow-peer", "x.y"]),
    ("serve-pacs-no-port", ["serve", "-b", "{B}", "--pacs", "pacs.local"]),
    ("serve-fhir-url-not-http", ["serve", "-b", "{B}", "--fhir-url", "file:///etc/passwd"]),
    ("serve-index-received-no-index", ["serve", "-b", "{B}", "--index-received"]),
    ("serve-data-is-dev-zero", ["serve", "-b", "{B}", "--data", "/dev/zero", "--dicom-port", "0"]),
    # dicom
    ("dicom-listen-port-out-of-range", ["dicom", "listen", "--port", "70000", "--data", "{T}/d1"]),
    ("dicom-listen-data-dev-zero", ["dicom", "listen", "--port", "0", "--data", "/dev/zero"]),
    ("dicom-import-missing", ["dicom", "import", "{T}/nope", "--data", "{T}/d2"]),
    ("dicom-import-fifo", ["dicom", "import", "{T}/fifo", "--data", "{T}/d3"]),
    ("dicom-list-limit-0", ["dicom", "list", "--limit", "0", "--data", "{T}/d4"]),
    ("dicom-list-bad-date", ["dicom", "list", "--from", "yesterday", "--data", "{T}/d5"]),
    # report
    (
        "report-export-unknown",
        ["report", "export", "rpt-0000", "--format", "pdf", "--out", "{T}/r.pdf", "--data", "{T}/r1"],
    ),
    ("report-export-format-choice", ["report", "export", "rpt-0000", "--format", "docx", "--out", "{T}/r.x"]),
    ("report-send-no-destination", ["report", "send", "rpt-0000", "--data", "{T}/r2"]),
    ("report-list-data-fifo", ["report", "list", "--data", "{T}/fifo"]),
    (
        "export-imatrix-missing",
        ["export", "medgemma", "{TW}", "--bundle", "{T}/e11", "--imatrix", "{T}/nope.txt"],
    ),
    ("export-iq-without-imatrix", ["export", "medgemma", "{TW}", "--bundle", "{T}/e12", "--quant", "IQ3_M"]),
    # archive
    ("archive-src-missing", ["archive", "index", "{T}/nope", "--out", "{T}/arch", "-b", "{B}"]),
    ("archive-no-bundle", ["archive", "index", "{T}", "--out", "{T}/arch"]),
    ("archive-info-not-archive", ["archive", "info", "{T}"]),
    (
        "index-import-archive-not-archive",
        ["index", "--index", "{T}/x8", "import-archive", "{T}", "-b", "{B}"],
    ),
    # eval
    ("eval-mcq-missing", ["eval", "-b", "{B}", "--mcq", "{T}/nope.jsonl"]),
    ("eval-mcq-fifo", ["eval", "-b", "{B}", "--mcq", "{T}/fifo"]),
    ("eval-mcq-dev-zero", ["eval", "-b", "{B}", "--mcq", "/dev/zero"]),
    ("eval-mcq-not-json", ["eval", "-b", "{B}", "--mcq", "{T}/bad.json"]),
    ("eval-limit-0", ["eval", "-b", "{B}", "--mcq", "{T}/q.jsonl", "--limit", "0"]),
    ("eval-unknown-quant", ["eval", "-b", "{B}", "--mcq", "{T}/q.jsonl", "--quant", "Q6_K"]),
    # demo
    ("demo-threads-negative", ["demo", "--threads", "-5"]),
    ("demo-root-dev-zero", ["demo", "--root", "/dev/zero"]),
]


def _bundle(root: Path, manifest: str | None = None) -> Path:
    root.mkdir()
    if manifest is not None:
        (root / "manifest.json").write_text(manifest)
    return root


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The special files and broken inputs the cases name."""
    t = tmp_path_factory.mktemp("cli-errors")
    os.mkfifo(t / "fifo")
    (t / "dir").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(t / "sock"))
    from PIL import Image

    Image.new("RGB", (8, 8)).save(t / "a.png")
    (t / "bad.json").write_text("{not json")
    question = {"question": "Which is a bone?", "options": {"A": "femur", "B": "liver"}, "answer_idx": "A"}
    (t / "q.jsonl").write_text(json.dumps(question) + "\n")
    os.mkfifo(_bundle(t / "bm-fifo") / "manifest.json")
    (_bundle(t / "bm-zero") / "manifest.json").symlink_to("/dev/zero")
    (_bundle(t / "bm-dir") / "manifest.json").mkdir()
    _bundle(t / "bm-list", "[]")
    entry = {
        "path": "medgemma/text-Q8_0.gguf",
        "role": "text",
        "quant": "Q8_0",
        "bytes": 0,
        "sha256": EMPTY_SHA,
    }
    fifofile = _bundle(
        t / "bm-fifofile",
        json.dumps({"format": "medgemma-edge-bundle/1", "components": {"medgemma": {"files": [entry]}}}),
    )
    (fifofile / "medgemma").mkdir()
    os.mkfifo(fifofile / "medgemma" / "text-Q8_0.gguf")  # size 0 = the manifest's: only its type tells
    os.mkfifo(_bundle(t / "ckpt-fifo") / "config.json")
    _bundle(t / "ckpt-list", "[]")
    with tarfile.open(t / "symlink.tar", "w") as tar:
        man = json.dumps(
            {"format": "medgemma-edge-cases-export/1", "files": {"cases.sqlite": {"bytes": 0, "sha256": "0"}}}
        ).encode()
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(man)
        tar.addfile(ti, io.BytesIO(man))
        link = tarfile.TarInfo("cases.sqlite")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    (t / "junk.tar").write_bytes(b"not a tar archive " * 64)
    yield t
    sock.close()


@pytest.fixture(scope="module")
def results(scratch, small_model_bundle, medgemma_twin) -> dict[str, subprocess.CompletedProcess | str]:
    """Every case run once, three processes at a time: id -> the finished process (or "timeout")."""
    env = {
        "MEDGEMMA_EDGE_BUNDLE": "",  # no default bundle from the caller's environment
        "XDG_STATE_HOME": str(scratch / "state"),
        "XDG_CACHE_HOME": str(scratch / "cache"),
    }
    subs = {"{T}": str(scratch), "{B}": str(small_model_bundle), "{TW}": str(medgemma_twin)}

    def run(argv: list[str]):
        for k, v in subs.items():
            argv = [a.replace(k, v) for a in argv]
        try:
            return run_cli(*argv, env=env, timeout=60)
        except subprocess.TimeoutExpired:
            return "timeout"

    with ThreadPoolExecutor(3) as pool:
        return dict(zip([c[0] for c in CASES], pool.map(run, [c[1] for c in CASES]), strict=True))


def _message_lines(stderr: str) -> list[str]:
    """stderr without blank lines, argparse's usage block and informational ``note:`` lines."""
    lines, in_usage = [], False
    for line in stderr.splitlines():
        if not line.strip():
            continue
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and line.startswith(" "):  # the usage line's continuation
            continue
        in_usage = False
        if not line.startswith("note:"):
            lines.append(line)
    return lines


def test_every_verb_has_cases():
    verbs = {argv[0] for _, argv in CASES}
    assert set(COMMANDS) <= verbs
    exported = {argv[1] for _, argv in CASES if argv[0] == "export"}
    acts = {"add", "info", "export", "import", "import-archive"}
    actions = {next(a for a in argv if a in acts) for _, argv in CASES if argv[0] == "index"}
    assert exported == {"medgemma", "medsiglip"} and actions == acts


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2_or_3(results, case):
    r = results[case]
    assert r != "timeout", f"{case}: still running after 60 s (it should have failed at once)"
    assert "Traceback" not in r.stderr, f"{case}: a traceback\n{r.stderr}"
    assert r.returncode in (2, 3), f"{case}: exit {r.returncode}\n{r.stderr}"
    lines = _message_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("medgemma-edge"), (
        f"{case}: stderr is not one line\n{r.stderr}"
    )
