"""Which image-encoder engine this device runs, and the one-time calibration that decides it.

A bundle's image encoder can be run several ways, each an *engine* over one of its files:

| engine            | file (manifest precision)          | runtime      | compute                  |
|-------------------|------------------------------------|--------------|--------------------------|
| ort-fp32          | vision-fp32.onnx (fp32)            | onnxruntime  | fp32                     |
| ort-int8          | vision-int8.onnx (int8)            | onnxruntime  | dynamic int8 (today's)   |
| ort-int8-static   | vision-int8-static.onnx            | onnxruntime  | static QDQ int8          |
| ov-fp32           | vision-fp32.onnx (fp32)            | OpenVINO     | fp32                     |
| ov-bf16           | vision-fp32.onnx (fp32)            | OpenVINO     | bf16 (AVX512-BF16/AMX)   |
| ov-int8           | vision-openvino-int8.xml           | OpenVINO     | NNCF int8 + bf16 / fp32  |

:func:`candidates` lists the engines a bundle component can run here, best first: the engine a
device calibration recorded (``bench --quick`` times each on one image and keeps the fastest
that meets the fidelity bar, :func:`record`), else an order per CPU class measured in
benchmarks/bench_encoders.py; engines whose recorded fidelity misses the bar go last.
:func:`open_first` opens the first that works here and falls back down the list with one log
line (OpenVINO not installed, a file the runtime can't compile). The state lives in
``edge.files.data_dir()/device/encoders.json``, keyed by the component's fingerprint and the CPU.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

from edge.bundle.atomic import write_json_atomic
from edge.device import accel
from edge.errors import EdgeError, InputError
from edge.files import data_dir, read_json

log = logging.getLogger(__name__)

FIDELITY_BAR = 0.999  # min cosine vs the fp32 reference an engine must reach to be chosen
STATE = Path("device") / "encoders.json"


@dataclass(frozen=True)
class Engine:
    """One way to run an encoder file."""

    name: str
    precision: str  # the manifest precision of the file it runs
    runtime: str  # "onnxruntime" | "openvino"
    hint: str | None = None  # OpenVINO inference precision ("f32", "bf16"); "auto": bf16 where native

    def ov_hint(self) -> str | None:
        if self.hint != "auto":
            return self.hint
        return "bf16" if accel.cpu_class() == "bf16" else "f32"


ENGINES = {
    e.name: e
    for e in (
        Engine("ort-fp32", "fp32", "onnxruntime"),
        Engine("ort-int8", "int8", "onnxruntime"),
        Engine("ort-int8-static", "int8-static", "onnxruntime"),
        Engine("ov-fp32", "fp32", "openvino", "f32"),
        Engine("ov-bf16", "fp32", "openvino", "bf16"),
        Engine("ov-int8", "openvino-int8", "openvino", "auto"),
    )
}
DEFAULT_ENGINE = {"onnxruntime": {"fp32": "ort-fp32", "int8": "ort-int8", "int8-static": "ort-int8-static"}}
# best first, per CPU class. bf16: measured (benchmarks/bench_encoders.py, MedGemma-shaped tower at
# 896 px, random weights, 2 threads of a Xeon with AVX512-BF16/AMX, one run): ov-bf16 14.1 s, ov-int8
# 15.8 s (fidelity below the bar there), ort-int8 22.8 s, ov-fp32 39.2 s, ort-fp32 40.9 s; static
# QDQ with u8 activations 19.0 s against ort-int8's 28.8 s in a second run. The other classes follow
# what their kernels need (VNNI int8, no native bf16) until measured on such CPUs; a device
# calibration (bench --quick) replaces the order with its own timing.
ORDER = {
    "bf16": ("ov-bf16", "ov-int8", "ort-int8-static", "ort-int8", "ov-fp32", "ort-fp32"),
    "vnni": ("ort-int8-static", "ov-int8", "ort-int8", "ov-fp32", "ort-fp32", "ov-bf16"),
    "avx2": ("ort-int8", "ort-int8-static", "ov-int8", "ort-fp32", "ov-fp32", "ov-bf16"),
    "other": ("ort-int8", "ort-int8-static", "ort-fp32", "ov-int8", "ov-fp32", "ov-bf16"),
}
OV_ONLY = {"ov-bf16"}  # bf16 compute is only worth it where the CPU has it natively


def engine_for(entry: dict) -> str:
    """The engine a file entry's own ``fidelity`` was measured with."""
    if entry.get("engine") in ENGINES:
        return entry["engine"]
    return DEFAULT_ENGINE["onnxruntime"].get(entry.get("precision", ""), "ort-int8")


def fidelity_of(files: list[dict], engine: str) -> float | None:
    """The recorded min cosine of ``engine`` over a component's files (None: not measured)."""
    e = ENGINES[engine]
    for f in files:
        if f.get("precision") != e.precision or f.get("data_of"):
            continue
        if engine_for(f) == engine and "cosine_min" in f.get("fidelity", {}):
            return float(f["fidelity"]["cosine_min"])
        other = f.get("engine_fidelity", {}).get(engine)
        if other and "cosine_min" in other:
            return float(other["cosine_min"])
    return None


