"""OpenVINO executor (CPU): the bundle's fp32 ONNX graphs at f32, or at bf16 on CPUs built for it.

OpenVINO reads the fp32 ONNX files of the bundle directly (no extra files): each is checked against
recon.json (size, SHA-256, stamped metadata) before it is compiled. `fp32` compiles with the f32
inference precision (exact); `bf16` compiles with the bf16 precision hint, except the stages that the
contract's plan keeps in f32 (`contract.BF16_F32_STAGES`), and only where the CPU computes bf16 in
hardware (AVX512-BF16 or AMX): elsewhere OpenVINO would emulate it, slower than f32, so it is refused.
Loading bf16 on a bundle whose recorded bf16 check (recon.json, `validation.bf16_openvino`) did not pass,
or was not measured, logs one warning with the measured errors and budgets.

Compiled graphs are kept in OpenVINO's model cache, a folder per bundle digest under the user's cache
folder, so a second start skips compilation. Nothing outside this module knows that OpenVINO runs.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..contract import (
    BF16,
    BF16_ENCODER_REL_L2_BUDGET,
    BF16_F32_STAGES,
    BF16_KEY,
    BF16_VOCODER_LOG_MEL_L1_BUDGET,
    FP32,
    ROLES,
    VOCODER,
    Contract,
    GraphEntry,
    check_metadata,
    verify_graph_file,
)
from ..errors import ProviderError, install_hint
from .base import LATENCY, THROUGHPUT, Executor, ExecutorOptions, vocoder_input

try:
    import openvino as ov
except ImportError:
    raise ProviderError(f"openvino is not installed: {install_hint('openvino')}") from None

_LOGGER = logging.getLogger(__name__)

DEVICE: Final = "CPU"
PERFORMANCE_HINTS: Final = {LATENCY: "LATENCY", THROUGHPUT: "THROUGHPUT"}
INFERENCE_PRECISIONS: Final = {FP32: "f32", BF16: "bf16"}
BF16_CPU_FLAGS: Final = ("avx512_bf16", "amx_bf16")  # bf16 dot products in hardware
CACHE_APP_DIR: Final = ("audioldm2-recon", "openvino")

Bf16Probe = Callable[[], tuple[bool, str]]
"""Says whether this CPU computes bf16 in hardware: (supported, one-line reason)."""


@functools.lru_cache(maxsize=1)
def core() -> "ov.Core":
    """One OpenVINO core per process (compiled models from it are independent of each other)."""
    return ov.Core()


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def decide_bf16(capabilities: Iterable[str], flags: Collection[str] | None, name: str = "this CPU") -> tuple[bool, str]:
    """Whether bf16 runs in hardware, from OpenVINO's CPU capabilities and the CPU's flags (None: unreadable).

    Both must agree: OpenVINO lists BF16 and the flags show AVX512-BF16 or AMX. Where the flags cannot
    be read (no /proc/cpuinfo: Windows, macOS, some containers) bf16 is refused: OpenVINO's list alone
    is not trusted, because no platform has been checked here to list BF16 only with bf16 hardware,
    and an emulated bf16 is slower than f32. Replace `BF16_PROBE` to pin the decision on such a host.
    """
    caps = [str(c) for c in capabilities]
    if "BF16" not in caps:
        return False, f"{name}: OpenVINO lists no bf16 support on this CPU (capabilities: {', '.join(caps)})"
    if flags is None:
        return False, (
            f"{name}: the CPU flags could not be read (no /proc/cpuinfo), so AVX512-BF16 or AMX cannot be "
            "confirmed and OpenVINO's BF16 capability alone is not trusted"
        )
    if not set(flags) & set(BF16_CPU_FLAGS):
        return False, f"{name}: neither AVX512-BF16 nor AMX, so bf16 would be emulated (slower than fp32)"
    return True, f"{name}: {'AMX' if 'amx_bf16' in flags else 'AVX512-BF16'}"


def probe_bf16() -> tuple[bool, str]:
    """`decide_bf16` on this machine: OpenVINO's CPU capabilities and name, and /proc/cpuinfo's flags."""
    c = core()
    caps = [str(x) for x in c.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]
    name = str(c.get_property(DEVICE, "FULL_DEVICE_NAME")).strip()
    return decide_bf16(caps, cpu_flags(), name)


BF16_PROBE: Bf16Probe = probe_bf16
"""The probe the executor asks; replace it (tests, or to pin a decision) before loading."""


def cache_root() -> Path:
    """$XDG_CACHE_HOME (or ~/.cache)/audioldm2-recon/openvino."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).joinpath(*CACHE_APP_DIR)


