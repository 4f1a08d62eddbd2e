"""`--device N` / `cuda:N`: parsed to the provider it implies and the CUDA device id the executor takes."""

from __future__ import annotations

import pytest

from recon_runtime.devices import Device, parse_device, resolve_device
from recon_runtime.errors import ProviderError
from recon_runtime.executors.select import AUTO, CPU, CUDA


@pytest.mark.parametrize(
    "value, device",
    [
        (None, Device(None, 0)),
        ("0", Device(CUDA, 0)),
        ("3", Device(CUDA, 3)),
        ("cuda:1", Device(CUDA, 1)),
        (" CUDA:12 ", Device(CUDA, 12)),
        ("cuda", Device(CUDA, 0)),
        ("cpu", Device(CPU, 0)),
    ],
)
def test_device_values_parse_to_the_cuda_device_id(value: str | None, device: Device) -> None:
    assert parse_device(value) == device


@pytest.mark.parametrize("value", ["-1", "cuda:", "cuda:x", "gpu:0", "1.5", "cuda:0:1", ""])
def test_other_device_values_are_one_line(value: str) -> None:
    with pytest.raises(ProviderError) as e:
        parse_device(value)
    assert "\n" not in str(e.value) and "N or cuda:N" in str(e.value) and repr(value) in str(e.value)


def test_a_named_gpu_makes_auto_mean_cuda_and_refuses_a_contrary_provider() -> None:
    assert resolve_device(None, AUTO) == (AUTO, 0)
    assert resolve_device(None, CPU) == (CPU, 0)
    assert resolve_device("cuda:2", AUTO) == (CUDA, 2)
    assert resolve_device("1", CUDA) == (CUDA, 1)
    assert resolve_device("cpu", AUTO) == (CPU, 0)
    with pytest.raises(ProviderError, match="--device 1 runs on cuda, --provider says cpu"):
        resolve_device("1", CPU)


def test_the_device_id_reaches_onnxruntimes_cuda_provider_options() -> None:
    """The parsed id goes into ExecutorOptions.device_id, which the onnxruntime executor hands to CUDA."""
    pytest.importorskip("onnxruntime")
    from recon_runtime.executors.base import ExecutorOptions
    from recon_runtime.executors.onnxruntime import PROVIDERS, SessionConfig

    provider, device_id = resolve_device("cuda:3")
    config = SessionConfig.from_options(provider, ExecutorOptions(device_id=device_id))
    (cuda, options), cpu = config.providers()
    assert (cuda, options["device_id"], cpu) == (PROVIDERS[CUDA], "3", PROVIDERS[CPU])
