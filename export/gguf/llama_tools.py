"""llama.cpp's own command-line tools (``llama-imatrix``, ``llama-quantize``, ``llama-perplexity``):
where they are, and running them.

``make llama-tools`` (scripts/build-llama-tools.sh) builds them once from the llama.cpp source
vendored in the pinned llama-cpp-python sdist, into ``<pip cache>/medgemma-edge-wheels/
llama-tools-<version>-<cpu level>-<flags hash>/bin`` beside the wheel it built. They are found
here by the installed llama-cpp-python's version, so the tools and the runtime's library are the
same llama.cpp. ``$MEDGEMMA_EDGE_LLAMA_TOOLS`` names a directory holding them instead (a build
of your own; recorded as such).

Nothing here re-implements what the tools do: arguments in, the tool's output parsed by the
callers (:mod:`export.gguf.imatrix`, :mod:`export.gguf.kl`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from edge.errors import EdgeError, MissingDependency

log = logging.getLogger(__name__)

TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")
ENV = "MEDGEMMA_EDGE_LLAMA_TOOLS"
MAKE_TARGET = "make llama-tools"
CACHE_SUBDIR = "medgemma-edge-wheels"
_TAIL = 40  # output lines kept for an error message's context (logged, not shown)


@dataclass(frozen=True)
class Tools:
    """A directory holding the three tools, with what built them."""

    bin: Path
    info: dict  # BUILD-INFO.json of a cached build; {"origin": "MEDGEMMA_EDGE_LLAMA_TOOLS"} otherwise

    def path(self, name: str) -> Path:
        return self.bin / name

    def describe(self) -> dict:
        """What the manifest records about the tools an export ran."""
        keys = ("llama_cpp_python", "level", "flags_key", "origin")
        return {"bin": str(self.bin), **{k: self.info[k] for k in keys if k in self.info}}


def _llama_cpp_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


@cache
def pip_cache_dir() -> Path:
    """pip's cache directory, as ``pip cache dir`` (and so the Makefile) sees it."""
    if os.environ.get("PIP_CACHE_DIR"):
        return Path(os.environ["PIP_CACHE_DIR"]).expanduser()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "cache", "dir"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        if out:
            return Path(out)
    except (OSError, subprocess.SubprocessError):
        pass
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pip"


def _flags_line() -> str:
    """/proc/cpuinfo's first ``flags`` line (what the build script hashes for a native build)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _runs_here(info: dict) -> bool:
    """Whether a cached build's CPU level runs on this machine (a portable build lists the
    instruction sets it needs; a native one was built for one machine's flags)."""
    if info.get("arch") and info["arch"] != platform.machine():
        return False
    line = _flags_line()
    if info.get("cpu") == "native":
        return bool(line) and info.get("level", "").endswith(
            hashlib.sha256((line + "\n").encode()).hexdigest()[:8]
        )
    need = set(str(info.get("requires", "")).split())
    return not need or need <= set(line.partition(":")[2].split())


def _complete(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / t, os.X_OK) for t in TOOLS)


def _missing(reason: str) -> MissingDependency:
    return MissingDependency(
        f"{reason}: run `{MAKE_TARGET}` (builds llama-imatrix, llama-quantize and llama-perplexity "
        f"once from the llama-cpp-python sdist, ~10 min on 2 cores), or set {ENV} to a directory "
        f"holding them"
    )


