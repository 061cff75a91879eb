"""The similar-case index on the tiny twin bundle: add, resume after SIGKILL, search, errors, transfer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from edge.cases.index import CaseIndex
from edge.cases.ingest import iter_files
from edge.cases.transfer import export_index, import_index
from edge.errors import Cancelled, InputError, UsageError
from edge.medsiglip.model import MedSigLIP
from medgemma_edge import cli

CORRUPT = b"\x89PNG\r\n\x1a\n" + bytes(30)


def _n_images(folder: Path) -> int:
    return sum(1 for _ in iter_files([folder]))


def test_add_skips_duplicates_and_reports_corrupt_files(fresh_index, int8_encoder, cases_samples, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(cases_samples, folder)
    n = _n_images(folder)
    shutil.copyfile(folder / "film" / "film-0.png", folder / "film" / "same-bytes.png")
    (folder / "film" / "broken.png").write_bytes(CORRUPT)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(CORRUPT)  # hidden files are not picked up
    seen = []
    rep = fresh_index.add(
        [folder], encoder=int8_encoder, meta={"site": "A"}, progress=lambda d, t: seen.append((d, t))
    )
    assert (rep.files, rep.added, rep.duplicates) == (n + 3, n, 1)
    assert sorted(Path(p).name for p, _ in rep.failed) == ["broken.png", "notes.txt"]
    assert all("is not an image" in e for _, e in rep.failed)
    assert seen[-1] == (n + 3, n + 3) and rep.total == fresh_index.count() == n
    again = fresh_index.add([folder / "film", folder / "dicom" / "CT_small.dcm"], encoder=int8_encoder)
    assert again.added == 0 and again.duplicates == 4 + 1 + 1  # films, the same-bytes copy, CT_small
    meta = dict(fresh_index.conn.execute("SELECT key, COUNT(*) FROM case_meta GROUP BY key"))
    assert meta == {"format": n, "site": n, "modality": 2}  # DICOM modality comes from the file


def test_cancel_keeps_committed_batches_and_resume_adds_the_rest(fresh_index, int8_encoder, cases_samples):
    cancel = threading.Event()

    def progress(done, total):
        if fresh_index.count() >= 4:  # the first batch is committed: the user presses stop
            cancel.set()

    with pytest.raises(Cancelled, match="re-run the same add to resume"):
        fresh_index.add([cases_samples], encoder=int8_encoder, batch_size=4, cancel=cancel, progress=progress)
    assert fresh_index.count() == 4
    rep = fresh_index.add([cases_samples], encoder=int8_encoder, batch_size=4)
    assert (rep.added, rep.duplicates) == (_n_images(cases_samples) - 4, 4)


def test_on_added_runs_inside_the_batch_transaction(fresh_index, int8_encoder, cases_samples):
    counts = []

    def on_added(n):
        counts.append(n)
        if n == 6:  # inside the second batch of 4: raising rolls that batch back
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fresh_index.add([cases_samples], encoder=int8_encoder, batch_size=4, on_added=on_added)
    assert counts == [1, 2, 3, 4, 5, 6] and fresh_index.count() == 4


def test_search_by_image_and_text_with_filters(fresh_index, int8_encoder, cases_samples):
    for kind in ("film", "skin", "fundus", "dicom"):
        fresh_index.add([cases_samples / kind], encoder=int8_encoder, meta={"kind": kind})
    query = cases_samples / "skin" / "skin-2.jpg"
    hits = fresh_index.search_image(query, encoder=int8_encoder, k=3)
    assert len(hits) == 3 and hits[0].content == str(query.resolve())
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[0].metadata["kind"] == "skin"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # brute force is exact: the ranking equals a direct cosine over every stored vector
    q = int8_encoder.embed_images([query])[0]
    rows = fresh_index.conn.execute("SELECT id, embedding FROM cases").fetchall()
    direct = sorted(((float(np.frombuffer(e, "<f4") @ q), i) for i, e in rows), reverse=True)[:3]
    assert [h.id for h in hits] == [i for _, i in direct]
    films = fresh_index.search_image(query, encoder=int8_encoder, k=50, where={"kind": "film"})
    assert len(films) == 4 and {h.metadata["kind"] for h in films} == {"film"}
    ct = fresh_index.search_text(
        "a ct scan", encoder=int8_encoder, k=5, where={"kind": "dicom", "modality": "CT"}
    )
    assert [Path(h.content).name for h in ct] == ["CT_small.dcm"]
    assert fresh_index.search_text("x", encoder=int8_encoder, k=2, where={"kind": "none"}) == []
    all_hits = fresh_index.search_text("a chest x-ray", encoder=int8_encoder, k=100)
    assert len(all_hits) == fresh_index.count() == 14


def test_matrix_cache_sees_writes_from_another_connection(tmp_path, int8_encoder, cases_samples):
    root = tmp_path / "idx"
    with (
        CaseIndex.open(root, encoder=int8_encoder, create=True) as a,
        CaseIndex.open(root, encoder=int8_encoder) as b,
    ):
        a.add([cases_samples / "film"], encoder=int8_encoder)
        q = cases_samples / "fundus" / "fundus-1.png"
        assert a.search_image(q, encoder=int8_encoder, k=1)[0].score < 0.9999
        b.add([q], encoder=int8_encoder)  # another connection (as another process would)
        top = a.search_image(q, encoder=int8_encoder, k=1)[0]
        assert top.content == str(q.resolve()) and top.score == pytest.approx(1.0, abs=1e-5)
        b.conn.execute("DELETE FROM cases WHERE id = ?", (top.id,))  # not an API: a full reload
        assert top.id not in {h.id for h in a.search_image(q, encoder=int8_encoder, k=10)}
        assert len(a.embeddings()[0]) == a.count() == 4


def test_errors_empty_other_bundle_and_k(tmp_path, int8_encoder, medsiglip_ext_bundle, cases_samples):
    root = tmp_path / "idx"
    with CaseIndex.open(root, encoder=int8_encoder, create=True) as idx:
        with pytest.raises(InputError, match="is empty; add images first"):
            idx.search_text("x", encoder=int8_encoder)
        idx.add([cases_samples / "film"], encoder=int8_encoder)
        for k in (0, -3):
            with pytest.raises(UsageError, match="k must be"):
                idx.search_image(cases_samples / "film" / "film-0.png", encoder=int8_encoder, k=k)
    other = MedSigLIP(medsiglip_ext_bundle, precision="int8", towers=("vision",))
    assert other.fingerprint != int8_encoder.fingerprint
    with pytest.raises(InputError, match="built with another MedSigLIP encoder"):
        CaseIndex.open(root, encoder=other)
    fp32 = MedSigLIP(int8_encoder.bundle, precision="fp32", towers=("vision",))
    with pytest.raises(InputError, match="another MedSigLIP encoder"):  # same bundle, other precision
        CaseIndex.open(root, encoder=fp32)
    with pytest.raises(InputError, match="not a case index"):
        CaseIndex.open(tmp_path / "nothing")


def _cli(*args: str, capsys) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_exit_codes_and_json(tmp_path, medsiglip_bundle, medsiglip_ext_bundle, cases_samples, capsys):
    b, idx = str(medsiglip_bundle), str(tmp_path / "idx")
    img = str(cases_samples / "film" / "film-1.png")
    rc, out, err = _cli("classify", "-b", b, img, capsys=capsys)
    assert rc == 0 and "not probabilities of disease" in out and "rank" in out
    rc, out, _ = _cli("classify", "-b", b, img, "--labels", "effusion, normal ,", "--json", capsys=capsys)
    res = json.loads(out)
    assert rc == 0 and sorted(r["label"] for r in res["results"]) == ["effusion", "normal"]
    rc, _, err = _cli("index", "-b", b, "--index", idx, "add", str(cases_samples / "dicom"), capsys=capsys)
    assert rc == 0
    with CaseIndex.open(idx) as i:  # emptied again, to test the message on an existing empty index
        i.conn.execute("DELETE FROM cases")
    rc, _, err = _cli("search", "-b", b, "--index", idx, "--text", "x", capsys=capsys)
    assert rc == 3 and err.count("\n") == 1 and "is empty" in err
    _cli(
        "index",
        "-b",
        b,
        "--index",
        idx,
        "add",
        str(cases_samples / "film"),
        "--meta",
        "kind=film",
        capsys=capsys,
    )
    rc, _, err = _cli("search", "-b", b, "--index", idx, img, "--k", "0", capsys=capsys)
    assert rc == 2 and "k must be" in err
    rc, _, err = _cli("search", "-b", str(medsiglip_ext_bundle), "--index", idx, img, capsys=capsys)
    assert rc == 3 and "another MedSigLIP encoder" in err and err.count("\n") == 1
    rc, out, _ = _cli(
        "search", "-b", b, "--index", idx, img, "--k", "2", "--where", "kind=film", "--json", capsys=capsys
    )
    res = json.loads(out)
    assert rc == 0 and len(res["results"]) == 2 and res["results"][0]["content"].endswith("film-1.png")
    rc, out, _ = _cli("index", "--index", idx, "add", str(tmp_path / "missing"), "-b", b, capsys=capsys)
    assert rc == 3
    rc, out, _ = _cli("index", "--index", idx, "info", "--json", capsys=capsys)
    assert rc == 0 and json.loads(out)["cases"] == 4


HOLD_AT = 6  # the kill lands inside the second transaction (batch size 4)

# Adds a folder through the public API and, when case HOLD_AT is inserted (inside its batch's
# open transaction: on_added runs before the commit), signals the test and waits to be killed.
ADD_AND_HOLD = """
import os, sys, time
from pathlib import Path
from edge.cases.index import CaseIndex
from edge.medsiglip.model import MedSigLIP
bundle, root, folder, marker, hold_at = sys.argv[1:6]
enc = MedSigLIP(bundle, towers=("vision",))

