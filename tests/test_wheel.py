"""The wheel users install holds every module and data file under src/, and its console scripts
resolve inside it. Built offline (no build isolation) from a copy of the checkout; .ci/wheel-check
installs a wheel into a fresh venv and runs it."""

from __future__ import annotations

import ast
import configparser
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGES = ("recon_runtime", "recon_export")
SETUPTOOLS_MIN = (77, 0)  # reads the SPDX `license` string (and builds wheels itself); the `test` extra pins it
NOT_SHIPPED = ("__pycache__", "*.pyc", "*.egg-info")


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0,)


def shipped_files() -> set[str]:
    """What the wheel must hold: every file of both packages under src/, as paths inside the wheel."""
    files = set()
    for package in PACKAGES:
        for path in (SRC / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add(path.relative_to(SRC).as_posix())
    return files


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel, and what the build printed (pip -v shows the build backend's warnings)."""
    # a failure, not a skip: CI installs the test extra, and a skipped wheel check passes a broken wheel
    if _setuptools_version() < SETUPTOOLS_MIN:
        pytest.fail(
            f"building the wheel offline needs setuptools>={'.'.join(map(str, SETUPTOOLS_MIN))}, this environment "
            f"has {'.'.join(map(str, _setuptools_version()))}: install the test extra (pip install -e '.[test]')"
        )
    tree = tmp_path_factory.mktemp("tree")  # a copy: setuptools' build/ folder never lands in the checkout
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(SRC, tree / "src", ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index"]
    r = subprocess.run([*cmd, "--wheel-dir", str(out), str(tree)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = out.glob("*.whl")
    return path, r.stdout + r.stderr


@pytest.fixture(scope="module")
def wheel(built: tuple[Path, str]) -> Path:
    return built[0]


def test_the_build_has_no_deprecation_warnings_and_the_license_is_spdx(built: tuple[Path, str]) -> None:
    """setuptools deprecates `license = { text = ... }` (builds unsupported after 2027-02-18): an SPDX string."""
    path, log = built
    warnings = [ln.strip() for ln in log.splitlines() if "DeprecationWarning" in ln]
    assert not warnings, warnings
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        fields = z.read(name).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in fields, fields


def test_the_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = shipped_files()
    assert "recon_runtime/executors/onnxruntime.py" in expected and len(expected) > 30
    page = {n.rsplit("/", 1)[1] for n in expected if n.startswith("recon_runtime/") and "/static/" in n}
    assert {"index.html", "app.js", "app.css"} <= page, f"the page's files are not under src/ ({page})"
    assert not (missing := sorted(expected - names)), f"{wheel.name} lacks {missing}"
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == set(PACKAGES), f"unexpected top-level entries in the wheel: {tops}"
    extra = sorted(n for n in names if n.split("/")[0] in PACKAGES and n not in expected)
    assert not extra, f"files in the wheel that src/ does not have (a stale build?): {extra}"


def _console_scripts(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as z:
        (entry_points,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(z.read(entry_points).decode())
    return dict(parser["console_scripts"])


def test_the_recon_run_entry_point_resolves_inside_the_wheel(wheel: Path, tmp_path: Path) -> None:
    scripts = _console_scripts(wheel)
    assert set(scripts) == {"recon-run", "recon-export"}, scripts
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # recon-export's module needs torch: its target is checked in the wheel's source, not imported
    module, attr = scripts["recon-export"].split(":")
    tree = ast.parse((site / (module.replace(".", "/") + ".py")).read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert attr in defined, f"recon-export -> {scripts['recon-export']}: no {attr} in {module}"
    # recon-run: loaded from the unpacked wheel only (it comes first on the path; the checkout's src/ is
    # where the editable install points), then run as a user would run `recon-run --help`
    code = textwrap.dedent(
        """
        import sys
        site, value = sys.argv[1], sys.argv[2]
        sys.path.insert(0, site)
        from importlib.metadata import EntryPoint
        main = EntryPoint("recon-run", value, "console_scripts").load()
        module = sys.modules[value.split(":")[0]]
        if not module.__file__.startswith(site):
            sys.exit(f"resolved outside the wheel: {module.__file__}")
        sys.argv = ["recon-run", "--help"]
        main()
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(site), scripts["recon-run"]], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("Usage: recon-run") and "reconstruct" in r.stdout, r.stdout
