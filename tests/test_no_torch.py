"""The runtime needs neither torch, diffusers nor transformers: proven with them made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import soundfile as sf

from .conftest import tone

HEAVY = ("torch", "diffusers", "transformers")

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {heavy!r}:
                raise ImportError(f"{{name}} is blocked for this test")
    sys.meta_path.insert(0, Block())
    """
).format(heavy=HEAVY)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_full_reconstruction_with_heavy_packages_unimportable(
    tiny_bundle: Path, tmp_path: Path, precision: str
) -> None:
    src = tmp_path / "in.wav"
    sf.write(str(src), tone(1.2, 22050), 22050)
    out = tmp_path / "out.wav"
    r = _python(f"""
        import sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("blocker failed")
        from recon_runtime.cli import main
        try:
            main(["reconstruct", {str(src)!r}, "-o", {str(out)!r}, "--model", {str(tiny_bundle)!r},
                  "--precision", {precision!r}, "--metrics", {str(tmp_path / "m.json")!r}])
        except SystemExit as e:
            code = e.code
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        print("heavy:", heavy, "exit:", code)
    """)
    assert "heavy: [] exit: 0" in r.stdout, r.stdout + r.stderr
    assert sf.info(str(out)).frames == round(1.2 * 16000)


def test_importing_every_runtime_module_loads_no_heavy_package() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import importlib, pkgutil, sys
        import recon_runtime
        for m in pkgutil.walk_packages(recon_runtime.__path__, "recon_runtime."):
            importlib.import_module(m.name)
        import librosa, soxr  # the front end's dependencies, imported as they are when used
        print(sorted(n for n in ("torch", "diffusers", "transformers") if n in sys.modules))
    """),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_base_install_metadata_lists_no_heavy_package() -> None:
    requires = metadata.requires("audioldm2-recon") or []
    base = [r for r in requires if "extra ==" not in r]
    assert base, "the base install must list its runtime dependencies"
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in base}
    assert not names & {"torch", "diffusers", "transformers", "onnx", "onnxscript"}, names
    assert {"numpy", "librosa", "soundfile", "click", "tqdm"} <= names
    extras = {r.split("extra ==")[1].strip().strip("'\"") for r in requires if "extra ==" in r}
    assert {"cpu", "gpu", "export", "test"} <= extras


def test_runtime_and_cli_import_no_ray() -> None:
    """Ray (and pyarrow) are the `ray` extra's: only a `recon-run dataset` job or `recon-run serve --ray`
    imports them (recon_runtime.serving.ray_serve imports Ray inside its functions, not at import)."""
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import sys
        import recon_runtime
        from recon_runtime import Reconstructor
        import recon_runtime.cli, recon_runtime.cli.dataset, recon_runtime.jobs.job, recon_runtime.cli.serve
        from recon_runtime.cli import main
        import importlib.util
        if importlib.util.find_spec("fastapi") is not None:  # the server's modules need the `serve` extra
            import recon_runtime.serving.app, recon_runtime.serving.ray_serve
        print(sorted(n for n in ("ray", "pyarrow") if n in sys.modules))
    """),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_importing_the_api_loads_no_inference_engine() -> None:
    """`from recon_runtime import Reconstructor` imports neither openvino nor onnxruntime (nor torch)."""
    r = _python("""
        import sys
        from recon_runtime import Reconstructor
        import recon_runtime.cli
        print(sorted(n for n in ("openvino", "onnxruntime", "torch") if n in sys.modules))
    """)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr


def test_openvino_backend_runs_with_heavy_packages_unimportable(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="needs the `openvino` extra")
    r = _python(f"""
        import sys
        import numpy as np
        from recon_runtime import Reconstructor
        rec = Reconstructor.load({str(tiny_bundle)!r}, provider="cpu", backend="openvino", cache_dir={str(tmp_path)!r})
        out = rec.reconstruct(np.zeros(16000, np.float32), 16000)
        print("heavy:", [m for m in {HEAVY!r} if m in sys.modules], rec.backend, out.shape)
    """)
    assert "heavy: [] openvino (16000,)" in r.stdout, r.stdout + r.stderr


def test_importing_the_runtime_and_its_cli_loads_no_server_package() -> None:
    """fastapi, uvicorn, httpx and prometheus_client (the `serve` extra) load only where they are used."""
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import sys
        import recon_runtime
        from recon_runtime import Reconstructor
        import recon_runtime.cli, recon_runtime.serving.batcher, recon_runtime.cli.serve
        from recon_runtime.cli import main
        print(sorted(n for n in ("fastapi", "uvicorn", "httpx", "prometheus_client", "starlette", "multipart")
                     if n in sys.modules))
    """),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
