"""The options a user sets to load a bundle, defined once: `LoadOptions` and the choices it accepts.

`recon-run reconstruct|encode|decode|vocode`, `recon-run dataset ...` and `recon-run serve` take the
same model options (`cli.options.model_options` builds them from `LoadOptions`), and
`serving.config.ServerConfig` extends `LoadOptions`, so the server's `RECON_*` variables read the same fields.
Every field is an argument of `Reconstructor.load` with the same default; the choices are the
constants of `executors.select`, which `Reconstructor.load` checks too. This module imports no engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .executors.select import AUTO, check_choices

if TYPE_CHECKING:
    from .reconstructor import Reconstructor

DEFAULT_MODEL: Final = Path("models/audioldm2-music")
"""Where `recon-export` writes by default."""
_Options = TypeVar("_Options", bound="LoadOptions")


@dataclass(frozen=True)
class LoadOptions:
    """Every `Reconstructor.load` setting a user chooses, with its defaults (see `Reconstructor.load`).

    The field order is kept: callers may build it positionally (model, backend, provider, precision,
    threads, cuda_graph, expect_digest, ...).
    """

    model: Path = DEFAULT_MODEL
    """The bundle folder (`Reconstructor.load`'s bundle_dir)."""
    backend: str = AUTO
    provider: str = AUTO
    precision: str = AUTO
    threads: int | None = None
    cuda_graph: bool = False
    expect_digest: str | None = None
    performance_hint: str | None = None
    """OpenVINO's hint; None: the runtime's default (latency)."""
    compile_cache: bool = True
    max_batch: int | None = None
    """Windows per graph run; None: the runtime's per-device default (8 on CUDA, 1 on the CPU)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        check_choices(self.provider, self.precision, self.backend, self.performance_hint)
        for name in ("threads", "max_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    def for_cpus(self: _Options, cpus: float) -> _Options:
        """These options for a Ray worker or replica that holds `cpus` CPUs: that many intra-op threads
        (rounded, at least 1) unless `threads` is set, not one per core of the node it lands on."""
        if self.threads is not None:
            return self
        return dataclasses.replace(self, threads=max(1, round(cpus)))

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `Reconstructor.load` these options stand for (all but the bundle)."""
        return {f.name: getattr(self, f.name) for f in fields(LoadOptions) if f.name != "model"}

    def load(self, stages: Sequence[str] | None = None, **settings: Any) -> Reconstructor:
        """`Reconstructor.load(model, stages=stages, ...)` with these options; `settings`: its other
        arguments (e.g. bucket_frames)."""
        from .reconstructor import Reconstructor

        return Reconstructor.load(self.model, stages=stages, **self.load_kwargs(), **settings)
