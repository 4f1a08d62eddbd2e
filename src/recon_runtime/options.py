"""The options a user sets to load a bundle, defined once: `LoadOptions` and the choices it accepts.

`recon-run reconstruct|encode|decode|vocode`, `recon-run dataset ...` and `recon-run serve` take the
same model options (`cli.options.model_options` builds them from `LoadOptions`), and
`serving.config.ServerConfig` extends `LoadOptions`, so the server's `RECON_*` variables read the same fields.
Every field but `model` and `device` is an argument of `Reconstructor.load` with the same default;
`model` None is the default bundle (`locations.resolve_model`), `device` (`--device`) stands for
the provider and the CUDA device id (`devices.resolve_device`). The choices are the constants of
`executors.select`, which `Reconstructor.load` checks too. This module imports no engine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .devices import resolve_device
from .executors.select import AUTO, check_choices
from .locations import EXPLICIT, resolve_model
from .reconstructor import DEFAULT_OVERLAP_FRAMES, DEFAULT_WINDOW_FRAMES, check_windows

if TYPE_CHECKING:
    from .reconstructor import Reconstructor

_LOGGER = logging.getLogger(__name__)
_Options = TypeVar("_Options", bound="LoadOptions")


@dataclass(frozen=True)
class LoadOptions:
    """Every `Reconstructor.load` setting a user chooses, with its defaults (see `Reconstructor.load`).

    The field order is kept: callers may build it positionally (model, backend, provider, precision,
    threads, cuda_graph, expect_digest, ...).
    """

    model: Path | None = None
    """The bundle folder (`Reconstructor.load`'s bundle_dir); None: the default bundle, found by
    `locations.resolve_model` ($RECON_MODEL, ./models/audioldm2-music, the per-user folder)."""
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
    device: str | None = None
    """`--device`: N or cuda:N (the N-th CUDA device; makes `provider` auto mean CUDA), cuda or cpu;
    None: `provider` decides, device 0."""
    window_frames: int = DEFAULT_WINDOW_FRAMES
    """Log-mel frames per window of a long input (a multiple of 4; 1024 is the 10.24 s the VAE was trained on)."""
    overlap_frames: int = DEFAULT_OVERLAP_FRAMES
    """Log-mel frames neighbouring windows share and cross-fade (a multiple of 4, less than the window)."""

    def __post_init__(self) -> None:
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model))
        check_choices(self.provider, self.precision, self.backend, self.performance_hint)
        resolve_device(self.device, self.provider)  # refuses a bad --device, or one --provider contradicts
        for name in ("threads", "max_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        check_windows(self.window_frames, self.overlap_frames)

    @property
    def device_id(self) -> int:
        """The CUDA device `device` names (0 when it names none)."""
        return resolve_device(self.device, self.provider)[1]

    def resolved(self) -> LoadOptions:
        """These options with `model` the bundle to load: as given, or the default one (`resolve_model`,
        logged with where it was found). Raises BundleError when there is none (the places it looked)."""
        location = resolve_model(self.model)
        if location.origin != EXPLICIT:
            _LOGGER.info("%s", location.describe())
        return replace(self, model=location.path)

    def for_cpus(self: _Options, cpus: float) -> _Options:
        """These options for a Ray worker or replica that holds `cpus` CPUs: that many intra-op threads
        (rounded, at least 1) unless `threads` is set, not one per core of the node it lands on."""
        if self.threads is not None:
            return self
        return dataclasses.replace(self, threads=max(1, round(cpus)))

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `Reconstructor.load` these options stand for (all but the bundle)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(LoadOptions) if f.name not in ("model", "device")}
        kwargs["provider"], kwargs["device_id"] = resolve_device(self.device, self.provider)
        return kwargs

    def load(self, stages: Sequence[str] | None = None, **settings: Any) -> Reconstructor:
        """`Reconstructor.load(model, stages=stages, ...)` with these options (the default bundle when
        `model` is None); `settings`: its other arguments (e.g. bucket_frames)."""
        from .reconstructor import Reconstructor

        return Reconstructor.load(self.resolved().model, stages=stages, **self.load_kwargs(), **settings)
