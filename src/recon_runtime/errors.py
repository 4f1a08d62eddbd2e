"""Exceptions whose messages are written for the person running the tool."""

from __future__ import annotations


def failure_message(where: str, e: BaseException, out_of_memory: str = "out of memory") -> str:
    """One line for a failed file: our own errors as written, anything else with its type, never a traceback."""
    if isinstance(e, ReconError):
        text = str(e)
    elif isinstance(e, MemoryError):
        text = out_of_memory
    else:
        text = f"{type(e).__name__}: {' '.join(str(e).split()) or 'no message'}"
    return text if where in text else f"{where}: {text}"


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
