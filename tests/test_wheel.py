"""A wheel install runs (issue 13's acceptance): the project's wheel, installed with ``--no-deps``
into a fresh virtualenv that sees the dependencies but not the checkout, works from a directory
outside the checkout — the CLI's verbs, the registry's data, and no torch on ``import edge``.

The wheel and the virtualenv are built once for this module: the wheel from a copy of the source
tree (so no ``build/`` or ``*.egg-info`` is left in the checkout, and no stale ``build/lib`` file
slips into the wheel), without build isolation (offline), with this interpreter's pip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

pytestmark = pytest.mark.slow

# What a fresh clone would not have, or what must not travel into the wheel's build.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
    "bundles",
    ".cache",
    "artefacts",
    "test-artifacts",
    "node_modules",
)
# Environment that would let the checkout or a user's settings leak into the installed runtime.
SCRUBBED_ENV = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "VIRTUAL_ENV",
    "MEDGEMMA_EDGE_BUNDLE",
    "MEDGEMMA_EDGE_MODELS",
)


def _run(cmd: list, *, what: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a setup step; fail the test with its output (not a bare CalledProcessError)."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        pytest.fail(f"{what} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}")
    return r


@dataclass
class Installed:
    """The wheel installed in a fresh virtualenv; commands run from ``cwd``, outside the checkout."""

    wheel: Path
    venv: Path
    site: Path  # the new virtualenv's site-packages
    cwd: Path
    env: dict

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def cli(self, *args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        """``medgemma-edge ARGS`` through the console script the wheel installed."""
        return self.run(self.venv / "bin" / "medgemma-edge", *args, timeout=timeout, **kw)

    def run(self, *cmd, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.cwd,
            timeout=timeout,
            **kw,
        )


def _build_wheel(work: Path) -> Path:
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    dist = work / "dist"
    # --check-build-dependencies: without isolation pip would otherwise build with whatever
    # setuptools this venv has, older than pyproject's [build-system] requires or not.
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    pip += ["--check-build-dependencies", "-q", "-w", str(dist), str(src)]
    r = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        build = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]
        pytest.fail(
            f"building the wheel failed; the test venv needs pyproject's build requirements "
            f"{build['requires']} installed (pip install them, e.g. through the dev extra):\n{r.stdout}\n{r.stderr}"
        )
    wheels = sorted(dist.glob("medgemma_edge-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}, found {[w.name for w in wheels]}"
    return wheels[0]


def _fresh_venv(work: Path, wheel: Path) -> Installed:
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], what="creating a virtualenv")
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], what="site-packages"
        ).stdout.strip()
    )
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        what="installing the wheel (pip >= 22.3 for --python)",
    )
    # Then the dependencies: this interpreter's site-packages, added as a plain path (after the
    # install, so pip never sees the checkout's editable install there). The .pth files in a
    # directory added this way are not executed, so the editable install's stays inert and the
    # checkout invisible.
    deps = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    (site / "_test_dependencies.pth").write_text("".join(f"{d}\n" for d in deps), encoding="utf-8")
    cwd = work / "elsewhere"
    cwd.mkdir()
    assert not cwd.resolve().is_relative_to(ROOT), (
        f"{cwd} is inside the checkout; run pytest with --basetemp outside it"
    )
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONNOUSERSITE"] = "1"
    return Installed(wheel=wheel, venv=venv, site=site, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    return _fresh_venv(work, _build_wheel(work))


def _json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return json.loads(r.stdout)


def _source_files_the_wheel_needs() -> set[str]:
    """Wheel paths of every module of the four packages, every file of models/ (as edge/models/)
    and every file pyproject's package-data names."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    dirs = {p: ROOT.joinpath(*p.split(".")) for p in tool["packages"]} | {
        p: ROOT / d for p, d in tool.get("package-dir", {}).items()
    }
    want = set()
    for package, d in dirs.items():
        prefix = package.replace(".", "/")
        want |= {f"{prefix}/{p.name}" for p in d.glob("*.py")}
        for pattern in tool.get("package-data", {}).get(package, []):
            want |= {f"{prefix}/{p.relative_to(d).as_posix()}" for p in d.glob(pattern) if p.is_file()}
    want |= {
        f"edge/models/{p.relative_to(ROOT / 'models').as_posix()}"
        for p in (ROOT / "models").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and "bundles" not in p.parts
    }
    return want


