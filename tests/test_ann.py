"""The similar-case index's ANN path (edge.cases.ann): usearch HNSW over int8 copies, memory-mapped,
exact re-rank from SQLite, metadata filters, freshness, export/import, and crash safety.

Vectors are synthetic and clustered (like embeddings of similar cases); no model is needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT

from edge.cases import ann
from edge.cases.index import CaseIndex

DIM = 256
N = 4000


class FakeEncoder:
    """What CaseIndex.open(create=True) records about an encoder."""

    fingerprint, precision, dim = "ann-test", "fp32", DIM

    class bundle:  # noqa: N801
        @staticmethod
        def component(_name):
            return {"model": "clustered vectors"}


def _unit(rng, n):
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(seed: int, n: int, per: int = 40):
    rng = np.random.default_rng(seed)
    centres = _unit(rng, max(1, n // per))
    x = centres[rng.integers(0, len(centres), n)] + 0.8 * _unit(rng, n)
    q = centres[rng.integers(0, len(centres), 40)] + 0.8 * _unit(rng, 40)
    return x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)


def fill(idx: CaseIndex, vecs: np.ndarray, start: int = 0) -> None:
    rows = [
        {
            "hash": f"{start + i:064x}",
            "source": f"/archive/{start + i}.png",
            "stored": None,
            "format": "png",
            "size": (8, 8),
            "facts": {
                "modality": "CT" if (start + i) % 10 == 0 else "CR",
                **({"rare": "1"} if i % 250 == 0 else {}),
            },
        }
        for i in range(len(vecs))
    ]
    for i in range(0, len(rows), 1000):
        idx.insert_batch(rows[i : i + 1000], vecs[i : i + 1000], meta={})


def exact(idx: CaseIndex, q: np.ndarray, k: int, where=None) -> list[int]:
    ids, mat = idx.embeddings()
    s = mat @ q
    if where:
        keep = np.isin(ids, np.fromiter(idx._filter_ids(where), dtype=np.int64))
        s = np.where(keep, s, -np.inf)
    return [int(ids[i]) for i in np.argsort(-s, kind="stable")[:k] if np.isfinite(s[i])]


@pytest.fixture(scope="module")
def data():
    return clustered(1, N)


@pytest.fixture
def big(tmp_path, data):
    """An index of N clustered vectors with its ANN built (threshold lowered to 1000)."""
    vecs, _ = data
    idx = CaseIndex.open(tmp_path / "index", encoder=FakeEncoder(), create=True)
    idx.ann_min_cases = 1000
    fill(idx, vecs)
    assert ann.ensure(idx) is not None
    yield idx
    idx.close()


def test_below_threshold_stays_exact(tmp_path, data):
    vecs, queries = data
    with CaseIndex.open(tmp_path / "small", encoder=FakeEncoder(), create=True) as idx:
        fill(idx, vecs[:500])
        assert ann.ensure(idx) is None and ann.state(idx) is None
        assert not list((tmp_path / "small").glob("ann-*"))
        assert [e.id for e in idx.search(queries[0], k=10)] == exact(idx, queries[0], 10)


def test_search_uses_the_graph_with_high_recall_and_exact_scores(big, data, monkeypatch):
    _, queries = data
    st = ann.state(big)
    assert st.cases == N and st.dtype == "i8" and (big.root / st.file).stat().st_size == st.bytes
    truth = {i: exact(big, q, 10) for i, q in enumerate(queries)}
    big._cache = big._buf = None
    monkeypatch.setattr(
        CaseIndex, "embeddings", lambda self: pytest.fail("the ANN path read the whole matrix")
    )
    recalls = []
    for i, q in enumerate(queries):
        hits = big.search(q, k=10)
        recalls.append(len({h.id for h in hits} & set(truth[i])) / 10)
        _, mat = ann.vectors(big, [h.id for h in hits])
        np.testing.assert_allclose([h.score for h in hits], mat @ q, rtol=0, atol=1e-6)  # exact cosines
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert np.mean(recalls) >= 0.95, np.mean(recalls)
    assert big._ann_view is not None and big._ann_view[0] == st.file  # memory-mapped view, cached


def test_filters_through_the_graph_and_narrow_filters_exactly(big, data):
    _, queries = data
    for where in ({"modality": "CT"}, {"rare": "1"}, {"modality": "CT", "rare": "1"}, {"modality": "XX"}):
        for q in queries[:10]:
            got = [h.id for h in big.search(q, k=5, where=where)]
            want = exact(big, q, 5, where)
            assert len(set(got) & set(want)) >= len(want) - 1, (where, got, want)
            assert all(
                h.metadata["modality"] == where.get("modality", h.metadata["modality"])
                for h in big.search(q, k=5, where=where)
            )
    assert big.search(queries[0], k=5, where={"modality": "XX"}) == []


def test_a_narrow_filter_scores_its_subset_exactly(big, data, monkeypatch, caplog):
    _, queries = data
    monkeypatch.setattr(ann, "MAX_CANDIDATES", 300)  # 16 "rare" cases of 4000: over-fetching won't do
    with caplog.at_level("INFO", logger="edge.cases.ann"):
        for q in queries[:5]:
            assert [h.id for h in big.search(q, k=5, where={"rare": "1"})] == exact(big, q, 5, {"rare": "1"})
    assert "scored its subset exactly" in caplog.text


def test_cases_added_after_the_build_are_found_then_folded_in(big, data, monkeypatch):
    _, queries = data
    st = ann.state(big)
    fill(big, queries[:3].copy(), start=N)  # exact copies of three queries: their own top hit
    assert ann.ensure(big) == st  # a small tail: searched exactly beside the graph, no rebuild
    for j in range(3):
        top = big.search(queries[j], k=3)[0]
        assert top.id == N + 1 + j and top.score == pytest.approx(1.0, abs=1e-5)
    monkeypatch.setattr(ann, "TAIL_MIN", 2)
    monkeypatch.setattr(ann, "TAIL_FRACTION", 0.0)
    new = ann.ensure(big)
    assert new.cases == N + 3 and new.file != st.file
    assert not (big.root / st.file).exists()  # the previous generation is removed after the commit
    assert big.search(queries[1], k=1)[0].id == N + 2


def test_export_import_carries_the_graph(big, data, tmp_path):
    from edge.cases.transfer import export_index, import_index

    _, queries = data
    st = ann.state(big)
    man = export_index(big.root, tmp_path / "out.tar")
    assert st.file in man["files"]
    import_index(tmp_path / "out.tar", tmp_path / "copy", fingerprint=FakeEncoder.fingerprint)
    with CaseIndex.open(tmp_path / "copy") as other:
        other.ann_min_cases = 1000
        assert ann.state(other) == st and (tmp_path / "copy" / st.file).is_file()
        for q in queries[:5]:
            assert [h.id for h in other.search(q, k=10)] == [h.id for h in big.search(q, k=10)]
        assert other._ann_view is not None


def test_damaged_graph_falls_back_to_exact_and_is_rebuilt(big, data, caplog):
    _, queries = data
    st = ann.state(big)
    big.close()
    with open(big.root / st.file, "r+b") as f:
        f.truncate(st.bytes // 2)
    with CaseIndex.open(big.root) as idx:
        idx.ann_min_cases = 1000
        with caplog.at_level("WARNING"):
            assert [h.id for h in idx.search(queries[0], k=10)] == exact(idx, queries[0], 10)
        assert "missing or damaged" in caplog.text
        new = ann.ensure(idx)
        assert new.file != st.file and idx.search(queries[0], k=3)


def test_an_error_while_publishing_keeps_the_old_graph(big, data, monkeypatch):
    _, queries = data
    st = ann.state(big)
    before = [h.id for h in big.search(queries[0], k=10)]

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ann, "_fsync_dir", boom)
    with pytest.raises(Exception, match="space|disk"):
        ann.build(big)
    assert ann.state(big) == st
    assert sorted(p.name for p in big.root.iterdir() if "ann" in p.name) == [st.file]  # no litter
    assert [h.id for h in big.search(queries[0], k=10)] == before


KILL = """
import os, signal, sys
from edge.cases import ann
from edge.cases.index import CaseIndex
ann.CHUNK = 500
idx = CaseIndex.open(sys.argv[1])
if sys.argv[2] == "reading":  # killed while reading the vectors
    ann.build(idx, progress=lambda done, total: done >= 1000 and os.kill(os.getpid(), signal.SIGKILL))
