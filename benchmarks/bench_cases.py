"""Benchmark: similar-case indexing throughput and search latency (brute force vs ANN).

Not a test. Two tables:

1. Indexing images/s through :meth:`edge.cases.CaseIndex.add` (decode, hash, preprocess, embed,
   one transaction per batch), int8 vs fp32 vision tower, 2 threads, at the runtime's default
   vision batch (int8: 1, fp32: 8) and fp32 at batch 1 too. On the tiny twin bundle (built in a
   temp dir) and, with ``--full DIR[,DIR]``, on full-size bundles (e.g. the ones
   ``benchmarks/bench_onnx_export.py`` leaves in ``~/.cache/medgemma-edge/bench-onnx``).
2. Search latency per single query at 1k/10k/100k unit vectors (dim 1152, MedSigLIP's), in
   clusters like embeddings of similar cases (uniform random vectors would make every top-10 a
   near-tie): the SQLite fill, the cold load of the matrix, its incremental refresh after
   another connection adds 100 cases, the index's own brute-force path (numpy matmul +
   argpartition on the cached matrix, then the SQLite lookup of the k hits) with numpy's
   default BLAS threads and with one BLAS thread (in its own process), and the ANN options if
   installed (``pip install 'medgemma-edge[bench]'``: ``usearch`` HNSW, ``faiss-cpu`` flat and
   HNSW) with build time and recall@10 against brute force.

    .venv/bin/python benchmarks/bench_cases.py [--sizes 1000,10000,100000] [--full DIR,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
THREADS = 2
DIM = 1152
K = 10


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# --- indexing --------------------------------------------------------------------------------------


def sample_folder(dst: Path, n: int) -> Path:
    from medgemma_edge.demo.cases import KINDS

    rng = np.random.default_rng(0)
    kinds = list(KINDS.values())
    for i in range(n):
        make, ext = kinds[i % len(kinds)]
        make(rng).save(dst / f"{i:04d}.{ext}")
    return dst


def bench_indexing(bundle: Path, images: Path, label: str, configs) -> list[tuple]:
    from edge.cases.index import CaseIndex
    from edge.medsiglip.model import MedSigLIP

    rows = []
    for precision, batch in configs:
        enc = MedSigLIP(bundle, precision=precision, threads=THREADS, towers=("vision",))
        enc.default_batch = lambda b=batch: b  # the vision batch under test
        with tempfile.TemporaryDirectory() as d, CaseIndex.open(Path(d), encoder=enc, create=True) as idx:
            enc.embed_images([next(images.iterdir())])  # warm-up run, not counted
            rep = idx.add([images], encoder=enc, batch_size=max(8, batch))
        rows.append(
            (label, precision, batch, rep.added, rep.images_per_s, rep.added / rep.embed_seconds, load())
        )
    return rows


# --- search ----------------------------------------------------------------------------------------


ONE_THREAD = """
import json, statistics, sys, time
import numpy as np
from edge.cases.index import CaseIndex
idx, queries = CaseIndex.open(sys.argv[1]), np.load(sys.argv[2])
idx.search(queries[0], k=10)  # loads the matrix
times = []
for q in queries:
    t0 = time.perf_counter()
    idx.search(q, k=10)
    times.append((time.perf_counter() - t0) * 1e3)
times.sort()
print(json.dumps([statistics.median(times), times[int(0.95 * (len(times) - 1))]]))
"""


class _FakeEncoder:
    """Just what CaseIndex.open needs to bind an index (random vectors need no model)."""

    fingerprint, precision, dim = "bench-random", "fp32", DIM

    class bundle:  # noqa: N801
        @staticmethod
        def component(_name):
            return {"model": "random vectors"}


def _unit(rng, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng, n: int, per_cluster: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in clusters (cosine ~0.6 within, ~0 across), as embeddings of similar cases
    are; uniform random vectors would make every 10-NN set a near-tie. Also the cluster centres."""
    centres = _unit(rng, max(1, n // per_cluster))
    x = centres[rng.integers(0, len(centres), n)] + 0.8 * _unit(rng, n)
    return x / np.linalg.norm(x, axis=1, keepdims=True), centres


def _timed(fn, queries) -> tuple[float, float, list]:
    times, out = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q))
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))], out


