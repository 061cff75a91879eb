"""Guards of the architecture (shared/DESIGN.md, "Layout"): which package may import which, what
the device library never does, and that the wheel's package list matches the source tree.

Arrows point down only: medgemma_edge -> (export, android_bridge) -> edge. The import graph is
read statically (ast), so an import inside a function or behind ``importlib.import_module`` counts
as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

from conftest import ROOT

# Top-level packages of the distribution, and the source directory each one lives in.
TOP_LEVEL = ("edge", "export", "android_bridge", "medgemma_edge")
# models/ (the registry's data) is installed as the package edge.models (pyproject's package-dir).
MAPPED = {"edge.models": "models"}

# package -> the packages it must never import
FORBIDDEN: dict[str, frozenset[str]] = {
    "edge": frozenset({"export", "android_bridge", "medgemma_edge"}),
    "export": frozenset({"android_bridge", "medgemma_edge"}),
    "android_bridge": frozenset({"export", "medgemma_edge"}),
}

# What importing the device library must never load: the workstation stack, the optional extras
# that code must import lazily, and the packages above edge.
NOT_LOADED_BY_EDGE = (
    "torch",
    "transformers",
    "optimum",
    "onnx",
    "pydicom",
    "starlette",
    "uvicorn",
    "export",
    "android_bridge",
    "medgemma_edge",
)


def _source_dirs(package: str) -> list[tuple[str, Path]]:
    """(dotted name, directory) of the roots whose files belong to ``package``."""
    roots = [(package, ROOT / package)]
    roots += [(name, ROOT / d) for name, d in MAPPED.items() if name.split(".")[0] == package]
    return roots


def _modules(package: str) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every .py file of ``package``, subpackages included."""
    for base, root in _source_dirs(package):
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join([base, *parts]), path


def _resolve(name: str, level: int, module: str, is_package: bool) -> str:
    """The absolute name of a (possibly relative) import made in ``module``."""
    if level == 0:
        return name
    parts = module.split(".")
    if not is_package:
        parts.pop()
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*base, name] if name else base)


def _imports(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in a file: statements anywhere (functions,
    ``if TYPE_CHECKING``) and literal names passed to ``importlib.import_module``/``__import__``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, _resolve(node.module or "", node.level, module, is_package)
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
                level = len(name) - len(name.lstrip("."))
                yield node.lineno, _resolve(name[level:], level, module, is_package)


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("import_module", "__import__")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_sources_of_every_package_are_found():
    """The walk below sees real code (a renamed directory must not make every check vacuous)."""
    for package in TOP_LEVEL:
        assert len(list(_modules(package))) >= 2, f"no modules found for {package} under {ROOT}"


def test_imports_point_down_only():
    """edge imports none of export, android_bridge, medgemma_edge; export and android_bridge
    import neither each other nor the CLI."""
    offenders = []
    for package, forbidden in FORBIDDEN.items():
        for module, path in _modules(package):
            for line, name in _imports(path, module):
                if name.split(".")[0] in forbidden:
                    offenders.append(f"{_rel(path)}:{line}: {package} imports {name}")
    assert not offenders, "imports that point up (medgemma_edge -> (export, android_bridge) -> edge):\n" + (
        "\n".join(offenders)
    )


def test_edge_has_no_argparse_and_no_print():
    """The device library parses no command line and prints nothing (logging only)."""
    offenders = []
    for module, path in _modules("edge"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in _imports(path, module):
            if name.split(".")[0] == "argparse":
                offenders.append(f"{_rel(path)}:{line}: imports argparse")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{_rel(path)}:{node.lineno}: calls print()")
    assert not offenders, "edge/ is a library: no argparse, no print (use logging):\n" + "\n".join(offenders)


def _packages_in_tree() -> set[str]:
    """Every directory that is a package (an __init__.py, all the way up) under the sources."""
    found = set()
    for package in TOP_LEVEL:
        for base, root in _source_dirs(package):
            for init in root.rglob("__init__.py"):
                rel = init.parent.relative_to(root)
                chain = [root.joinpath(*rel.parts[: i + 1]) for i in range(len(rel.parts))]
                if all((d / "__init__.py").is_file() for d in chain):
                    found.add(".".join([base, *rel.parts]))
    return found


def test_wheel_package_list_matches_the_tree():
    """pyproject lists its packages explicitly (models/ is mapped to edge.models); a new
    subpackage missing from that list would be missing from the wheel."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(tool["packages"])
    assert len(listed) == len(tool["packages"]), "pyproject's [tool.setuptools] packages has duplicates"
    assert tool.get("package-dir", {}) == MAPPED, "package-dir should map edge.models to models/"
    in_tree = _packages_in_tree()
    missing, stale = sorted(in_tree - listed), sorted(listed - in_tree)
    assert not missing and not stale, (
        f"pyproject.toml [tool.setuptools] packages disagrees with the source tree: "
        f"add {missing}, remove {stale}"
    )


def test_every_directory_with_python_code_is_a_package():
    """A directory of .py files without __init__.py is a namespace package: not in the list above,
    so not in the wheel."""
    offenders = []
    for package in TOP_LEVEL:
        for _, root in _source_dirs(package):
            for path in root.rglob("*.py"):
                if "__pycache__" in path.parts:
                    continue
                for d in [path.parent, *path.parent.parents]:
                    if d == root.parent:
                        break
                    if not (d / "__init__.py").is_file():
                        offenders.append(_rel(path))
                        break
    assert not offenders, "modules outside any package (add an __init__.py):\n" + "\n".join(sorted(offenders))


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import edge
failed = []
names = ["edge", "edge.models"]
names += [m.name for m in pkgutil.walk_packages(edge.__path__, "edge.", onerror=failed.append)]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps({"modules": names, "failed": [str(f) for f in failed], "loaded": loaded}))
"""


def test_importing_all_of_edge_loads_no_torch_nor_transformers():
    """Every module of the device library imports on a device: without the workstation stack,
    without the optional extras, without the layers above it."""
    r = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, json.dumps(NOT_LOADED_BY_EDGE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = {name for name, _ in _modules("edge")}
    assert expected <= set(out["modules"]), f"not imported: {sorted(expected - set(out['modules']))}"
    assert not out["failed"], "edge modules that fail to import:\n" + "\n".join(out["failed"])
    assert out["loaded"] == [], f"importing every module of edge/ loaded {out['loaded']}"
