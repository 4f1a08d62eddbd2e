"""`--device`: which GPU runs the graphs, as onnxruntime's CUDA provider option `device_id`.

Accepted: `N` or `cuda:N` (the N-th CUDA device, counted as CUDA counts them: after
`CUDA_VISIBLE_DEVICES` has picked and renumbered the visible ones), `cuda` (device 0) and `cpu`.
Naming a GPU makes `--provider auto` mean CUDA, so a run meant for GPU 1 fails in one line when
CUDA does not start instead of falling back to the CPU; an explicit `--provider` must agree.
The result feeds `ExecutorOptions.device_id`, which the onnxruntime executor passes to the CUDA
provider (`{"device_id": str(N)}`) and to its IO bindings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from .errors import ProviderError
from .executors.select import AUTO, CPU, CUDA

DEFAULT_DEVICE_ID: Final = 0
_CUDA_DEVICE: Final = re.compile(r"(?:cuda:)?(\d+)")
DEVICE_HELP: Final = "N or cuda:N (the N-th CUDA device), cuda (device 0) or cpu"


@dataclass(frozen=True)
class Device:
    """A parsed `--device`: the provider it implies (None for no choice) and the CUDA device id."""

    provider: str | None
    device_id: int = DEFAULT_DEVICE_ID


def parse_device(value: str | None) -> Device:
    """`--device` as given -> Device; None (not given) leaves the provider to `--provider`.

    Raises:
        ProviderError: not one of DEVICE_HELP.
    """
    if value is None:
        return Device(None)
    text = value.strip().lower()
    if text == CPU:
        return Device(CPU)
    if text == CUDA:
        return Device(CUDA)
    match = _CUDA_DEVICE.fullmatch(text)
    if match is None:
        raise ProviderError(f"--device {value!r}: use {DEVICE_HELP}")
    return Device(CUDA, int(match.group(1)))


def resolve_device(value: str | None, provider: str = AUTO) -> tuple[str, int]:
    """`--device` and `--provider` together -> (provider, device_id) for `Reconstructor.load`.

    Raises:
        ProviderError: they disagree (e.g. `--provider cpu --device 1`).
    """
    device = parse_device(value)
    if device.provider is None:
        return provider, device.device_id
    if provider not in (AUTO, device.provider):
        raise ProviderError(f"--device {value} runs on {device.provider}, --provider says {provider}; give one")
    return device.provider, device.device_id
