"""`--version`: the package, the engines installed (from their metadata, none imported), a bundle's digest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recon_runtime import version as version_module
from recon_runtime.errors import BundleError
from recon_runtime.version import EXPORT_LIBRARIES, version_text


def test_version_names_the_package_the_engines_and_the_bundle(tiny_bundle: Path) -> None:
    from recon_runtime import read_contract

    text = version_text("recon-run", model=tiny_bundle)
    lines = text.splitlines()
    assert lines[0].startswith("recon-run 0.1.0 (audioldm2-recon, Python 3.")
    assert any(line.startswith("onnxruntime ") for line in lines)
    assert any(line.startswith("openvino ") for line in lines)
    c = read_contract(tiny_bundle)
    assert lines[-1] == f"bundle {tiny_bundle}: digest {c.digest}, fingerprint {c.fingerprint}"
    export = version_text("recon-export", EXPORT_LIBRARIES).splitlines()
    assert export[0].startswith("recon-export ") and any(line.startswith("torch ") for line in export)


def test_version_shows_the_onnxruntime_wheel_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def with_installed(installed: dict[str, str]) -> list[str]:
        monkeypatch.setattr(version_module, "distribution_version", lambda name: installed.get(name))
        return version_text("recon-run").splitlines()[1:]

    base = {"audioldm2-recon": "0.1.0"}
    assert with_installed({**base, "onnxruntime": "1.2"}) == ["onnxruntime 1.2", "openvino not installed"]
    assert with_installed({**base, "onnxruntime-gpu": "1.3"}) == ["onnxruntime-gpu 1.3", "openvino not installed"]
    assert with_installed(base) == ["onnxruntime not installed", "openvino not installed"]
    both = with_installed({**base, "onnxruntime": "1.2", "onnxruntime-gpu": "1.3", "openvino": "9"})
    assert both[:3] == ["onnxruntime 1.2", "onnxruntime-gpu 1.3", "openvino 9"] and both[3].startswith("warning: both")


def test_version_of_a_broken_bundle_is_its_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle folder"):
        version_text("recon-run", model=tmp_path / "none")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "recon.json").write_text(json.dumps([]))
    with pytest.raises(BundleError, match="expected a JSON object"):
        version_text("recon-run", model=bad)


def test_version_imports_no_engine() -> None:
    code = (
        "import sys\nfrom recon_runtime.version import version_text\nversion_text('recon-run')\n"
        "print(sorted(m for m in ('onnxruntime', 'openvino', 'torch') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