def _entry(files: list[dict], engine: str, roles: set[str]) -> dict | None:
    e = ENGINES[engine]
    return next(
        (
            f
            for f in files
            if f["role"] in roles and f.get("precision") == e.precision and not f.get("data_of")
        ),
        None,
    )


def candidates(
    files: list[dict],
    roles: set[str],
    *,
    fingerprint: str | None = None,
    bar: float = FIDELITY_BAR,
    preferred: str | None = None,
    low_memory: bool = False,
) -> list[tuple[Engine, dict]]:
    """The engines ``files`` can be run with on this device, best first, with their file entry.

    ``roles``: the roles of encoder files (e.g. {"vision-onnx", "vision-openvino"}). An explicit
    ``preferred`` engine goes first; then the calibrated choice for ``fingerprint``; then the CPU
    class's order. Engines below ``bar`` (or never measured) follow those that meet it. Engines
    whose runtime is not installed stay in place: :func:`open_first` logs the fallback once.
    ``low_memory`` (the phone profiles) puts the engines that hold fp32 weights (4x an int8
    file's memory) after the int8 ones, whatever the calibration chose.
    """
    order = list(ORDER[accel.cpu_class()])
    chosen = recorded_choice(fingerprint) if fingerprint else None
    for first in (chosen, preferred):
        if first in ENGINES:
            order.remove(first)
            order.insert(0, first)
    if accel.cpu_class() != "bf16" and preferred not in OV_ONLY and chosen not in OV_ONLY:
        order = [n for n in order if n not in OV_ONLY]
    have = [(ENGINES[n], _entry(files, n, roles)) for n in order]
    have = [(e, f) for e, f in have if f is not None]

    def rank(item) -> tuple[int, int]:
        e, _f = item
        fid = fidelity_of(files, e.name)
        heavy = low_memory and e.precision == "fp32" and e.name != preferred
        return (int(heavy), 0 if e.name in (preferred, chosen) or (fid is not None and fid >= bar) else 1)

    return sorted(have, key=rank)  # stable: the order above among equals


def open_first(
    cands: list[tuple[Engine, dict]], path_of, *, threads: int | None, gpu: bool = False, what: str
):
    """Open the first of ``cands`` that works here: returns (engine, entry, runner).

    ``path_of(entry)`` gives the file's path. A failure (OpenVINO not installed, a file the
    runtime can't compile) leaves one log line naming what runs instead; later engines of a
    runtime that failed are skipped without another.

    Raises:
        InputError: none could be opened (the last reason).
    """
    last: Exception | None = None
    dead: set[str] = set()
    live = list(cands)
    while live:
        engine, entry = live.pop(0)
        try:
            runner = accel.open_runner(
                path_of(entry), engine.runtime, threads=threads, hint=engine.ov_hint(), gpu=gpu
            )
        except (EdgeError, ImportError, OSError) as exc:
            last = exc
            if isinstance(exc, ImportError) or "not installed" in str(exc):
                dead.add(engine.runtime)
            live = [c for c in live if c[0].runtime not in dead]
            nxt = live[0][0].name if live else "nothing"
            log.warning(
                "%s: engine %s unavailable (%s); falling back to %s", what, engine.name, _why(exc), nxt
            )
            continue
        return engine, entry, runner
    raise InputError(f"{what}: no image-encoder engine could be opened ({_why(last)})")


def _why(exc: Exception | None) -> str:
    return str(exc).splitlines()[0][:160] if exc else "no encoder file"


# --- the device's calibration record ----------------------------------------------------------------


def device_key() -> str:
    """The CPU this record is valid for: model name and flags (a copied data dir on another CPU
    re-calibrates)."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = ",".join(sorted(accel.cpu_flags()))
    raw = f"{platform.machine()}|{model}|{flags}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def state_path() -> Path:
    return data_dir() / STATE


def _read_state() -> dict:
    try:
        state = read_json(state_path(), what="encoder calibration")
    except (OSError, InputError):
        return {}
    return state if isinstance(state, dict) else {}


def recorded_choice(fingerprint: str) -> str | None:
    """The engine a calibration on this CPU chose for the component ``fingerprint`` (or None)."""
    rec = _read_state().get(f"{fingerprint}@{device_key()}")
    choice = rec.get("choice") if isinstance(rec, dict) else None
    return choice if choice in ENGINES else None


def record(fingerprint: str, choice: str, figures: dict) -> Path:
    """Keep ``choice`` (and the timings and cosines behind it) as this device's engine for the
    component ``fingerprint``; written atomically."""
    if choice not in ENGINES:
        raise ValueError(f"unknown engine {choice!r}")
    state = _read_state()
    state[f"{fingerprint}@{device_key()}"] = {
        "choice": choice,
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cpu_class": accel.cpu_class(),
        "figures": figures,
    }
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, state)
    log.info("image encoder for %s on this device: %s (recorded in %s)", fingerprint, choice, path)
    return path
