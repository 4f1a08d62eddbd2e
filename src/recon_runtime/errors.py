"""Exceptions whose messages are written for the person running the tool."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Final

ONNXRUNTIME_EXTRAS: Final = ("cpu", "gpu")  # which onnxruntime wheel: exactly one, the user's choice


def install_hint(*extras: str) -> str:
    """How to add optional parts: the extras by name, installed from the project's clone.

    No package index publishes this project, so a hint never names it as a package to fetch (whoever
    registered that name would choose what users install). The onnxruntime extra is the user's
    choice (cpu or gpu), so the command is given with both.
    """
    others = [e for e in extras if e not in ONNXRUNTIME_EXTRAS]
    named = " and ".join(f"`{e}`" for e in others) if others else "`cpu` (or `gpu`)"
    plural = "s" if len(others) > 1 else ""
    cpu, gpu = (",".join([base, *others]) for base in ONNXRUNTIME_EXTRAS)
    return (
        f"add the {named} extra{plural}: run pip install '.[{cpu}]' (or '.[{gpu}]' with onnxruntime-gpu) "
        "in your audioldm2-recon clone"
    )


def describe(e: BaseException, out_of_memory: str = "out of memory") -> str:
    """The one line for any error: our own as written, a MemoryError as `out_of_memory`, anything else
    with its type and its message on one line; never a traceback. Every part of the program (the CLI,
    a batch's failed file, the server's load failure, a dataset's error row) says an error with it."""
    if isinstance(e, ReconError):
        return str(e)
    if isinstance(e, MemoryError):
        return out_of_memory
    return f"{type(e).__name__}: {' '.join(str(e).split()) or 'no message'}"


def failure_message(where: str, e: BaseException, out_of_memory: str = "out of memory") -> str:
    """`describe(e)` for a failed file or input, naming `where` unless the line already does."""
    text = describe(e, out_of_memory)
    return text if where in text else f"{where}: {text}"


def require(modules: Sequence[str], needs: str, *extras: str) -> None:
    """Import `modules` now, or refuse in one line: `needs` (what needs them) and how to add `extras`."""
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        raise ReconError(f"{needs}: {install_hint(*extras)}") from None


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
    """A graph (or the input's level restored after it) produced NaN or inf.

    `input_caused` is True where the input's values, not a lower precision, must be what overflowed:
    the graphs ran with float32's range (fp32, bf16, int8), or the result at the input's level is past
    float32's range. A server then answers its client 422 (the input is at fault); False (fp16 graphs)
    means fp32 may succeed where this did not.
    """

    def __init__(self, message: str, input_caused: bool = False):
        super().__init__(message)
        self.input_caused = input_caused