def cache_dir_for(contract: Contract, options: ExecutorOptions) -> Path | None:
    """The compiled-model cache of one bundle (None: caching off). Outside the bundle, keyed by its digest."""
    if not options.compile_cache:
        return None
    return Path(options.cache_dir) if options.cache_dir is not None else cache_root() / contract.digest


def onnx_metadata(model: "ov.Model") -> dict[str, str]:
    """The ONNX file's metadata_props: OpenVINO's ONNX reader keeps them under rt_info['framework']."""
    if not model.has_rt_info(["framework"]):
        return {}
    framework = model.get_rt_info()["framework"]
    if not isinstance(framework, Mapping):
        return {}
    return {str(k): (v.astype(str) if hasattr(v, "astype") else str(v)) for k, v in framework.items()}


def stage_precisions(precision: str, f32_stages: tuple[str, ...] = BF16_F32_STAGES) -> dict[str, str]:
    """The inference precision of each stage under `precision` (fp32: all f32; bf16: the plan)."""
    if precision == FP32:
        return dict.fromkeys(ROLES, FP32)
    return {r: FP32 if r in f32_stages else BF16 for r in ROLES}


def compile_config(precision: str, options: ExecutorOptions, cache_dir: Path | None) -> dict[str, str]:
    hint = options.performance_hint or LATENCY
    if hint not in PERFORMANCE_HINTS:
        raise ProviderError(f"unknown performance hint {hint!r}; use {', '.join(PERFORMANCE_HINTS)}")
    config = {
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[precision],
        "PERFORMANCE_HINT": PERFORMANCE_HINTS[hint],
    }
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = str(int(options.threads))
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


def _blobs(folder: Path | None) -> set[str]:
    if folder is None or not folder.is_dir():
        return set()
    return {p.name for p in folder.glob("*.blob")}


class CompiledStage:
    """One verified graph compiled by OpenVINO, with a bounded pool of inference requests.

    A compiled model serves several requests at once; each call takes an idle request from the
    pool, or creates one while fewer than `max_requests` exist (OpenVINO's
    OPTIMAL_NUMBER_OF_INFER_REQUESTS: 1 under the latency hint, the number of streams under
    throughput), else waits for one to be free. Concurrent calls never share buffers, and the pool
    never holds more requests (and their buffers) than the compiled model can run at once.
    """

    def __init__(
        self, bundle_dir: Path, contract: Contract, entry: GraphEntry, config: Mapping[str, str], cache_dir: Path | None
    ):
        self.entry = entry
        self.path = verify_graph_file(bundle_dir, entry)
        model = core().read_model(str(self.path))
        check_metadata(self.path, contract, entry, onnx_metadata(model))
        self.output_count = len(model.outputs)
        if cache_dir is not None:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                _LOGGER.warning("%s: cannot create the OpenVINO cache folder (%s); compiling without it", cache_dir, e)
                config = {k: v for k, v in config.items() if k != "CACHE_DIR"}
                cache_dir = None
        before = _blobs(cache_dir)
        self.compiled = core().compile_model(model, DEVICE, dict(config))
        self.cache_dir = cache_dir
        # OpenVINO writes a blob when it compiles and reads one when it finds a match: no new blob, a hit
        self.cache_hit = cache_dir is not None and bool(before) and not (_blobs(cache_dir) - before)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.inference_precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        self.max_requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.requests_created = 0
        self._idle: list[Any] = []
        self._free = threading.Condition()

    def _acquire(self) -> Any:
        with self._free:
            while not self._idle and self.requests_created >= self.max_requests:
                self._free.wait()
            if self._idle:
                return self._idle.pop()
            self.requests_created += 1
        try:
            return self.compiled.create_infer_request()
        except BaseException:
            with self._free:
                self.requests_created -= 1
                self._free.notify()
            raise

    def _release(self, request: Any) -> None:
        with self._free:
            self._idle.append(request)
            self._free.notify()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        request = self._acquire()
        try:
            request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
            # the output tensors belong to the request: copy before another call reuses it
            return [np.array(request.get_output_tensor(i).data, dtype=np.float32) for i in range(self.output_count)]
        finally:
            self._release(request)


