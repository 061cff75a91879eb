"""Archive indexing on Ray Data (export.archive) and ``index import-archive``, on the tiny twin.

One local Ray (2 CPUs, no dashboard) serves the whole module; the runs that need their own
driver (the CLI, a driver killed mid-run) join it with ``--ray-address``.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli

from edge.cases.index import CaseIndex
from edge.errors import InputError


@pytest.fixture(scope="module")
def ray_address():
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ctx.address_info["address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """~200 small generated images (PNG and JPEG, several sizes), two DICOM samples, one copy of
    an image under another name, one file that is not an image."""
    import pydicom
    from PIL import Image

    root = tmp_path_factory.mktemp("archive-images")
    rng = np.random.default_rng(3)
    for i in range(196):
        h, w = (24 + 8 * (i % 3), 32 + 8 * (i % 4))
        base = rng.integers(0, 255, (1, 1, 3)) * np.ones((h, w, 3))
        px = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        sub = root / f"set{i % 4}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(px).save(sub / f"{i:03d}.{'jpg' if i % 5 == 0 else 'png'}")
    dcm = Path(pydicom.__file__).parent / "data" / "test_files"
    (root / "dicom").mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copyfile(dcm / name, root / "dicom" / name)
    shutil.copyfile(root / "set1" / "001.png", root / "set3" / "copy-of-001.png")
    (root / "set2" / "notes.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def manifest_csv(images, tmp_path_factory) -> Path:
    """A CSV manifest (beside the images' folder) naming set0's images by relative path, with
    metadata columns."""
    path = tmp_path_factory.mktemp("manifest") / "set0.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "finding", "site"])
        for p in sorted((images / "set0").iterdir()):
            w.writerow([f"../{images.name}/set0/{p.name}", "nodule" if p.stem.endswith("2") else "", "north"])
    return path


@pytest.fixture(scope="module")
def archive(ray_address, images, manifest_csv, medsiglip_bundle, tmp_path_factory):
    """The images archived by 2 actors (the CSV first, so set0's cases carry its metadata)."""
    from export.archive.pipeline import index_archive

    out = tmp_path_factory.mktemp("archive") / "out"
    rep = index_archive(
        [manifest_csv, images],
        out=out,
        bundle=medsiglip_bundle,
        precision="int8",
        actors=2,
        batch=8,
        shard_size=64,
    )
    return out, rep


def shard_rows(out: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    rows = {}
    for p in sorted((out / "shards").glob("shard-*.parquet")):
        for r in pq.read_table(p).to_pylist():
            assert r["hash"] not in rows, "a content hash in two shards"
            rows[r["hash"]] = r
    return rows


def test_shards_equal_the_single_process_index(archive, images, int8_encoder, tmp_path):
    out, rep = archive
    assert rep.inputs == 196 + 2 + 2 and rep.actors == 2
    assert rep.duplicates == 1 and [Path(p).name for p, _ in rep.failed] == ["notes.png"]
    assert "is not an image" in rep.failed[0][1]
    rows = shard_rows(out)
    assert len(rows) == rep.added == rep.cases == 198
    man = json.loads((out / "manifest.json").read_text())
    assert man["fingerprint"] == int8_encoder.fingerprint and man["cases"] == 198 and man["inputs"] == 200
    with CaseIndex.open(tmp_path / "single", encoder=int8_encoder, create=True) as idx:
        single = idx.add([images], encoder=int8_encoder)
        assert single.added == 198
        ids, mat = idx.embeddings()
        by_hash = {
            h: mat[np.searchsorted(ids, i)] for i, h in idx.conn.execute("SELECT id, content_hash FROM cases")
        }
        meta = {
            h: dict(idx.conn.execute("SELECT key, value FROM case_meta WHERE case_id = ?", (i,)))
            for i, h in idx.conn.execute("SELECT id, content_hash FROM cases")
        }
    assert set(rows) == set(by_hash)
    for h, r in rows.items():
        e = np.asarray(r["embedding"], dtype=np.float32)
        assert float(e @ by_hash[h]) / float(np.linalg.norm(e) * np.linalg.norm(by_hash[h])) >= 0.9999
        md = dict(r["metadata"])
        assert md["format"] == meta[h]["format"] and md.get("modality") == meta[h].get("modality")
    by_name = {Path(r["source"]).name: dict(r["metadata"]) for r in rows.values()}
    assert by_name["012.png"]["finding"] == "nodule" and by_name["012.png"]["site"] == "north"  # from the CSV
    assert by_name["CT_small.dcm"]["modality"] == "CT" and "finding" not in by_name["008.png"]
    assert "site" not in by_name["001.png"]


KILLED = """
import os, signal, sys
from export.archive.pipeline import index_archive
def progress(done, total):
    if done >= 32:  # two shards of 16 are on disk
        os.kill(os.getpid(), signal.SIGKILL)
index_archive([sys.argv[1]], out=sys.argv[2], bundle=sys.argv[3], precision="int8", ray_address=sys.argv[4],
              batch=8, shard_size=16, progress=progress)
"""


def test_a_killed_driver_resumes_with_the_missing_shards_only(
    ray_address, images, medsiglip_bundle, tmp_path
):
    from export.archive.pipeline import index_archive

    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(KILLED),
            str(images),
            str(out),
            str(medsiglip_bundle),
            ray_address,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    before = sorted(p.name for p in (out / "shards").iterdir())
    assert len(before) >= 2 and all(n.startswith("shard-") for n in before)
    rep = index_archive([images], out=out, bundle=medsiglip_bundle, precision="int8", batch=8, shard_size=16)
    assert rep.already == 16 * len(before) and rep.inputs == 200
    assert rep.shards_written == -(-(200 - rep.already) // 16)
    rows = shard_rows(out)  # no content hash twice
    assert len(rows) == 198 and rep.cases == 198
    after = sorted(p.name for p in (out / "shards").iterdir())
    assert after[: len(before)] == before and len(after) == len(before) + rep.shards_written
    again = index_archive([images], out=out, bundle=medsiglip_bundle, precision="int8")
    assert again.shards_written == 0 and again.already == 200  # nothing left: no Ray job at all


def test_import_archive_then_search_equals_exact_search(archive, int8_encoder, tmp_path, monkeypatch):
    from edge.cases import ann
    from export.archive.load import import_archive

    # f16 graph vectors: the tiny twin's embeddings sit in a narrow cone (cosines ~0.99 between any
    # two images), where int8 rounding reorders candidates by dozens of places. Even in f16 an HNSW
    # walk through such a cone misses a true top-10 case now and then (usearch builds its graph on
    # threads, so which one varies by run: 1 of 10 in ~7% of queries on a synthetic 198-vector cone),
    # so what is exact is the score and order of what comes back, and what is approximate is recall;
    # real embeddings at 10^5 and 10^6: benchmarks/bench_archive.py
    monkeypatch.setattr(ann, "DEFAULT_DTYPE", "f16")
    out, _ = archive
    rep = import_archive(out, tmp_path / "index", encoder=int8_encoder, ann_min_cases=100)
    assert rep.added == 198 and rep.total == 198 and rep.ann["cases"] == 198
    assert import_archive(out, tmp_path / "index", encoder=int8_encoder).added == 0  # idempotent
    with CaseIndex.open(tmp_path / "index", encoder=int8_encoder) as idx:
        idx.ann_min_cases = 100
        assert ann.state(idx) is not None
        ids, mat = idx.embeddings()
        exact = dict(zip(ids.tolist(), range(len(ids)), strict=True))
        rng = np.random.default_rng(0)
        found = []
        for q in mat[rng.choice(len(mat), 24, replace=False)]:
            q = q + rng.normal(0, 0.02, q.shape).astype(np.float32)
            q /= np.linalg.norm(q)
            s = mat @ q
            want = [int(ids[i]) for i in np.argsort(-s, kind="stable")[:10]]
            got = idx.search(q, k=10)
            assert len(got) == 10 and len({h.id for h in got}) == 10
            np.testing.assert_allclose([h.score for h in got], [s[exact[h.id]] for h in got], atol=1e-5)
            assert all(a.score >= b.score for a, b in zip(got, got[1:], strict=False))
            found.append(len({h.id for h in got} & set(want)) / 10)
        assert np.mean(found) >= 0.95 and min(found) >= 0.8, found
        hits = idx.search(mat[0], k=5, where={"site": "north"})
        assert hits and all(h.metadata["site"] == "north" for h in hits)
    # at the default threshold (50,000 cases) a set this size is searched exactly: the same top-k
    with CaseIndex.open(tmp_path / "index", encoder=int8_encoder) as idx:
        assert idx.ann_min_cases == ann.ANN_MIN_CASES > len(ids)
        for q in mat[:8]:
            want = [int(ids[i]) for i in np.argsort(-(mat @ q), kind="stable")[:10]]
            assert [h.id for h in idx.search(q, k=10)] == want


def test_an_archive_of_another_encoder_is_refused(archive, fp32_encoder, medsiglip_bundle, images, tmp_path):
    from export.archive.load import import_archive
    from export.archive.pipeline import index_archive

    out, _ = archive
    with pytest.raises(InputError, match="another MedSigLIP encoder.*fingerprint"):
        import_archive(out, tmp_path / "index", encoder=fp32_encoder)
    assert not (tmp_path / "index").exists()
    with pytest.raises(InputError, match="another MedSigLIP encoder"):
        index_archive([images / "dicom"], out=out, bundle=medsiglip_bundle, precision="fp32")


def test_cli_archive_index_and_import_archive(ray_address, images, medsiglip_bundle, tmp_path):
    out = tmp_path / "out"
    r = run_cli(
        "archive", "index", str(images / "dicom"), str(images / "set2"), "--out", str(out),
        "-b", str(medsiglip_bundle), "--precision", "int8", "--ray-address", ray_address, "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["ok"] and rep["added"] == 2 + 49 and rep["failed"][0]["path"].endswith("notes.png")
    r = run_cli(
        "index",
        "-b",
        str(medsiglip_bundle),
        "--index",
        str(tmp_path / "idx"),
        "import-archive",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["total"] == 51
    r = run_cli("index", "-b", str(medsiglip_bundle), "--precision", "fp32", "--index", str(tmp_path / "other"),
                "import-archive", str(out))  # fmt: skip
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "fingerprint" in r.stderr
    r = run_cli("archive", "info", str(out), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["cases"] == 51


def test_csv_manifest_errors_and_study_store_listing(tmp_path, monkeypatch):
    from export.archive.inputs import list_inputs

    bad = tmp_path / "bad.csv"
    bad.write_text("filename,finding\na.png,x\n")
    with pytest.raises(InputError, match="column named one of path"):
        list_inputs([bad])
    with pytest.raises(InputError, match="does not exist"):
        list_inputs([tmp_path / "nope"])
    store = tmp_path / "studies"
    store.mkdir()
    (store / "catalogue.sqlite").write_bytes(b"")
    (store / "a.dcm").write_bytes(b"x")

    class FakeStore:  # the contract of edge.studies.store.StudyStore that the listing uses
        def __init__(self, root):
            self.root = Path(root)

        def list_studies(self, *, offset=0, limit=50):
            return {"studies": [{"study_uid": "1.2", "study_date": "2024-01-02"}][offset:], "total": 1}

        def get_study(self, uid):
            inst = [
                {"sop_instance_uid": "1.2.3.1", "displayable": True},
                {"sop_instance_uid": "1.2.3.2", "displayable": False, "why_not": "JPEG 2000: no decoder"},
            ]
            return {
                "series": [{"series_uid": "1.2.3", "modality": "CR", "body_part": "CHEST", "instances": inst}]
            }

        def instance_path(self, study_uid, instance_uid):
            return self.root / "a.dcm"

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "edge.studies.store", types.SimpleNamespace(StudyStore=FakeStore))
    skipped = []
    items = list_inputs([store], skipped=skipped)
    assert [Path(i.source).name for i in items] == ["a.dcm"]
    assert items[0].meta == {
        "modality": "CR",
        "body_part": "CHEST",
        "study_date": "2024-01-02",
        "study_uid": "1.2",
        "series_uid": "1.2.3",
        "instance_uid": "1.2.3.1",
    }
    assert skipped == [("study store instance", "JPEG 2000: no decoder")]
