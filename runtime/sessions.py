"""ONNX Runtime sessions: provider choice, session options, and device-resident chaining."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import numpy as np

from .contract import (
    DECODER,
    ENCODER,
    HOP_LENGTH,
    LATENT_DOWNSAMPLE,
    VOCODER_EXTRA_SAMPLES,
    Contract,
    GraphEntry,
    check_metadata,
    verify_graph_file,
)
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
    cuda_graph: bool = False
    """Capture CUDA graphs for input shapes that repeat (FixedShapeChain); not measured on a GPU yet."""

    def providers(self, cuda_graph: bool = False) -> list[Any]:
        if self.provider == CUDA:
            opts = {"device_id": str(self.device_id), **self.cuda_options}
            if cuda_graph:
                opts["enable_cuda_graph"] = "1"
            return [(PROVIDERS[CUDA], opts), PROVIDERS[CPU]]
        return [PROVIDERS[CPU]]

    def options(self, fixed_dims: Mapping[str, int] | None = None) -> ort.SessionOptions:
        so = ort.SessionOptions()
        for name, size in (fixed_dims or {}).items():
            so.add_free_dimension_override_by_name(name, int(size))
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = self.cpu_arena
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
            so.inter_op_num_threads = 1
        return so


class GraphSession:
    """One verified graph of a bundle in an onnxruntime session."""

    def __init__(
        self,
        bundle_dir: Path,
        contract: Contract,
        entry: GraphEntry,
        config: SessionConfig,
        fixed_dims: Mapping[str, int] | None = None,
    ):
        """`fixed_dims` pins the graph's free dimensions (batch, frames, ...) for a fixed-shape session."""
        self.entry = entry
        self.path = verify_graph_file(bundle_dir, entry)
        self.config = config
        if config.provider == CUDA:
            _preload_cuda_libraries()
        providers = config.providers(cuda_graph=bool(fixed_dims) and config.cuda_graph)
        self.session = ort.InferenceSession(str(self.path), config.options(fixed_dims), providers=providers)
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


def stage_dims(first_role: str, shape: Sequence[int]) -> dict[str, int]:
    """Sizes of the contract's named axes for a chain that starts at `first_role` with input `shape`."""
    if first_role == ENCODER:  # [B, 1, T, 64]
        batch, frames = shape[0], shape[2]
    elif first_role == DECODER:  # [B, 8, T/4, 16]
        batch, frames = shape[0], shape[2] * LATENT_DOWNSAMPLE
    else:  # vocoder [B, T, 64]
        batch, frames = shape[0], shape[1]
    return {
        "batch": int(batch),
        "frames": int(frames),
        "latent_frames": int(frames) // LATENT_DOWNSAMPLE,
        "samples": HOP_LENGTH * int(frames) + VOCODER_EXTRA_SAMPLES,
    }


class FixedShapeChain:
    """Consecutive stages for one input shape, every buffer allocated once and bound (IO binding).

    On CUDA with `SessionConfig.cuda_graph`, onnxruntime captures each stage's kernels as a CUDA
    graph on its first run and replays them, saving the per-kernel launch cost. Capture needs
    buffers at fixed addresses (hence this class) and a graph without CPU nodes: the free
    dimensions are pinned at session creation, which folds the Shape computations of the dynamic
    graphs into constants (otherwise they run on the CPU and onnxruntime refuses to capture).
    Each chain holds its own sessions, so its weights are a second copy in device memory.
    """

    def __init__(
        self,
        bundle_dir: Path,
        contract: Contract,
        entries: Sequence[GraphEntry],
        config: SessionConfig,
        shape: Sequence[int],
    ):
        self.shape = tuple(int(s) for s in shape)
        dims = stage_dims(entries[0].role, self.shape)
        fixed = {k: v for k, v in dims.items() if k != "samples"}  # samples is an output axis only
        self.device = CUDA if config.provider == CUDA else CPU
        self._device_id = config.device_id
        self.stages = [GraphSession(bundle_dir, contract, e, config, fixed_dims=fixed) for e in entries]
        self._input = ort.OrtValue.ortvalue_from_shape_and_type(
            list(self.shape), np.float32, self.device, self._device_id
        )
        self._bindings = []
        value, value_shape = self._input, list(self.shape)
        for stage in self.stages:
            binding = stage.session.io_binding()
            wanted = [dims.get(a, a) if isinstance(a, str) else a for a in stage.entry.inputs[0].axes]
            binding.bind_input(stage.input_names[0], self.device, self._device_id, np.float32, wanted, value.data_ptr())
            if int(np.prod(wanted)) != int(np.prod(value_shape)):
                raise ProviderError(f"{stage.path}: input {wanted} does not match the previous stage's {value_shape}")
            outputs = []
            for spec in stage.entry.outputs:
                out_shape = [dims[a] if isinstance(a, str) else a for a in spec.axes]
                out = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32, self.device, self._device_id)
                binding.bind_ortvalue_output(spec.name, out)
                outputs.append(out)
            self._bindings.append((stage, binding))
            value, value_shape = outputs[0], [dims[a] if isinstance(a, str) else a for a in stage.entry.outputs[0].axes]
        self._outputs = outputs

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Copy `x` into the bound input, run every stage, and return the last stage's outputs on the host."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"this chain was built for input shape {self.shape}, not {tuple(x.shape)}")
        self._input.update_inplace(np.ascontiguousarray(x, dtype=np.float32))
        for stage, binding in self._bindings:
            stage.session.run_with_iobinding(binding)
        last = self.stages[-1]
        host = [o.numpy() for o in self._outputs]
        for name, out in zip(last.output_names, host):
            require_finite(out, f"{last.entry.role} graph output {name!r}")
        return host


def require_finite(array: np.ndarray, what: str) -> None:
    """Fail loudly instead of returning NaN/inf audio."""
    if not np.isfinite(array).all():
        raise NumericalError(f"{what} contains NaN or inf; try --precision fp32 or shorter windows")