class OpenVinoExecutor(Executor):
    """OpenVINO on the CPU, one compiled model per stage, compiled once under the executor's lock."""

    backend = "openvino"

    def __init__(
        self,
        bundle_dir: Path,
        contract: Contract,
        precision: str,
        options: ExecutorOptions,
    ):
        if precision not in INFERENCE_PRECISIONS:
            raise ProviderError(
                f"the openvino backend runs fp32 or bf16 (from the bundle's fp32 graphs), not {precision}; "
                "fp16 and int8 graphs run on --backend onnxruntime"
            )
        super().__init__(bundle_dir, contract, "cpu", precision, options, graph_precision=FP32)
        if precision == BF16:
            supported, reason = BF16_PROBE()
            if not supported:
                raise ProviderError(f"bf16 refused: {reason}; use --precision fp32")
            warning = bf16_check_warning(contract.validation.get(BF16_KEY))
            if warning:
                _LOGGER.warning("%s: %s", bundle_dir, warning)
        self.stage_precisions = stage_precisions(precision)
        self.cache_dir = cache_dir_for(contract, options)
        self._stages: dict[str, CompiledStage] = {}

    def _stage(self, role: str) -> CompiledStage:
        stage = self._stages.get(role)
        if stage is None:
            with self._lock:
                stage = self._stages.get(role)
                if stage is None:
                    entry = self.contract.graph(role, FP32)
                    assert entry is not None  # Executor.__init__ refused a bundle without it
                    config = compile_config(self.stage_precisions[role], self.options, self.cache_dir)
                    stage = CompiledStage(self.bundle_dir, self.contract, entry, config, self.cache_dir)
                    self._stages[role] = stage
        return stage

    def _has_stage(self, role: str) -> bool:
        return role in self._stages

    def compiled(self, role: str) -> CompiledStage:
        """The compiled stage of one role (verified and compiled on first use)."""
        return self._stage(role)

    @property
    def cache_hits(self) -> dict[str, bool]:
        """Per loaded stage: True when its compiled model came from the cache."""
        return {r: s.cache_hit for r, s in self._stages.items()}

    def describe(self) -> str:
        at = INFERENCE_PRECISIONS[self.precision]
        kept = [r for r, p in self.stage_precisions.items() if p != self.precision]
        rest = f"; kept f32: {', '.join(kept)}" if kept else ""
        return f"openvino on CPU: fp32 graphs at {at} inference precision{rest}"

    def _run(self, roles: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        outs = [x]
        for role in roles:
            inp = vocoder_input(outs[0]) if role == VOCODER else outs[0]
            outs = self._stage(role).run(inp)
        return outs


def bf16_check_warning(check: Mapping[str, Any] | None) -> str | None:
    """Why the export's bf16 check (recon.json) does not vouch for bf16 on this bundle; None when it passed."""
    if check and check.get("measured") and check.get("passed"):
        return None
    if not check or not check.get("measured"):
        why = (check or {}).get("reason", "the bundle records no bf16 check")
        return (
            f"bf16 runs although its errors were not measured at export ({why}); budgets: encoder latents "
            f"rel-L2 {BF16_ENCODER_REL_L2_BUDGET:.0%}, vocoder on real mels log-mel L1 "
            f"{BF16_VOCODER_LOG_MEL_L1_BUDGET:g} nats; use --precision fp32 for exact results"
        )
    r, b = check.get("results", {}), check.get("budgets", {})

    def item(key: str, what: str, fmt: str, unit: str = "") -> str:
        value, budget = r.get(key), b.get(key)
        known = isinstance(value, (int, float)) and isinstance(budget, (int, float))
        shown = format(value, fmt) + unit if isinstance(value, (int, float)) else "?"
        limit = format(budget, fmt) + unit if isinstance(budget, (int, float)) else "?"
        return f"{what} {shown} (budget {limit}{', OVER' if known and value > budget else ''})"

    return (
        "bf16 runs although its check at export did not pass: "
        + ", ".join(
            (
                item("encoder_rel_l2", "encoder latents rel-L2", ".2%"),
                item("vocoder_log_mel_l1", "vocoder on real mels log-mel L1", ".4f", " nats"),
            )
        )
        + "; use --precision fp32 for exact results"
    )


def create_executor(bundle_dir: Path, contract: Contract, precision: str, options: ExecutorOptions) -> OpenVinoExecutor:
    return OpenVinoExecutor(bundle_dir, contract, precision, options)
