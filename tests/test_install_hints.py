"""Install hints name the extra and the install from the clone, never a package name on an index."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import soundfile as sf

from recon_runtime.errors import install_hint

from .conftest import tone

ROOT = Path(__file__).resolve().parents[1]
# the project's distribution name as something to fetch: `pip install 'audioldm2-recon[...]'` and the like
BY_NAME = re.compile(r"audioldm2-recon\[|pip install\s+(-\S+\s+)*['\"]?audioldm2-recon\b")


def test_no_message_or_doc_installs_the_project_by_name() -> None:
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "src").rglob("*.py")]
    assert len(files) > 20
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
            if BY_NAME.search(line)]  # fmt: skip
    assert not hits, "install by package name (no index publishes it): " + ", ".join(hits)


def test_hint_names_the_extras_and_the_install_from_the_clone() -> None:
    assert install_hint("ray", "serve") == (
        "add the `ray` and `serve` extras: run pip install '.[cpu,ray,serve]' (or '.[gpu,ray,serve]' with "
        "onnxruntime-gpu) in your audioldm2-recon clone"
    )
    assert "pip install '.[cpu]' (or '.[gpu]'" in install_hint("cpu")


def test_plot_without_matplotlib_says_which_extra_and_how(tiny_bundle: Path, tmp_path: Path) -> None:
    """Through the real CLI, with matplotlib made unimportable."""
    src = tmp_path / "in.wav"
    sf.write(str(src), tone(0.5), 16000)
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "matplotlib":
                    raise ImportError(f"{{name}} is blocked for this test")
        sys.meta_path.insert(0, Block())
        from recon_runtime.cli import main
        main(["reconstruct", {str(src)!r}, "-o", {str(tmp_path / "out.wav")!r}, "--model", {str(tiny_bundle)!r},
              "--plot", {str(tmp_path / "p.png")!r}])
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: {tmp_path / 'p.png'}: --plot needs matplotlib: add the `plot` extra: run pip install "
        "'.[cpu,plot]' (or '.[gpu,plot]' with onnxruntime-gpu) in your audioldm2-recon clone"
    ], r.stderr
    assert "Traceback" not in r.stderr
