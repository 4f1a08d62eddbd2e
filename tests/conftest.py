"""Shared fixtures: checkpoints saved in the hub's layout, bundles exported from them, real audio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ALSA_DIR = Path("/usr/share/sounds/alsa")
FREEDESKTOP_DIR = Path("/usr/share/sounds/freedesktop/stereo")

torch_missing = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("torch", "diffusers", "transformers", "onnx")),
    reason="export tests need the `export` extra (torch, diffusers, transformers, onnx)",
)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a console script as a user would (a real process: exit code, stderr, no traceback)."""
    exe = Path(sys.executable).with_name(args[0])
    return subprocess.run([str(exe), *args[1:]], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)


def write_checkpoint(folder: Path, config: str = "tiny", seed: int = 0) -> Path:
    from recon_export.checkpoint import build_random, save_checkpoint

    return save_checkpoint(build_random(config, seed), folder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-layout folder (vae/, vocoder/, safetensors) of the tiny architecture."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-audioldm2", "tiny", seed=3)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A validated fp16+fp32 bundle exported from the saved tiny checkpoint, through the real load path."""
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(load_checkpoint(str(tiny_checkpoint)), out)
    return out


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exact audioldm2-music architecture with seeded random weights, saved like the hub."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "full-audioldm2-music", "audioldm2-music", seed=1)


@pytest.fixture(scope="session")
def full_bundle(full_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("bundles") / "full"
    export_bundle(load_checkpoint(str(full_checkpoint)), out)
    return out


@pytest.fixture(scope="session")
def real_speech() -> Path:
    """48 kHz speech from alsa-utils (installed by .ci/run; tests skip without it)."""
    path = ALSA_DIR / "Front_Center.wav"
    if not path.is_file():
        pytest.skip(f"real speech needs the Debian package alsa-utils ({path} missing; apt-get install alsa-utils)")
    return path


@pytest.fixture(scope="session")
def real_stereo() -> Path:
    """44.1 kHz stereo Ogg from sound-theme-freedesktop (installed by .ci/run; tests skip without it)."""
    path = FREEDESKTOP_DIR / "bell.oga"
    if not path.is_file():
        pytest.skip(f"real stereo audio needs the Debian package sound-theme-freedesktop ({path} missing)")
    return path


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
