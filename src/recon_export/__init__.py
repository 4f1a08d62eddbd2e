"""recon_export: turn the AudioLDM2 VAE and vocoder into a validated ONNX bundle (needs torch)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "export_bundle": "bundle",
    "build_random": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import on first use: `python -m recon_export.signals` must not load torch and the exporter first."""
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
