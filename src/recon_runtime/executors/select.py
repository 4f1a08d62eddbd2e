"""The values the runtime accepts for provider, precision, backend and performance hint, defined once.

`Reconstructor.load`, `LoadOptions` and the CLI's choices all read them from here, below the
reconstructor (so `options`, which builds a Reconstructor, and `reconstructor` import no circle).
"""

from __future__ import annotations

from typing import Final

from ..contract import BF16, FP16, FP32, INT8
from ..errors import ProviderError
from . import BACKENDS
from .base import PERFORMANCE_HINTS

AUTO: Final = "auto"
CPU: Final = "cpu"
CUDA: Final = "cuda"
PROVIDER_CHOICES: Final = (AUTO, CUDA, CPU)
PRECISION_CHOICES: Final = (AUTO, BF16, FP16, FP32, INT8)
BACKEND_CHOICES: Final = (AUTO, *BACKENDS)


def check_choices(
    provider: str = AUTO, precision: str = AUTO, backend: str = AUTO, performance_hint: str | None = None
) -> None:
    """Refuse a value outside the runtime's choices, in one line naming the choices."""
    for what, value, choices in (
        ("provider", provider, PROVIDER_CHOICES),
        ("precision", precision, PRECISION_CHOICES),
        ("backend", backend, BACKEND_CHOICES),
    ):
        if value not in choices:
            raise ProviderError(f"unknown {what} {value!r}; use {', '.join(choices)}")
    if performance_hint is not None and performance_hint not in PERFORMANCE_HINTS:
        raise ProviderError(f"unknown performance hint {performance_hint!r}; use {', '.join(PERFORMANCE_HINTS)}")
