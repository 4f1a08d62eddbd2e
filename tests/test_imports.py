"""No import circles, and dependencies that point one way: every module imports alone in a fresh
interpreter, the import graph of the source has no cycle (a lazy import inside a function counts: it
only moves the failure to run time), and each part of the runtime imports only the parts below it."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGES = ("recon_runtime", "recon_export")
# distributions whose import name is not their normalised name
IMPORT_NAMES = {"onnxruntime-gpu": "onnxruntime", "python-multipart": "python_multipart"}


def optional_imports() -> set[str]:
    """The top-level import names of the optional dependencies pyproject.toml declares
    ([project.optional-dependencies]): the only imports a module may lack and still be skipped."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = set()
    for requirements in extras.values():
        for requirement in requirements:
            dist = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)[0].lower()
            names.add(IMPORT_NAMES.get(dist, re.sub(r"[-.]", "_", dist)))
    return names


OPTIONAL = optional_imports()


def module_files() -> dict[str, Path]:
    """Every module of both packages, from the source tree: dotted name -> file."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((SRC / package).rglob("*.py")):
            parts = list(path.relative_to(SRC).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = module_files()


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module of ours that `name` names: itself, or its longest prefix that is a module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ours that `module` imports anywhere in its file (top level, functions, branches).

    `from pkg import x` counts as importing `pkg.x` when that is a module, else `pkg`. A package's
    parents, which Python initialises implicitly, are not counted: they are not a choice of the code.
    """
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(_resolve(alias.name, modules) or "")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else _resolve(base, modules) or "")
    found.discard("")
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    names = set(MODULES)
    return {m: imports_of(m, p, names) for m, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Absolute, relative, `from . import module`, and imports inside functions all make edges."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "def f():\n    from . import b\n    return b\n",
        "pkg/b.py": "import pkg.sub.c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import f\nfrom pkg import sub\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    names = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    graph = {
        "pkg": imports_of("pkg", pkg / "__init__.py", names),
        "pkg.a": imports_of("pkg.a", pkg / "a.py", names),
        "pkg.b": imports_of("pkg.b", pkg / "b.py", names),
        "pkg.sub": imports_of("pkg.sub", pkg / "sub" / "__init__.py", names),
        "pkg.sub.c": imports_of("pkg.sub.c", pkg / "sub" / "c.py", names),
    }
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.a", "pkg.sub"},
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_both_packages_have_no_import_cycle() -> None:
    graph = import_graph()
    assert {"recon_runtime", "recon_runtime.cli", "recon_export.cli"} <= set(graph)
    assert sum(map(len, graph.values())) > len(graph)  # the reader found the edges, not an empty graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# What each part of recon_runtime (its top-level module or package; "api" is the package's __init__)
# and recon_export may import of the two packages besides itself. Dependencies point one way: cli ->
# serving / jobs -> options -> reconstructor -> executors -> contract / errors; files are used from
# above; nothing imports cli; the runtime never imports recon_export. docs/architecture.md draws it.
BELOW_RECONSTRUCTOR = {"windows", "window_plan", "vocoding", "frontend", "contract", "errors"}
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "contract": {"errors"},
    "frontend": {"contract", "errors"},
    "windows": set(),
    "window_plan": {"windows"},
    "vocoding": {"window_plan", "executors", *BELOW_RECONSTRUCTOR},
    "executors": {"contract", "errors"},
    "reconstructor": {"executors", *BELOW_RECONSTRUCTOR},
    "api": {"reconstructor", "channels", "files", *BELOW_RECONSTRUCTOR},
    "options": {"reconstructor", "executors", "devices", "locations", *BELOW_RECONSTRUCTOR},
    "files": {"frontend", "contract", "errors"},
    "cluster": {"errors"},
    "devices": {"executors", *BELOW_RECONSTRUCTOR},
    "locations": {"files", *BELOW_RECONSTRUCTOR},
    "version": {"files", *BELOW_RECONSTRUCTOR},
    "channels": {"reconstructor", "files", *BELOW_RECONSTRUCTOR},
    "serving": {
        "channels",
        "locations",
        "devices",
        "version",
        "api",
        "options",
        "reconstructor",
        "files",
        "cluster",
        *BELOW_RECONSTRUCTOR,
    },
    "jobs": {
        "channels",
        "locations",
        "devices",
        "version",
        "options",
        "reconstructor",
        "files",
        "cluster",
        *BELOW_RECONSTRUCTOR,
    },
    "cli": {
        "api",
        "channels",
        "locations",
        "devices",
        "version",
        "options",
        "reconstructor",
        "executors",
        "files",
        "serving",
        "jobs",
        "cluster",
        *BELOW_RECONSTRUCTOR,
    },
    "recon_export": {
        "channels",
        "locations",
        "devices",
        "version",
        "api",
        "options",
        "reconstructor",
        "executors",
        "files",
        *BELOW_RECONSTRUCTOR,
    },
}


def part(module: str) -> str:
    """The part of the code a module belongs to (see MAY_IMPORT)."""
    names = module.split(".")
    if names[0] == "recon_export":
        return "recon_export"
    return names[1] if len(names) > 1 else "api"


