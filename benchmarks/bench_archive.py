"""Benchmark: archive indexing on Ray vs ``index add``, and search at 10^5 / 10^6 cases.

Not a test. Two tables:

1. Indexing images/s on the tiny twin bundle (built in a temp dir): the single-process
   ``CaseIndex.add`` (2 onnxruntime threads) against ``archive index`` on a local Ray with 1
   actor (2 threads) and 2 actors (1 thread each), the same images. The tiny twin's towers take
   milliseconds, so this measures the pipeline's overhead more than embedding; with a full-size
   bundle (``--bundle DIR``) the embedding dominates and the ratio is what carries.
2. Search over N unit vectors (1152 dims, MedSigLIP's) in clusters of ~100 (like embeddings of
   similar cases; uniform noise would make every top-10 a near-tie), one query at a time, each
   method in its own process (so its RSS is its own): the index's ANN path (usearch HNSW over
   int8, memory-mapped, exact re-rank of 128 candidates from SQLite), usearch's exact int8 scan,
   numpy brute force over float32 and over int8. Build time, disk size, peak RSS, p50/p99
   latency and recall@10 against exact float32 search.

    .venv/bin/python benchmarks/bench_archive.py [--sizes 100000,1000000] [--images 240] [--bundle DIR]
        [--sweep 64:64,128:128]   (ANN candidates:ef pairs to measure on the same graph)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DIM, K, THREADS = 1152, 10, 2


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    keep = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
    return " ".join(f for f in keep if f in flags)


# --- 1. indexing -----------------------------------------------------------------------------------


def indexing(args, work: Path) -> None:
    import ray

    from benchmarks.bench_cases import sample_folder
    from edge.cases.index import CaseIndex
    from edge.medsiglip.model import MedSigLIP
    from export.archive.pipeline import index_archive

    bundle = Path(args.bundle) if args.bundle else _tiny_bundle(work)
    imgs = work / "imgs"
    imgs.mkdir()
    sample_folder(imgs, args.images)
    rows = []
    enc = MedSigLIP(bundle, threads=THREADS, towers=("vision",))
    with CaseIndex.open(work / "single", encoder=enc, create=True) as idx:
        rep = idx.add([imgs], encoder=enc)
    base = rep.images_per_s
    rows.append(("index add (1 process, 2 threads)", rep.added, rep.seconds, base, 1.0))
    t0 = time.perf_counter()
    ray.init(num_cpus=THREADS, include_dashboard=False, log_to_driver=False, configure_logging=False)
    start = time.perf_counter() - t0
    try:
        for actors in (1, 2):
            r = index_archive(
                [imgs],
                out=work / f"arch-{actors}",
                bundle=bundle,
                actors=actors,
                threads_per_actor=THREADS // actors,
            )
            rows.append(
                (
                    f"archive index, {actors} actor(s) x {THREADS // actors} threads",
                    r.added,
                    r.seconds,
                    r.images_per_s,
                    r.images_per_s / base,
                )
            )
    finally:
        ray.shutdown()
    label = "full-size bundle" if args.bundle else "tiny twin bundle (embedding takes ms: pipeline overhead)"
    print(
        f"\nIndexing {args.images} images, {label}; local Ray (2 CPUs) started in {start:.1f}s, not counted"
    )
    print(f"{'method':<46} {'images':>6} {'seconds':>8} {'images/s':>9} {'ratio':>6}")
    for name, n, s, ips, ratio in rows:
        print(f"{name:<46} {n:>6} {s:>8.1f} {ips:>9.1f} {ratio:>6.2f}")


def _tiny_bundle(work: Path) -> Path:
    from export.onnx.medsiglip import export_medsiglip
    from export.twin import build_twin

    twin = build_twin("medsiglip", size="tiny", out=work / "twin", seed=0).path
    export_medsiglip(twin, bundle=work / "bundle", precisions="int8", fidelity_images=1)
    return work / "bundle"


# --- 2. search -------------------------------------------------------------------------------------


def clustered(n: int, seed: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around n/100 random centres (cosine ~0.6 within a cluster, ~0 across),
    and queries drawn the same way (new cases of existing clusters)."""
    rng = np.random.default_rng(seed)

    def unit(m):
        x = rng.standard_normal((m, DIM), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centres = unit(max(1, n // 100))
    out = np.empty((n, DIM), dtype=np.float32)
    for i in range(0, n, 65536):
        m = min(65536, n - i)
        x = centres[rng.integers(0, len(centres), m)] + 0.8 * unit(m)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = centres[rng.integers(0, len(centres), n_queries)] + 0.8 * unit(n_queries)
    return out, q / np.linalg.norm(q, axis=1, keepdims=True)


class _Encoder:
    fingerprint, precision, dim = "bench-clustered", "fp32", DIM

    class bundle:  # noqa: N801
        @staticmethod
        def component(_name):
            return {"model": "clustered vectors"}


SEARCH = """
import json, sys, time
import numpy as np
method, root, qpath, n_q = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
queries = np.load(qpath)[:n_q]
def status():
    f = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    return int(f["VmRSS"].split()[0]) << 10, int(f["VmHWM"].split()[0]) << 10
t0 = time.perf_counter()
if method.startswith("ann"):
    from edge.cases import ann
    from edge.cases.index import CaseIndex
    ann.CANDIDATES, ann.EXPANSION_SEARCH = map(int, method.split(":")[1:])
    idx = CaseIndex.open(root); idx.ann_min_cases = 1
    fn = lambda q: [h.id - 1 for h in idx.search(q, k=10)]  # ids are 1-based rows
elif method == "usearch-exact":
    from usearch.index import Index
    from edge.cases import ann
    idx = __import__("edge.cases.index", fromlist=["x"]).CaseIndex.open(root)
    g = Index.restore(str(idx.root / ann.state(idx).file), view=True)
    fn = lambda q: (g.search(q, 10, exact=True, threads=2).keys - 1).tolist()
elif method == "numpy-f32":
    mat = np.load(root + "/vectors.npy")
    fn = lambda q: np.argpartition(-(mat @ q), 9)[:10].tolist()
elif method == "numpy-i8":
    mat = np.load(root + "/vectors-i8.npy")
    def fn(q):
        s = np.concatenate([mat[i:i + 16384].astype(np.float32) @ q for i in range(0, len(mat), 16384)])
        return np.argpartition(-s, 9)[:10].tolist()
first_t = time.perf_counter(); got = [fn(queries[0])]; first = (time.perf_counter() - first_t) * 1e3
times = []
for q in queries[1:]:
    t = time.perf_counter(); got.append(fn(q)); times.append((time.perf_counter() - t) * 1e3)
rss, hwm = status()
print(json.dumps({"open_s": first_t - t0, "first_ms": first, "times": times, "got": got, "rss": rss, "hwm": hwm}))
"""


def search(n: int, work: Path, n_queries: int, brute_queries: int, threads: int, sweep) -> list[tuple]:
    from edge.cases import ann
    from edge.cases.index import CaseIndex

    root = work / f"idx-{n}"
    t0 = time.perf_counter()
    vecs, queries = clustered(n, seed=n, n_queries=n_queries)
    gen_s = time.perf_counter() - t0
    truth = np.argpartition(-(queries @ vecs.T), K, axis=1)[:, :K]  # exact float32 top-k sets, [Q, K]
    t0 = time.perf_counter()
    with CaseIndex.open(root, encoder=_Encoder(), create=True) as idx:
        idx.conn.execute("BEGIN")
        idx.conn.executemany(
            "INSERT INTO cases(content_hash, source, format, width, height, fingerprint, embedding, created) "
            "VALUES (?, NULL, 'png', 1, 1, 'bench-clustered', ?, '')",
            ((f"{i:064x}", v.tobytes()) for i, v in enumerate(vecs)),
        )
        idx.conn.execute("COMMIT")
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        st = ann.build(idx, threads=threads)
        build_s = time.perf_counter() - t0
    np.save(root / "vectors.npy", vecs)
    np.save(root / "vectors-i8.npy", np.clip(np.rint(vecs * 127), -127, 127).astype(np.int8))
    np.save(work / "queries.npy", queries)
    del vecs
    db = (root / "cases.sqlite").stat().st_size
    print(
        f"  {n}: vectors generated in {gen_s:.0f}s, SQLite filled in {fill_s:.0f}s ({db / 2**30:.2f} GiB), "
        f"ANN built in {build_s:.0f}s ({st.bytes / 2**20:.0f} MiB)",
        flush=True,
    )
    rows = []
    methods = [
        (
            f"ann:{c}:{ef}",
            f"index search: HNSW i8, {c} re-ranked, ef {ef}",
            n_queries,
            f"{build_s:.0f}s",
            st.bytes + db,
        )
        for c, ef in sweep
    ]
    methods += [
        ("usearch-exact", "usearch exact scan over i8 (SIMD)", brute_queries, "-", st.bytes),
        ("numpy-f32", "numpy brute force float32", brute_queries, "-", (root / "vectors.npy").stat().st_size),
        (
            "numpy-i8",
            "numpy brute force int8 (dequantized)",
            brute_queries,
            "-",
            (root / "vectors-i8.npy").stat().st_size,
        ),
    ]
    for key, name, nq, build, disk in methods:
        r = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(SEARCH), key, str(root), str(work / "queries.npy"), str(nq)],
            capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "OPENBLAS_NUM_THREADS": str(THREADS)},
        )  # fmt: skip
        if r.returncode != 0:
            rows.append((n, name, None, None, None, None, build, disk, r.stderr.strip().splitlines()[-1]))
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        times = sorted(res["times"])
        rec = float(
            np.mean([len(set(g) & set(t.tolist())) / K for g, t in zip(res["got"], truth, strict=False)])
        )

        def p(f, times=times):
            return times[min(len(times) - 1, int(f * len(times)))]

        rows.append(
            (n, name, p(0.5), p(0.99), rec, res["hwm"], build, disk, f"first query {res['first_ms']:.0f} ms")
        )
    shutil.rmtree(root)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000", help="vector counts (1000000 takes >15 min on 2 cores)")
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--bundle", help="a full-size bundle for the indexing table (default: the tiny twin)")
    ap.add_argument("--queries", type=int, default=300, help="ANN queries per size")
    ap.add_argument("--brute-queries", type=int, default=30, help="queries per brute-force method")
    ap.add_argument(
        "--sweep",
        default=None,
        help="ANN settings to measure, CANDIDATES:EF comma-separated (64:64,128:256); "
        "default: the runtime's (edge/cases/ann.py)",
    )
    ap.add_argument("--no-indexing", action="store_true")
    ap.add_argument("--no-search", action="store_true")
    args = ap.parse_args()
    print(f"CPU: {os.cpu_count()} cores, {cpu_flags()}; load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-archive-", dir=os.environ.get("BENCH_TMP")) as d:
        work = Path(d)
        if not args.no_indexing:
            indexing(args, work)
        if args.no_search:
            return
        print(f"\nSearch, one query at a time, k={K}, dim {DIM}, clustered; each method in its own process")
        all_rows = []
        for n in (int(s) for s in args.sizes.split(",")):
            from edge.cases import ann

            spec = args.sweep or f"{ann.CANDIDATES}:{ann.EXPANSION_SEARCH}"
            sweep = [tuple(map(int, x.split(":"))) for x in spec.split(",")]
            all_rows += search(n, work, args.queries + 1, args.brute_queries + 1, THREADS, sweep)
        print(
            f"{'vectors':>8} {'method':<46} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>9} "
            f"{'peak RSS':>9} {'build':>6} {'disk':>9}  note"
        )
        for n, name, p50, p99, rec, hwm, build, disk, note in all_rows:
            f = lambda v, w, p: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
            rss = f"{hwm / 2**20:>8.0f}M" if hwm else f"{'-':>9}"
            print(
                f"{n:>8} {name:<46} {f(p50, 8, 2)} {f(p99, 8, 2)} {f(rec, 9, 3)} {rss} {build:>6} "
                f"{disk / 2**20:>8.0f}M  {note}"
            )


if __name__ == "__main__":
    main()
