"""What the README's set-up line writes into the clone is ignored by git (so `git status` stays clean)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = "models/audioldm2-music"  # recon-export's default --out
OUTPUT_OPTIONS = ("-o", "--out", "--metrics", "--plot")


def setup_line() -> str:
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if "python3 -m venv" in line]
    assert len(lines) == 1, f"expected one set-up line in README.md, found {lines}"
    return lines[0]


def written_paths(line: str) -> list[str]:
    """Every path the set-up line's commands write, relative to the clone (a folder as a file inside it)."""
    paths: list[str] = []
    for command in line.split("&&"):
        args = shlex.split(command)
        if args[:3] == ["python3", "-m", "venv"]:
            paths.append(args[3] + "/pyvenv.cfg")
        elif args[:3] == ["pip", "install", "-e"]:
            paths.append("src/audioldm2_recon.egg-info/PKG-INFO")  # setuptools' editable metadata
        elif args[:3] == ["python", "-m", "recon_export.signals"]:
            paths.append(args[-1])
        elif args[0] in ("recon-export", "recon-run"):
            outs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in OUTPUT_OPTIONS]
            if args[0] == "recon-export" and "--out" not in args:
                outs.append(DEFAULT_BUNDLE)
            paths += [p if Path(p).suffix else p + "/recon.json" for p in outs]
    return paths


def test_the_reader_finds_what_the_set_up_writes() -> None:
    paths = written_paths(setup_line())
    assert {".venv/pyvenv.cfg", "demo.wav", "out/demo.wav", "out/metrics.json"} <= set(paths), paths
    assert any(p.startswith("models/") for p in paths), paths


def test_git_ignores_everything_the_set_up_writes() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git clone of the project")
    paths = written_paths(setup_line())
    r = subprocess.run(
        ["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *paths],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    not_ignored = [line.split("\t", 1)[1] for line in r.stdout.splitlines() if line.startswith("::")]
    assert r.returncode in (0, 1) and len(r.stdout.splitlines()) == len(paths), r.stdout + r.stderr
    assert not not_ignored, f"the README's set-up writes these, and .gitignore does not cover them: {not_ignored}"