def direction_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of one part by another that MAY_IMPORT does not allow, as "a imports b (part x -> y)"."""
    bad = []
    for module, imported in sorted(graph.items()):
        for other in sorted(imported):
            here, there = part(module), part(other)
            if here != there and there not in MAY_IMPORT.get(here, set()):
                bad.append(f"{module} imports {other} ({here} -> {there})")
    return bad


def test_the_direction_check_finds_an_import_that_points_up() -> None:
    graph = {
        "recon_runtime.executors.base": {"recon_runtime.serving.app", "recon_runtime.contract"},
        "recon_runtime.serving.app": {"recon_runtime.cli.options", "recon_runtime.serving.config"},
        "recon_runtime.files.audio": {"recon_runtime.reconstructor"},
        "recon_runtime.contract": {"recon_export.bundle"},
        "recon_runtime.cli.files": {"recon_runtime.serving.app", "recon_runtime.jobs.job"},
    }
    assert direction_violations(graph) == [
        "recon_runtime.contract imports recon_export.bundle (contract -> recon_export)",
        "recon_runtime.executors.base imports recon_runtime.serving.app (executors -> serving)",
        "recon_runtime.files.audio imports recon_runtime.reconstructor (files -> reconstructor)",
        "recon_runtime.serving.app imports recon_runtime.cli.options (serving -> cli)",
    ]


def test_dependencies_point_one_way() -> None:
    graph = import_graph()
    unknown = sorted({part(m) for m in graph} - set(MAY_IMPORT))
    assert not unknown, f"parts of the code with no place in MAY_IMPORT (give each one): {unknown}"
    assert not any(part(o) == "cli" for m, imported in graph.items() if part(m) != "cli" for o in imported)
    bad = direction_violations(graph)
    assert not bad, "imports that point the wrong way:\n" + "\n".join(bad)


# A module whose import fails only because a third-party package is not installed prints MISSING and
# the package; the executors turn the ImportError into a ProviderError, which keeps it as
# __context__. Only an optional dependency of pyproject.toml (an extra, or the export side's torch)
# may be missing: the test is then skipped with that reason. Anything else fails it (a typo'd
# import, or a dependency nobody declared, is no "not installed").
_ALONE = textwrap.dedent(
    """
    import importlib, importlib.util, sys
    name = sys.argv[1]
    try:
        importlib.import_module(name)
    except Exception as e:
        cause = e if isinstance(e, ImportError) else e.__context__
        top = (getattr(cause, "name", None) or "").split(".")[0]
        if isinstance(cause, ImportError) and top and top not in {packages!r} and not importlib.util.find_spec(top):
            print("MISSING", top)
            raise SystemExit(0)
        raise
    print("OK")
    """
).format(packages=PACKAGES)


def _import_alone(module: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _ALONE, module], capture_output=True, text=True, timeout=300, env=env)


def verdict(module: str, r: subprocess.CompletedProcess) -> str | None:
    """None when `module` imported; the reason to skip it when it lacks an optional dependency; else AssertionError."""
    assert r.returncode == 0, f"`import {module}` alone failed:\n{r.stderr}"
    last = r.stdout.strip().splitlines()[-1]
    if last.startswith("MISSING"):
        missing = last.split()[1]
        assert missing in OPTIONAL, (
            f"`import {module}` needs {missing}, which is not installed and is no optional dependency of "
            "pyproject.toml: a typo'd import, or a dependency to declare"
        )
        return f"{module} needs {missing}, which is not installed"
    assert last == "OK", r.stdout + r.stderr
    return None


def test_only_a_declared_optional_dependency_may_be_missing(tmp_path: Path) -> None:
    (tmp_path / "typo_mod.py").write_text("import numpyy\n")
    (tmp_path / "extra_mod.py").write_text("import not_installed_extra\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with pytest.raises(AssertionError, match="numpyy, which is not installed and is no optional dependency"):
        verdict("typo_mod", _import_alone("typo_mod", env))
    assert {"torch", "onnxruntime", "ray", "fastapi", "openvino", "matplotlib", "prometheus_client"} <= OPTIONAL
    assert "numpy" not in OPTIONAL  # a base dependency is never "optional"
    OPTIONAL.add("not_installed_extra")
    try:
        assert (
            verdict("extra_mod", _import_alone("extra_mod", env))
            == "extra_mod needs not_installed_extra, which is not installed"
        )
    finally:
        OPTIONAL.discard("not_installed_extra")


@pytest.fixture(scope="module")
def imported_alone() -> dict[str, subprocess.CompletedProcess]:
    """Every module imported alone, each in its own interpreter, as many at once as there are cores."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(sorted(MODULES), pool.map(_import_alone, sorted(MODULES))))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_alone_in_a_fresh_interpreter(
    module: str, imported_alone: dict[str, subprocess.CompletedProcess]
) -> None:
    reason = verdict(module, imported_alone[module])
    if reason:
        pytest.skip(reason)
