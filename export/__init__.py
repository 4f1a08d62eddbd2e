"""recon_export: turn the AudioLDM2 VAE and vocoder into a validated ONNX bundle (needs torch)."""

from .bundle import export_bundle
from .checkpoint import build_random, load_checkpoint, save_checkpoint

__all__ = ["export_bundle", "build_random", "load_checkpoint", "save_checkpoint"]
