"""Benchmark: instances/s the DICOM node receives, against dcmtk's ``storescp`` on the same files.

Not a test. Both receivers run as their own process on this machine, in this run, writing into
a temp dir on the same disk; dcmtk's ``storescu`` sends the same files to each on one
association (timed from its start to its exit, association set-up included):

* small CT slices: ``--slices`` (default 200) distinct 128x128 instances made from pydicom's
  CT_small (39 KB each);
* large DX: ``--dx`` (default 5) distinct ~20 MB DX instances (2 byte noise, explicit VR LE).

The node is ``medgemma-edge dicom listen`` (parse, sha256, temp file + fsync + rename + folder
fsync, one SQLite transaction, per instance, before it answers success); ``storescp`` writes
each file and answers, without fsync. A third column runs the node on ``/dev/shm`` (a RAM disk:
no fsync cost). Both get 128 KiB PDUs (storescp's maximum ``-pdu 131072``; storescu sends at
most that to the node too) and dcmtk runs with ``TCP_NODELAY=1``. Each configuration runs
``--repeats`` times into a fresh directory; the table shows the median.

    .venv/bin/python benchmarks/bench_dicom.py [--slices 200] [--dx 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "unknown"
    found = set(re.findall(r"\b(avx512[a-z_0-9]*|avx2|amx[a-z_0-9]*|avx_vnni)\b", text))
    return " ".join(sorted(found)) or "none of avx2/avx512/amx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ct_slices(n: int, out: Path) -> list[Path]:
    import pydicom
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm")
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True)
    paths = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        paths.append(out / f"ct{i:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def dx_images(n: int, out: Path, mb: float = 20) -> list[Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_dicom import big_dx

    out.mkdir(parents=True)
    return [big_dx(out / f"dx{i}.dcm", mb=mb, seed=i) for i in range(n)]


# dcmtk leaves Nagle's algorithm on unless TCP_NODELAY is set: each small C-STORE then waits
# for a delayed ACK (~90 ms per CT slice here, for storescp and the node alike). Off for both.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _send(port: int, files: list[Path]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        ["storescu", "-aec", "BENCH", "-to", "60", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr[-500:]}")
    return dt


def run_node(files: list[Path], work: Path) -> float:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medgemma_edge",
            "dicom",
            "listen",
            "--data",
            str(work),
            "--port",
            "0",
            "--ae-title",
            "BENCH",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        port = int(line.split("listening on 127.0.0.1:")[1].split(",")[0])
        dt = _send(port, files)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    if f"stopped: {len(files)} stored" not in out:
        raise RuntimeError(f"the node did not store them all: {out} {err[-500:]}")
    return dt


def run_storescp(files: list[Path], work: Path) -> float:
    work.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "BENCH", "-pdu", "131072", "-od", str(work), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=DCMTK_ENV,
    )
    try:
        for _ in range(100):  # until it listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        dt = _send(port, files)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    got = len(list(work.iterdir()))
    if got != len(files):
        raise RuntimeError(f"storescp wrote {got} of {len(files)} files")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200, help="small CT instances (default 200)")
    ap.add_argument("--dx", type=int, default=5, help="~20 MB DX instances (default 5)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install dcmtk (scripts/system-packages.sh)")
    print(
        f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores; load {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-dicom-", dir=os.environ.get("BENCH_DIR")) as d:
        work = Path(d)
        print(f"receiving into {work} ({_fs(work)})")
        cases = [
            (f"CT 128x128 slice x{args.slices}", ct_slices(args.slices, work / "src-ct")),
            (f"DX ~20 MB x{args.dx}", dx_images(args.dx, work / "src-dx")),
        ]
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
        receivers = [("storescp", run_storescp, work), ("node", run_node, work)]
        if shm is not None:  # the node again, on a RAM disk: what is left without the fsyncs' cost
            receivers.append(("node-ram", run_node, Path(tempfile.mkdtemp(prefix="bench-dicom-", dir=shm))))
        rows = []
        try:
            for label, files in cases:
                size = sum(f.stat().st_size for f in files)
                times: dict[str, list[float]] = {name: [] for name, _, _ in receivers}
                for rep in range(args.repeats):
                    for name, fn, base in receivers:
                        dest = base / f"{name}-{label[:2]}-{rep}"
                        times[name].append(fn(files, dest))
                        shutil.rmtree(dest, ignore_errors=True)
                med = {k: statistics.median(v) for k, v in times.items()}
                rows.append((label, len(files), size / 2**20, med))
        finally:
            if shm is not None:
                shutil.rmtree(receivers[-1][2], ignore_errors=True)
    print(f"\nstorescu -> receiver, one association, median of {args.repeats} (association set-up included)")
    print(
        f"{'workload':<24} {'inst':>5} {'MiB':>6} {'storescp inst/s':>16} {'node inst/s':>12} {'ratio':>6} "
        f"{'node on RAM disk':>17} {'storescp MiB/s':>15} {'node MiB/s':>11}"
    )
    for label, n, mib, med in rows:
        ram = f"{n / med['node-ram']:>17.1f}" if "node-ram" in med else f"{'-':>17}"
        print(
            f"{label:<24} {n:>5} {mib:>6.1f} {n / med['storescp']:>16.1f} {n / med['node']:>12.1f} "
            f"{med['storescp'] / med['node']:>6.2f} {ram} {mib / med['storescp']:>15.1f} {mib / med['node']:>11.1f}"
        )
    print(
        "ratio = node / storescp (1.0: as fast). Per instance the node parses it, hashes it, writes a temp file,"
    )
    print(
        "fsyncs it, renames it, fsyncs the folder and commits its catalogue row, all before answering success;"
    )
    print(
        "storescp writes the file and answers (no fsync). 'node on RAM disk' (/dev/shm) shows the node without"
    )
    print("the disk's fsync cost.")


def _fs(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.splitlines()[-1]
        return out.split()[1]
    except (OSError, IndexError):
        return "filesystem unknown"


if __name__ == "__main__":
    main()
