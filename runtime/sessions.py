"""ONNX Runtime sessions: provider choice, session options, and device-resident chaining."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import numpy as np

from .contract import Contract, GraphEntry, check_metadata, verify_graph_file
from .errors import NumericalError, ProviderError

try:
    import onnxruntime as ort
except ImportError:  # the base install leaves the choice of build to the cpu/gpu extras
    raise ProviderError(
        "onnxruntime is not installed: pip install 'audioldm2-recon[cpu]' (or '[gpu]' for CUDA)"
    ) from None

_LOGGER = logging.getLogger(__name__)

CPU: Final = "cpu"
CUDA: Final = "cuda"
PROVIDERS: Final = {CPU: "CPUExecutionProvider", CUDA: "CUDAExecutionProvider"}

# cuDNN settings chosen by measurement (benchmarks/gpu): HEURISTIC avoids seconds-long first runs;
# the 1-D pad keeps the vocoder's Conv1d off cuDNN's slow NCHW-with-width-1 path.
CUDA_PROVIDER_OPTIONS: Final[dict[str, str]] = {
    "cudnn_conv_algo_search": "HEURISTIC",
    "cudnn_conv_use_max_workspace": "1",
    "cudnn_conv1d_pad_to_nc1d": "1",
    "do_copy_in_default_stream": "1",
}


def onnxruntime_distributions() -> list[str]:
    """Installed onnxruntime wheels; two at once overwrite each other's files."""
    names = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            names.append(dist)
        except metadata.PackageNotFoundError:
            pass
    return names


def cuda_available() -> bool:
    """True when this onnxruntime build offers the CUDA provider (whether it works is checked later)."""
    return PROVIDERS[CUDA] in ort.get_available_providers()


def _preload_cuda_libraries() -> None:
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # noqa: BLE001 - a failed preload only means CUDA may not start
            _LOGGER.debug("onnxruntime.preload_dlls failed: %s", e)


@dataclass
class SessionConfig:
    """How to build sessions: which provider, how many threads, extra provider options."""

    provider: str = CPU
    threads: int | None = None
    cpu_arena: bool = False
    """onnxruntime's CPU memory arena: off by default, it adds ~0.2-0.5 GB of peak RSS for a few
    percent of speed (benchmarks/memory.py, benchmarks/latency.py measure both)."""
    cuda_options: Mapping[str, str] = field(default_factory=lambda: dict(CUDA_PROVIDER_OPTIONS))
    device_id: int = 0

    def providers(self) -> list[Any]:
        if self.provider == CUDA:
            opts = {"device_id": str(self.device_id), **self.cuda_options}
            return [(PROVIDERS[CUDA], opts), PROVIDERS[CPU]]
        return [PROVIDERS[CPU]]

    def options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = self.cpu_arena
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
            so.inter_op_num_threads = 1
        return so


class GraphSession:
    """One verified graph of a bundle in an onnxruntime session."""

    def __init__(self, bundle_dir: Path, contract: Contract, entry: GraphEntry, config: SessionConfig):
        self.entry = entry
        self.path = verify_graph_file(bundle_dir, entry)
        self.config = config
        if config.provider == CUDA:
            _preload_cuda_libraries()
        self.session = ort.InferenceSession(str(self.path), config.options(), providers=config.providers())
        check_metadata(self.path, contract, entry, self.session.get_modelmeta().custom_metadata_map)
        self.on_cuda = self.session.get_providers()[0] == PROVIDERS[CUDA]
        if config.provider == CUDA and not self.on_cuda:
            raise ProviderError(
                f"{self.path}: the CUDA provider did not start (onnxruntime fell back to "
                f"{self.session.get_providers()}); check the CUDA/cuDNN install or use --provider cpu"
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run on host arrays; every output is checked for NaN/inf."""
        outputs = self.session.run(None, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()})
        for name, out in zip(self.output_names, outputs):
            require_finite(out, f"{self.entry.role} graph output {name!r}")
        return outputs

    def run_on_device(
        self, name: str, value: "ort.OrtValue", shape: Sequence[int] | None = None
    ) -> list["ort.OrtValue"]:
        """Run with the input already on the GPU; outputs stay on the GPU (IO binding).

        `shape` rebinds the input buffer under another shape without a copy (the decoder's
        [B, 1, T, 64] mel is the vocoder's [B, T, 64]).
        """
        binding = self.session.io_binding()
        if shape is None:
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_input(name, CUDA, self.config.device_id, np.float32, list(shape), value.data_ptr())
        for out in self.output_names:
            binding.bind_output(out, CUDA, self.config.device_id)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()

    def to_device(self, array: np.ndarray) -> "ort.OrtValue":
        return ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(array, dtype=np.float32), CUDA, self.config.device_id
        )


def require_finite(array: np.ndarray, what: str) -> None:
    """Fail loudly instead of returning NaN/inf audio."""
    if not np.isfinite(array).all():
        raise NumericalError(f"{what} contains NaN or inf; try --precision fp32 or shorter windows")
