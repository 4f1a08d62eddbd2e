"""Exceptions whose messages are written for the person running the tool."""

from __future__ import annotations


class ReconError(Exception):
    """Base class: the message names the file or setting at fault and how to fix it."""


class BundleError(ReconError):
    """A model bundle is missing, incomplete, tampered with, or from another model."""


class AudioInputError(ReconError):
    """An input file or array cannot be used (missing, empty, not audio, NaN, wrong shape)."""


class OutputError(ReconError):
    """An output path cannot be written."""


class ProviderError(ReconError):
    """The requested execution provider or precision is not available."""


class NumericalError(ReconError):
    """A graph produced NaN or inf."""
