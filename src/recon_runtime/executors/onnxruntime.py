"""ONNX Runtime executors: CPU, CUDA with IO binding, and the captured fixed-shape chain.

Sessions, their options and the provider check live here too; nothing outside this module knows
that onnxruntime runs the graphs.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..contract import (
    DECODER,
    ENCODER,
    HOP_LENGTH,
    LATENT_DOWNSAMPLE,
    VOCODER,
    VOCODER_EXTRA_SAMPLES,
    Contract,
    GraphEntry,
    check_metadata,
    verify_graph_file,
)
from ..errors import BundleError, ProviderError, ReconError, install_hint
from .base import Executor, ExecutorOptions, vocoder_input

try:
    import onnxruntime as ort
except ImportError:  # the base install leaves the choice of build to the cpu/gpu extras
    raise ProviderError(f"onnxruntime is not installed: {install_hint('cpu')}") from None

_LOGGER = logging.getLogger(__name__)

CPU: Final = "cpu"
CUDA: Final = "cuda"
PROVIDERS: Final = {CPU: "CPUExecutionProvider", CUDA: "CUDAExecutionProvider"}

# cuDNN settings taken from onnxruntime's CUDA provider guidance, not yet measured on a GPU with this
# model (benchmarks/gpu.sh measures them when run on a GPU host): HEURISTIC avoids the seconds-long
# first runs of EXHAUSTIVE search; the 1-D pad keeps the vocoder's Conv1d off cuDNN's slow path.
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

    @classmethod
    def from_options(cls, provider: str, options: ExecutorOptions) -> "SessionConfig":
        return cls(
            provider=provider,
            threads=options.threads,
            cpu_arena=options.cpu_arena,
            cuda_graph=options.cuda_graph and provider == CUDA,
        )

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
        try:
            self.session = ort.InferenceSession(str(self.path), config.options(fixed_dims), providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types are not RuntimeError
            if config.provider != CUDA:
                raise
            raise ProviderError(
                f"{self.path}: the CUDA provider did not start ({' '.join(str(e).split())[:300]})"
            ) from None
        # no silent switch to the CPU inside a run: provider and precision stay what load chose
        self.session.disable_fallback()
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
        """Run on host arrays (thread-safe: onnxruntime sessions allow concurrent `run`)."""
        return self.session.run(None, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()})

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

    One chain has one set of buffers: `run` is serialised by a lock and returns copies, so a result
    stays valid after the next call and threads sharing a chain never see each other's outputs.
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
        self._lock = threading.Lock()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Copy `x` into the bound input, run every stage, and return copies of the last stage's outputs."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"this chain was built for input shape {self.shape}, not {tuple(x.shape)}")
        with self._lock:
            self._input.update_inplace(np.ascontiguousarray(x, dtype=np.float32))
            for stage, binding in self._bindings:
                stage.session.run_with_iobinding(binding)
            # .numpy() of a CPU OrtValue is a view of the bound buffer: copy before the next call reuses it
            return [np.array(o.numpy(), copy=True) for o in self._outputs]


MAX_CAPTURED_SHAPES: Final = 2  # captured chains kept (each holds a copy of the weights on the GPU)
MAX_TRACKED_SHAPES: Final = 64  # input shapes counted while waiting for a repeat (oldest forgotten first)


class OrtExecutor(Executor):
    """onnxruntime on the CPU: plain host-to-host runs, one session per stage."""

    backend = "onnxruntime"

    def __init__(self, bundle_dir: Path, contract: Contract, provider: str, precision: str, options: ExecutorOptions):
        super().__init__(bundle_dir, contract, provider, precision, options)
        self._config = SessionConfig.from_options(provider, options)
        self._sessions: dict[str, GraphSession] = {}

    def _stage(self, role: str) -> GraphSession:
        session = self._sessions.get(role)
        if session is None:
            with self._lock:
                session = self._sessions.get(role)
                if session is None:
                    entry = self.contract.graph(role, self.precision)
                    assert entry is not None  # checked in Executor.__init__
                    session = GraphSession(self.bundle_dir, self.contract, entry, self._config)
                    self._sessions[role] = session
        return session

    def _has_stage(self, role: str) -> bool:
        return role in self._sessions

    def session(self, role: str) -> GraphSession:
        """The onnxruntime session of one stage (created and verified on first use)."""
        return self._stage(role)

    def _run(self, roles: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        outs = [x]
        for role in roles:
            sess = self._stage(role)
            inp = vocoder_input(outs[0]) if role == VOCODER else outs[0]
            outs = sess.run({sess.input_names[0]: inp})
        return outs


class OrtCudaExecutor(OrtExecutor):
    """onnxruntime on CUDA: intermediates stay on the GPU between stages (IO binding)."""

    def _run(self, roles: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        value = None
        outs: list[Any] = []
        for role in roles:
            sess = self._stage(role)
            if value is None:
                outs = sess.run_on_device(sess.input_names[0], sess.to_device(x))
            elif role == VOCODER:
                b, _, t, f = value.shape()
                outs = sess.run_on_device(sess.input_names[0], value, shape=(b, t, f))
            else:
                outs = sess.run_on_device(sess.input_names[0], value)
            value = outs[0]
        return [o.numpy() for o in outs]


class CapturedChainExecutor(OrtCudaExecutor):
    """CUDA with CUDA graphs: a captured fixed-shape chain for shapes seen twice, IO binding otherwise.

    The chains are a bounded cache behind a lock (at most MAX_CAPTURED_SHAPES chains, at most
    MAX_TRACKED_SHAPES shapes counted). If onnxruntime refuses a capture, capturing stops for this
    executor with one warning and every shape runs through IO binding; results do not change.
    """

    def __init__(self, bundle_dir: Path, contract: Contract, provider: str, precision: str, options: ExecutorOptions):
        super().__init__(bundle_dir, contract, provider, precision, options)
        self._chains: dict[tuple[Any, ...], FixedShapeChain] = {}
        self._seen: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self._capture_failed = False
        # its own lock: building a chain takes seconds and must not hold up session creation
        self._chain_lock = threading.Lock()

    def _chain(self, roles: tuple[str, ...], shape: tuple[int, ...]) -> FixedShapeChain | None:
        key = (roles, shape)
        with self._chain_lock:
            if self._capture_failed:
                return None
            chain = self._chains.get(key)
            if chain is not None:
                return chain
            self._seen[key] = self._seen.pop(key, 0) + 1
            while len(self._seen) > MAX_TRACKED_SHAPES:
                self._seen.popitem(last=False)
            if self._seen[key] < 2 or len(self._chains) >= MAX_CAPTURED_SHAPES:
                return None
            entries = [self.contract.graph(r, self.precision) for r in roles]
            try:
                chain = FixedShapeChain(self.bundle_dir, self.contract, entries, self._config, shape)  # type: ignore[arg-type]
            except BundleError:
                raise
            except Exception as e:  # noqa: BLE001 - onnxruntime refused the pinned sessions (ProviderError included)
                self._disable(e)
                return None
            self._chains[key] = chain
            return chain

    def _disable(self, e: BaseException) -> None:
        _LOGGER.warning("CUDA graph capture failed (%s); continuing without it", " ".join(str(e).split())[:200])
        self._capture_failed = True
        self._chains.clear()

    def _run(self, roles: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        chain = self._chain(roles, tuple(x.shape))
        if chain is not None:
            try:
                return chain.run(x)
            except ReconError:
                raise
            except Exception as e:  # noqa: BLE001 - the capture itself happens on the first run
                with self._chain_lock:
                    if not self._capture_failed:
                        self._disable(e)
        return super()._run(roles, x)


def create_executor(
    bundle_dir: Path, contract: Contract, provider: str, precision: str, options: ExecutorOptions
) -> OrtExecutor:
    """The onnxruntime executor for a provider (CUDA with CUDA graphs when asked for)."""
    if provider == CUDA:
        if options.cuda_graph:
            return CapturedChainExecutor(bundle_dir, contract, provider, precision, options)
        return OrtCudaExecutor(bundle_dir, contract, provider, precision, options)
    return OrtExecutor(bundle_dir, contract, provider, precision, options)