def _recall(got: list, truth: list) -> float:
    return float(np.mean([len(set(map(int, g)) & set(t)) / K for g, t in zip(got, truth, strict=True)]))


def bench_search(n: int, n_queries: int, work: Path, usearch_max: int) -> list[tuple]:
    from edge.cases.index import CaseIndex

    rng = np.random.default_rng(n)
    vecs, centres = _clustered(rng, n)
    # queries: new cases of existing clusters ("find cases like this one")
    queries = centres[rng.integers(0, len(centres), n_queries)] + 0.8 * _unit(rng, n_queries)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rows = []
    root = work / f"idx-{n}"
    with CaseIndex.open(root, encoder=_FakeEncoder(), create=True) as idx:
        t0 = time.perf_counter()
        idx.conn.execute("BEGIN")  # one transaction for the bulk fill
        idx.conn.executemany(
            "INSERT INTO cases(content_hash, source, format, width, height, fingerprint, embedding, created) "
            "VALUES (?, NULL, 'png', 1, 1, 'bench-random', ?, '')",
            ((f"{i:064x}", v.astype("<f4").tobytes()) for i, v in enumerate(vecs)),
        )
        idx.conn.execute("COMMIT")
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids, mat = idx.embeddings()
        cold_ms = (time.perf_counter() - t0) * 1e3
        db_mb = (root / "cases.sqlite").stat().st_size / 2**20
        rows.append((n, "SQLite fill (one transaction)", fill_s * 1e3, None, None, f"{db_mb:.0f} MiB db"))
        rows.append(
            (n, "matrix load from SQLite (cold)", cold_ms, None, None, f"{mat.nbytes / 2**20:.0f} MiB")
        )

        def brute(q):
            s = mat @ q
            top = np.argpartition(-s, K - 1)[:K]
            return ids[top[np.argsort(-s[top])]]

        med, p95, truth = _timed(brute, queries)
        truth = [list(map(int, t)) for t in truth]
        rows.append((n, "numpy brute force (exact)", med, p95, 1.0, ""))
        med, p95, _ = _timed(lambda q: idx.search(q, k=K), queries)
        rows.append((n, "CaseIndex.search (+ SQLite rows)", med, p95, 1.0, "BLAS threads: default"))
        extra = _unit(rng, 100)
        other = CaseIndex.open(root)  # another connection adds 100 cases (as an `index add` would)
        other.conn.execute("BEGIN")
        other.conn.executemany(
            "INSERT INTO cases(content_hash, source, format, width, height, fingerprint, embedding, created) "
            "VALUES (?, NULL, 'png', 1, 1, 'bench-random', ?, '')",
            ((f"x{i:063x}", v.astype("<f4").tobytes()) for i, v in enumerate(extra)),
        )
        other.conn.execute("COMMIT")
        other.close()
        t0 = time.perf_counter()
        idx.embeddings()
        rows.append(
            (
                n,
                "matrix refresh after +100 cases",
                (time.perf_counter() - t0) * 1e3,
                None,
                None,
                "incremental",
            )
        )
        np.save(work / "queries.npy", queries)
        r = subprocess.run(
            [sys.executable, "-c", ONE_THREAD, str(root), str(work / "queries.npy")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        )
        med, p95 = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else (None, None)
        rows.append((n, "CaseIndex.search (+ SQLite rows)", med, p95, 1.0, "BLAS 1 thread (own process)"))
        ids_list = ids
    rows += _ann(vecs, ids_list, queries, truth, n, usearch_max)
    return rows


def _ann(vecs, ids, queries, truth, n, usearch_max) -> list[tuple]:
    rows = []
    try:
        if n > usearch_max:
            raise LookupError
        from usearch.index import Index

        t0 = time.perf_counter()
        ui = Index(ndim=DIM, metric="ip", dtype="f32")
        ui.add(ids, vecs, threads=THREADS)
        build = time.perf_counter() - t0
        med, p95, got = _timed(lambda q: ui.search(q, K).keys, queries)
        rows.append((n, "usearch HNSW (f32, defaults)", med, p95, _recall(got, truth), f"build {build:.1f}s"))
    except ImportError:
        rows.append((n, "usearch", None, None, None, "not installed"))
    except LookupError:
        rows.append((n, "usearch HNSW", None, None, None, f"skipped above {usearch_max} (build time)"))
    try:
        import faiss

        faiss.omp_set_num_threads(1)  # one query at a time: OpenMP only adds overhead (measured)
        flat = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
        flat.add_with_ids(vecs, ids)
        med, p95, got = _timed(lambda q: flat.search(q[None], K)[1][0], queries)
        rows.append((n, "faiss IndexFlatIP (exact)", med, p95, _recall(got, truth), ""))
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(THREADS)
        hnsw = faiss.IndexIDMap(faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT))
        hnsw.add_with_ids(vecs, ids)
        faiss.omp_set_num_threads(1)
        build = time.perf_counter() - t0
        med, p95, got = _timed(lambda q: hnsw.search(q[None], K)[1][0], queries)
        rows.append((n, "faiss HNSW32 (efSearch 16)", med, p95, _recall(got, truth), f"build {build:.1f}s"))
    except ImportError:
        rows.append((n, "faiss-cpu", None, None, None, "not installed"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--images", type=int, default=48, help="images to index on the tiny twin")
    ap.add_argument(
        "--full", default="", help="full-size bundle dirs (comma-separated) to index a few images with"
    )
    ap.add_argument("--full-images", type=int, default=3)
    ap.add_argument("--no-indexing", action="store_true", help="only the search table")
    ap.add_argument("--usearch-max", type=int, default=10000, help="largest size to build usearch at")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    print(f"load average at start: {load()}  (2 cores, shared machine: figures are noisy)")

    with tempfile.TemporaryDirectory(prefix="bench-cases-") as d:
        work = Path(d)
        if not args.no_indexing:
            index_table(args, work)
        print(f"\nSearch, one query at a time, k={K}, dim {DIM}, {args.queries} queries, {THREADS} threads")
        print(f"{'vectors':>8} {'method':<34} {'median ms':>10} {'p95 ms':>8} {'recall@10':>9}  note")
        for n in (int(s) for s in args.sizes.split(",")):
            for size, method, med, p95, rec, note in bench_search(n, args.queries, work, args.usearch_max):
                f = lambda v, w, p: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
                print(
                    f"{size:>8} {method:<34} {f(med, 10, 2)} {f(p95, 8, 2)} {f(rec, 9, 3)}  {note}",
                    flush=True,
                )
            for p in work.glob(f"idx-{n}/*"):
                p.unlink()


def index_table(args, work: Path) -> None:
    """Build the tiny twin bundle in ``work``, index sample images at each precision, print the table."""
    from edge.bundle.manifest import open_bundle
    from export.onnx.medsiglip import export_medsiglip
    from export.twin import build_twin

    twin = build_twin("medsiglip", size="tiny", out=work / "twin", seed=0).path
    export_medsiglip(twin, bundle=work / "bundle", precisions="int8,fp32", fidelity_images=1)
    (work / "imgs").mkdir()
    imgs = sample_folder(work / "imgs", args.images)
    rows = bench_indexing(work / "bundle", imgs, "tiny twin", [("int8", 1), ("fp32", 1), ("fp32", 8)])
    for full in filter(None, args.full.split(",")):
        few = work / f"few-{len(rows)}"
        few.mkdir()
        sample_folder(few, args.full_images)
        precs = open_bundle(full).component("medsiglip")["precisions"]
        rows += bench_indexing(Path(full), few, "full twin", [(p, 1) for p in precs if p in ("int8", "fp32")])
    print("\nIndexing (CaseIndex.add: decode + hash + preprocess + embed + commit), 2 threads")
    print(
        f"{'bundle':<10} {'tower':<6} {'batch':>5} {'images':>6} {'images/s':>9} {'embed-only/s':>12}  load"
    )
    for label, prec, batch, n, ips, eps, ld in rows:
        print(f"{label:<10} {prec:<6} {batch:>5} {n:>6} {ips:>9.2f} {eps:>12.2f}  {ld}", flush=True)


if __name__ == "__main__":
    main()
