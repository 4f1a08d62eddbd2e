"""Which executor runs a bundle: the backend, provider and precision choices, and the rules of `auto`.

The values the runtime accepts are defined here once (`Reconstructor.load`, `LoadOptions` and the
CLI's choices read them), and `create_executor` turns the user's choice into one executor: the
backend `auto` stands for, CUDA or the CPU, the graphs' precision, the bundle's files checked. A
backend's module (and its engine) is imported only when it is chosen.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from ..contract import BF16, FP16, FP32, INT8, ROLES, VOCODER, Contract
from ..errors import BundleError, ProviderError, install_hint
from . import BACKENDS, ONNXRUNTIME, OPENVINO
from .base import LATENCY, PERFORMANCE_HINTS, Executor, ExecutorOptions

_LOGGER = logging.getLogger(__name__)

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


def choose_precision(contract: Contract, precision: str, provider: str, where: Path) -> str:
    available = contract.precisions
    if not available:
        raise BundleError(f"{where}: recon.json lists no complete set of graphs")
    if precision == AUTO:
        if provider == CUDA and FP16 in available:
            if contract.fp16_arithmetic_passed:
                return FP16
            _LOGGER.info("fp32 graphs on CUDA: this bundle's fp16 arithmetic check did not pass (or was not run)")
        return FP32 if FP32 in available else available[0]
    if precision not in available:
        raise BundleError(
            f"{where}: bundle has no {precision} graphs (it has {', '.join(available)}); "
            f"export them with recon-export --precision {precision}"
        )
    return precision


def _check_files(contract: Contract, precision: str, where: Path) -> None:
    for role in ROLES:
        entry = contract.graph(role, precision)
        if entry is None or not (where / entry.file).is_file():
            missing = entry.file if entry else f"{role}.{precision}.onnx"
            raise BundleError(f"{where / missing}: missing from the bundle; re-export it")


def _onnxruntime_executor(
    bundle_dir: Path,
    contract: Contract,
    provider: str,
    precision: str,
    options: ExecutorOptions,
    stages: Sequence[str] | None,
) -> Executor:
    from . import onnxruntime as ort_exec  # imports onnxruntime only here

    if precision == BF16:
        raise ProviderError(
            "bf16 runs on the openvino backend only (--backend openvino or auto, on a CPU with AVX512-BF16 or "
            f"AMX; {install_hint('openvino')}); onnxruntime runs fp32, fp16 or int8"
        )
    if options.performance_hint not in (None, LATENCY):
        raise ProviderError(
            f"the {options.performance_hint} performance hint is an openvino setting; onnxruntime has none "
            "(drop it, or use --backend openvino)"
        )
    if options.cache_dir is not None:
        raise ProviderError(
            "a compiled-model cache folder is an openvino setting; onnxruntime compiles nothing to cache "
            "(drop it, or use --backend openvino)"
        )

    dists = ort_exec.onnxruntime_distributions()
    if len(dists) > 1:
        _LOGGER.warning(
            "both %s are installed and overwrite each other's files; keep one "
            "(pip uninstall -y onnxruntime onnxruntime-gpu, then install the one you want)",
            " and ".join(dists),
        )
    if provider == CUDA and not ort_exec.cuda_available():
        raise ProviderError(
            "the CUDA provider is not in this onnxruntime build; install the GPU extra (see README) or use --provider cpu"
        )
    if provider in (AUTO, CUDA) and ort_exec.cuda_available():
        chosen = choose_precision(contract, precision, CUDA, bundle_dir)
        _check_files(contract, chosen, bundle_dir)
        try:
            executor = ort_exec.create_executor(bundle_dir, contract, CUDA, chosen, options)
            # CUDA must start now, so that provider and precision are final after load
            executor.prepare(stages or (VOCODER,))
            return executor
        except ProviderError as e:
            if provider == CUDA:
                raise
            _LOGGER.warning("CUDA did not start (%s); running on the CPU", e)
    chosen = choose_precision(contract, precision, CPU, bundle_dir)
    _check_files(contract, chosen, bundle_dir)
    executor = ort_exec.create_executor(bundle_dir, contract, CPU, chosen, options)
    executor.prepare(stages or ())
    return executor


def _openvino_executor(
    bundle_dir: Path,
    contract: Contract,
    provider: str,
    precision: str,
    options: ExecutorOptions,
    stages: Sequence[str] | None,
) -> Executor:
    from . import openvino as ov_exec  # imports openvino only here

    if provider == CUDA:
        raise ProviderError(
            "the openvino backend runs on the CPU; use --provider cpu, or --backend onnxruntime for CUDA"
        )
    chosen = FP32 if precision == AUTO else precision
    if chosen not in (FP32, BF16):
        raise ProviderError(
            f"the openvino backend runs fp32 or bf16 (from the bundle's fp32 graphs), not {chosen}; "
            f"use --backend onnxruntime for {chosen}"
        )
    if FP32 not in contract.precisions:
        raise BundleError(
            f"{bundle_dir}: the openvino backend reads the fp32 graphs and this bundle has none "
            f"(it has {', '.join(contract.precisions) or 'none'}); export them with recon-export --precision fp32"
        )
    _check_files(contract, FP32, bundle_dir)
    executor = ov_exec.create_executor(bundle_dir, contract, chosen, options)
    executor.prepare(stages or ())
    return executor


ExecutorFactory = Callable[[Path, Contract, str, str, ExecutorOptions, "Sequence[str] | None"], Executor]
_EXECUTOR_FACTORIES: Final[dict[str, ExecutorFactory]] = {
    ONNXRUNTIME: _onnxruntime_executor,
    OPENVINO: _openvino_executor,
}


def _installed(module: str) -> bool:
    """Whether a module can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def resolve_backend(backend: str, provider: str, precision: str, available: Sequence[str]) -> str:
    """The backend `auto` stands for: OpenVINO for bf16 (only it runs bf16), else onnxruntime (CUDA,
    its own fp16/int8 graphs, and fp32 on the CPU), unless only OpenVINO is installed and can run it
    (fp32 graphs on the CPU). `available`: the bundle's complete graph precisions (contract.precisions).

    On the CPU at fp32 onnxruntime is the leaner engine for about the same speed (OpenVINO 1.07x at
    best): OpenVINO keeps what the first run of each stage prepares (713 MiB) and each stage's last
    activations, so a 120 s reconstruction peaked at 1919 MiB on it against 1358-1449 MiB on
    onnxruntime (docs/performance.md, "Memory: why auto runs onnxruntime at fp32").
    """
    if backend != AUTO:
        return backend
    if precision == BF16:
        return OPENVINO
    openvino_can = precision in (AUTO, FP32) and provider != CUDA and FP32 in available
    if openvino_can and not _installed("onnxruntime") and _installed("openvino"):
        return OPENVINO
    return ONNXRUNTIME


def create_executor(
    bundle_dir: Path,
    contract: Contract,
    *,
    backend: str,
    provider: str,
    precision: str,
    stages: Sequence[str] | None,
    options: ExecutorOptions,
) -> Executor:
    """The executor for these choices (checked by `check_choices`), its `stages` prepared now (None:
    each on first use; CUDA's start is tried now in any case, so that provider and precision are final).

    OpenVINO's settings under `auto` (a throughput hint, a cache folder) are dropped, with a line, when
    auto picks onnxruntime, which has neither; an explicit `backend="onnxruntime"` refuses them instead.
    """
    chosen = resolve_backend(backend, provider, precision, contract.precisions)
    if backend == AUTO and chosen == ONNXRUNTIME:
        dropped = ["performance hint"] if options.performance_hint not in (None, LATENCY) else []
        dropped += ["cache folder"] if options.cache_dir is not None else []
        if dropped:
            _LOGGER.info("auto picked onnxruntime, which has no %s: ignored", " nor ".join(dropped))
            options = dataclasses.replace(options, performance_hint=None, cache_dir=None)
    return _EXECUTOR_FACTORIES[chosen](bundle_dir, contract, provider, precision, options, stages)
