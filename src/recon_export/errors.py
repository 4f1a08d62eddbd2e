"""Export errors; the CLI prints their message as one line."""

from __future__ import annotations

from recon_runtime.errors import ReconError


class CheckpointError(ReconError):
    """The checkpoint cannot be found, downloaded, or is not an AudioLDM-family VAE/vocoder."""


class ExportError(ReconError):
    """A graph could not be exported, converted or written."""


class ParityError(ReconError):
    """Exported graphs differ from the PyTorch reference by more than the threshold."""