def find_tools() -> Tools:
    """The tools this export runs: ``$MEDGEMMA_EDGE_LLAMA_TOOLS``, else the cached build for the
    installed llama-cpp-python.

    Raises:
        MissingDependency: not built (the message names ``make llama-tools``), built for another
            CPU, or ``$MEDGEMMA_EDGE_LLAMA_TOOLS`` lacks one of them.
    """
    override = os.environ.get(ENV)
    if override:
        bin_dir = Path(override).expanduser()
        if (bin_dir / "bin").is_dir() and not _complete(bin_dir):
            bin_dir = bin_dir / "bin"
        missing = [t for t in TOOLS if not os.access(bin_dir / t, os.X_OK)]
        if missing:
            raise _missing(f"{ENV}={override} has no executable {', '.join(missing)}")
        return Tools(bin_dir, {"origin": ENV})
    version = _llama_cpp_version()
    if version is None:
        raise MissingDependency(
            "llama-cpp-python is not installed, so neither are its tools: pip install 'medgemma-edge[export]'"
        )
    root = pip_cache_dir() / CACHE_SUBDIR
    other_cpu = []
    runnable: list[Tools] = []
    for d in sorted(root.glob(f"llama-tools-{version}-*")):
        if ".partial" in d.name or not _complete(d / "bin"):
            continue
        try:
            info = json.loads((d / "BUILD-INFO.json").read_text())
        except (OSError, ValueError):
            continue
        if _runs_here(info):
            runnable.append(Tools(d / "bin", {**info, "origin": "cache"}))
        else:
            other_cpu.append(f"{d.name} (needs {info.get('requires') or 'the CPU it was built on'})")
    if runnable:  # the newest build: an older one is what a changed build script replaced
        return max(runnable, key=lambda t: str(t.info.get("built", "")))
    if other_cpu:
        raise _missing(
            f"the cached llama.cpp tools were built for another CPU: {', '.join(other_cpu)}; "
            "rebuild here (LLAMA_TOOLS_CPU=native for this machine only)"
        )
    raise _missing(f"llama.cpp's tools for llama-cpp-python {version} are not built in {root}")


def _last_error(lines: list[str]) -> str:
    """The tool's most telling line: its last error, else its last line."""
    for line in reversed(lines):
        if re.search(r"\berror\b|\bfailed\b|unable|invalid|not enough|need at least", line, re.I):
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def run_tool(
    tools: Tools,
    name: str,
    args: list[str],
    *,
    what: str,
    on_line: Callable[[str], None] | None = None,
    log_file: Path | None = None,
    cwd: Path | None = None,
) -> str:
    """Run one tool to completion and return its whole output (stdout and stderr together).

    Args:
        what: what the run does, for the error ("computing the importance matrix").
        on_line: called with each output line as it arrives (progress parsing).
        log_file: where to keep the full output (a scratch file; it names paths, no text).
        cwd: the tool's working directory (relative paths in ``args`` are read from there).

    Raises:
        EdgeError: the tool failed: its exit status and its last error line.
    """
    cmd = [str(tools.path(name)), *args]
    log.info("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    lines: list[str] = []
    # the tools' own logs go to stderr and their results to stdout: read both, in order
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        # OpenMP threads that spin while waiting for work make a tool 30x slower on a busy
        # machine (measured: 13 s vs 0.4 s for one KL run of the tiny twin); passive waiting
        # costs next to nothing on an idle one. A policy set by the user is kept.
        env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "LLAMA_LOG_COLORS": "0"},
        cwd=cwd,
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if on_line:
                    on_line(line)
            rc = proc.wait()
        except BaseException:  # Ctrl-C or a callback's error: the tool must not outlive us
            proc.kill()
            proc.wait()
            raise
    out = "\n".join(lines)
    if log_file is not None:
        log_file.write_text(out + "\n")
    log.info("%s finished in %.1fs (exit %d)", name, time.perf_counter() - t0, rc)
    if rc != 0:
        log.warning("%s output (last %d lines):\n%s", name, _TAIL, "\n".join(lines[-_TAIL:]))
        raise EdgeError(f"{name} failed {what} (exit {rc}): {_last_error(lines)}")
    return out


def count_tokens(model: Path, text: Path, *, parse_special: bool = False) -> int:
    """How many tokens ``text`` is for ``model``'s tokenizer (as the tools count them: with BOS).

    The tools refuse a text shorter than two chunks, but exit before their log is flushed, so
    the caller checks first and says so in one line.
    """
    from llama_cpp import Llama

    from export.gguf.fidelity import quiet_llama

    with quiet_llama():
        llm = Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        data = text.read_bytes()
        return len(llm.tokenize(data, add_bos=True, special=parse_special))
    finally:
        with quiet_llama():
            llm.close()