def on_added(n):
    if n == int(hold_at):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(120)

with CaseIndex.open(root, encoder=enc, create=True) as idx:
    idx.add([folder], encoder=enc, copy=True, batch_size=4, on_added=on_added)
"""


def test_sigkill_mid_transaction_then_resume(tmp_path, medsiglip_bundle, int8_encoder, cases_samples):
    folder = tmp_path / "in"
    shutil.copytree(cases_samples, folder)
    (folder / "skin" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + bytes(40))
    n = _n_images(folder) - 1
    root, marker = tmp_path / "idx", tmp_path / "holding"
    args = [str(medsiglip_bundle), str(root), str(folder), str(marker), str(HOLD_AT)]
    proc = subprocess.Popen([sys.executable, "-c", ADD_AND_HOLD, *args], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the add never reached the hold point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # a real kill, in the middle of a write transaction
    assert proc.wait(30) == -signal.SIGKILL
    proc.stderr.close()

    with sqlite3.connect(root / "cases.sqlite") as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = c.execute("SELECT id, content_hash, stored, length(embedding) FROM cases").fetchall()
        orphans = c.execute(
            "SELECT COUNT(*) FROM case_meta WHERE case_id NOT IN (SELECT id FROM cases)"
        ).fetchone()
    assert len(rows) == 4  # the first batch, whole; nothing of the second
    assert orphans == (0,)
    assert all(blob == 4 * int8_encoder.dim and (root / stored).is_file() for _, _, stored, blob in rows)
    assert not list(root.rglob("*.tmp-*"))

    with CaseIndex.open(root, encoder=int8_encoder) as idx:
        rep = idx.add([folder], encoder=int8_encoder, copy=True)
        assert (rep.added, rep.duplicates, len(rep.failed)) == (n - 4, 4, 1)
        assert idx.count() == n
        hashes = [h for (h,) in idx.conn.execute("SELECT content_hash FROM cases")]
        assert len(set(hashes)) == n
        first = {r[0]: r[1] for r in rows}
        kept = dict(
            idx.conn.execute(
                f"SELECT id, content_hash FROM cases WHERE id IN ({','.join('?' * 4)})", list(first)
            )
        )
        assert kept == first  # committed rows untouched by the resume


def test_export_import_round_trip(tmp_path, int8_encoder, medsiglip_ext_bundle, cases_samples):
    src = tmp_path / "a"
    with CaseIndex.open(src, encoder=int8_encoder, create=True) as idx:
        idx.add([cases_samples / "film"], encoder=int8_encoder, meta={"site": "A"}, copy=True)
        idx.add([cases_samples / "dicom"], encoder=int8_encoder, meta={"site": "B"})
        idx.conn.execute("DELETE FROM cases WHERE id = 2")  # ids need not be contiguous
        before = idx.conn.execute(
            "SELECT id, content_hash, source, stored, embedding FROM cases ORDER BY id"
        ).fetchall()
        meta_before = idx.conn.execute("SELECT * FROM case_meta ORDER BY case_id, key").fetchall()
    archive = tmp_path / "moved.tar"
    man = export_index(src, archive)
    assert man["cases"] == len(before) == 5 and man["max_id"] == 6
    with pytest.raises(UsageError, match="exists"):
        export_index(src, archive)
    dst = tmp_path / "device2" / "index"
    import_index(archive, dst, fingerprint=int8_encoder.fingerprint)
    with CaseIndex.open(dst, encoder=int8_encoder) as idx:
        after = idx.conn.execute(
            "SELECT id, content_hash, source, stored, embedding FROM cases ORDER BY id"
        ).fetchall()
        assert after == before
        assert idx.conn.execute("SELECT * FROM case_meta ORDER BY case_id, key").fetchall() == meta_before
        hit = idx.search_image(cases_samples / "film" / "film-3.png", encoder=int8_encoder, k=1)[0]
        assert Path(hit.content).is_file() and str(dst) in hit.content  # the copy travelled with it
    with pytest.raises(UsageError, match="not empty"):
        import_index(archive, dst)
    other = MedSigLIP(medsiglip_ext_bundle, precision="int8", towers=("vision",)).fingerprint
    with pytest.raises(InputError, match="another MedSigLIP encoder"):
        import_index(archive, tmp_path / "c", fingerprint=other)
    assert not (tmp_path / "c").exists()
    bad = tmp_path / "bad.tar"  # a member altered in transit
    with tarfile.open(archive) as tin, tarfile.open(bad, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.startswith("files/"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            tout.addfile(m, __import__("io").BytesIO(data))
    with pytest.raises(InputError, match="does not match its manifest"):
        import_index(bad, tmp_path / "d")
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.import-*"))


EDGE_ONLY = """
import json, sys
HEAVY = ("torch", "transformers", "onnx", "optimum", "export")
from edge.cases.index import CaseIndex
from edge.medsiglip.model import MedSigLIP
b, idx, img, folder = sys.argv[1:5]
enc = MedSigLIP(b, threads=1)
enc.classify(img, labels=["a", "b"])
with CaseIndex.open(idx, encoder=enc, create=True) as i:
    i.add([folder], encoder=enc)
    i.search_text("a chest x-ray", encoder=enc)