elif sys.argv[2] == "saving":  # killed once the temp file is written, before it is renamed
    from usearch.index import Index
    save = Index.save
    Index.save = lambda self, path, *a: (save(self, path, *a), os.kill(os.getpid(), signal.SIGKILL))
    ann.build(idx)
else:  # killed after the new file is in place, before its row commits
    ann._fsync_dir = lambda path: os.kill(os.getpid(), signal.SIGKILL)
    ann.build(idx)
"""


@pytest.mark.parametrize("when", ["reading", "saving", "publishing"])
def test_sigkill_during_a_build_leaves_the_old_graph_in_force(big, data, when):
    _, queries = data
    st = ann.state(big)
    before = [h.id for h in big.search(queries[0], k=10)]
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILL), str(big.root), when],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    litter = [p.name for p in big.root.iterdir() if "ann" in p.name and p.name != st.file]
    assert bool(litter) == (when != "reading")  # its temp file, or an unnamed generation
    assert ann.state(big) == st
    assert [h.id for h in big.search(queries[0], k=10)] == before
    new = ann.build(big)  # the next build sweeps what the dead one left
    assert sorted(p.name for p in big.root.iterdir() if "ann" in p.name) == [new.file]
    assert os.path.getsize(big.root / new.file) == new.bytes