def test_wheel_holds_every_module_and_the_registry(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    missing = sorted(_source_files_the_wheel_needs() - names)
    assert not missing, f"files of the source tree missing from {installed.wheel.name}: {missing}"
    assert {"edge/models/profiles.toml", "edge/models/templates/gemma3.jinja"} <= names
    strays = sorted(n for n in names if n.split("/")[0] in ("models", "tests", "benchmarks", "scripts"))
    assert not strays, f"the wheel ships files outside its packages: {strays[:10]}"


CHECK_INSTALL = """
import json, sys
import edge, edge.medgemma.model, edge.medsiglip.model
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
import android_bridge, export, medgemma_edge
from edge.bundle import registry
from edge.device import profiles
print(json.dumps({
    "heavy": heavy,
    "files": {m.__name__: m.__file__ for m in (edge, android_bridge, export, medgemma_edge)},
    "data_dir": str(registry.data_dir()),
    "models": sorted(registry.all_models()),
    "profiles": sorted(profiles.all_profiles()),
    "template": registry.read_text("templates/gemma3.jinja")[:200],
}))
"""


def test_installed_runtime_is_the_wheel_and_loads_no_torch(installed):
    out = _json(installed.run(installed.python, "-c", CHECK_INSTALL))
    assert out["heavy"] == [], f"import edge loaded {out['heavy']}"
    for name, file in out["files"].items():  # the wheel's copy, never the checkout
        assert Path(file).is_relative_to(installed.site), f"{name} imported from {file}, not {installed.site}"
    assert Path(out["data_dir"]).is_relative_to(installed.site), out["data_dir"]
    registry_files = {p.stem for p in (ROOT / "models").glob("*.toml")} - {"profiles"}
    assert set(out["models"]) == registry_files and "gemma3-270m" in out["models"]
    expected_profiles = tomllib.loads((ROOT / "models" / "profiles.toml").read_text(encoding="utf-8"))
    assert out["profiles"] == sorted(expected_profiles) and out["profiles"]
    assert out["template"].strip()


def test_console_script_help(installed):
    r = installed.cli("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: medgemma-edge")
    for verb in ("verify", "ask", "classify", "serve", "export"):
        assert verb in r.stdout


def test_verify_the_small_model_bundle(installed, small_model_bundle):
    out = _json(installed.cli("verify", str(small_model_bundle), "--json"))
    assert out["ok"] is True and out["files"]
    assert all(f["ok"] for f in out["files"])


def test_ask_the_small_model(installed, small_model_bundle):
    r = installed.cli(
        "ask",
        "-b",
        str(small_model_bundle),
        "What is the capital of France?",
        "--max-tokens",
        "8",
        "--ctx",
        "512",
        "--json",
    )
    out = _json(r)
    assert out["ok"] is True and out["text"].strip(), out
    assert 0 < out["usage"]["completion_tokens"] <= 8
    assert out["finish_reason"] in ("stop", "length")


def test_classify_on_the_tiny_twin(installed, medsiglip_bundle):
    image = installed.cwd / "film.png"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(image)
    out = _json(installed.cli("classify", "-b", str(medsiglip_bundle), str(image), "--json"))
    assert out["ok"] is True and out["synthetic"] is True
    assert out["results"] and all(isinstance(r["label"], str) for r in out["results"])
    mine = _json(
        installed.cli(
            "classify", "-b", str(medsiglip_bundle), "film.png", "--labels", "effusion,normal", "--json"
        )
    )
    assert sorted(r["label"] for r in mine["results"]) == ["effusion", "normal"]


def test_serve_stdio_answers_health(installed, small_model_bundle):
    """One ``health`` line on stdin, then EOF: the reply, its ``done``, and a clean exit."""
    request = json.dumps({"v": 1, "id": "h1", "op": "health"}) + "\n"
    r = installed.cli(
        "serve", "-b", str(small_model_bundle), "--ctx", "512", "--stdio", input=request, timeout=300
    )
    assert r.returncode == 0, r.stderr
    replies = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [m["type"] for m in replies] == ["result", "done"], replies
    assert all(m["v"] == 1 and m["id"] == "h1" for m in replies)
    result = replies[0]["result"]
    assert result["protocol"] == 1 and "stdio" in result["capabilities"]["transports"]
    assert result["models"]["medgemma"]["state"] in ("loading", "ready"), result["models"]