library = sorted(m for m in HEAVY if m in sys.modules)
from medgemma_edge.cli import main  # the CLI builds every verb's parser: export/ is imported, torch is not
codes = [
    main(["classify", "-b", b, img, "--labels", "a,b", "--json"]),
    main(["index", "-b", b, "--index", idx + "2", "add", folder, "--json"]),
    main(["search", "-b", b, "--index", idx + "2", img, "--json"]),
    main(["search", "-b", b, "--index", idx + "2", "--text", "a chest x-ray", "--json"]),
]
cli = sorted(m for m in HEAVY[:4] if m in sys.modules)
print(json.dumps({"library": library, "codes": codes, "cli": cli}))
"""


def test_edge_process_never_imports_torch_or_transformers(tmp_path, medsiglip_bundle, cases_samples):
    img = cases_samples / "film" / "film-0.png"
    args = [str(medsiglip_bundle), str(tmp_path / "idx"), str(img), str(cases_samples)]
    r = subprocess.run(
        [sys.executable, "-c", EDGE_ONLY, *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last == {"library": [], "codes": [0, 0, 0, 0], "cli": []}


def test_demo_cases_indexes_samples_and_resumes(tmp_path, medsiglip_bundle):
    from medgemma_edge.demo.cases import demo_cases

    first = demo_cases(tmp_path, medsiglip_bundle)
    skipped = {name for name, _ in first["failed"]}
    assert skipped == {"corrupt-00.png", "MR_truncated.dcm", "rtplan.dcm"}
    assert first["added"] == first["cases"] >= 25 and first["duplicates"] == 0
    assert len(first["search_image"]) == 3 and len(first["search_text"]) == 3
    assert all(h["metadata"]["kind"] == "film" for h in first["search_text"])  # the where filter held
    assert first["classify"]["label_set"] == "derm" and "not probabilities" in "\n".join(first["lines"])
    again = demo_cases(tmp_path, medsiglip_bundle)
    assert (again["added"], again["duplicates"], again["cases"]) == (0, first["cases"], first["cases"])
