"""The executor interface: run a chain of graph stages on a batch of equal-shape windows.

An executor owns its engine's sessions and buffers; `Reconstructor` only hands it a batch and the
stages to run. Backend, provider and precision are fixed when the executor is built. Every
executor checks its outputs for NaN/inf here, in one place, whatever engine ran them.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from ..contract import DECODER, ENCODER, FP16, LATENT_CHANNELS, LATENT_FREQ_BINS, N_MELS, ROLES, Contract
from ..errors import BundleError, NumericalError

LATENCY: Final = "latency"
THROUGHPUT: Final = "throughput"
PERFORMANCE_HINTS: Final = (LATENCY, THROUGHPUT)
"""OpenVINO's performance hints; `Reconstructor.load` checks the value before any stage compiles."""


@dataclass(frozen=True)
class ExecutorOptions:
    """Engine settings that do not change results (beyond rounding)."""

    threads: int | None = None
    """Intra-op threads per session (None: the engine's default)."""
    cpu_arena: bool = False
    """onnxruntime's CPU memory arena: off by default, it adds ~0.2-0.5 GB of peak RSS for a few
    percent of speed (benchmarks/memory.py and benchmarks/latency.py measure both)."""
    cuda_graph: bool = False
    """onnxruntime CUDA: capture CUDA graphs for input shapes that repeat (not measured on a GPU yet)."""
    performance_hint: str | None = None
    """OpenVINO: "latency" (each call uses every core; the default, None) or "throughput" (streams, for
    many concurrent calls). onnxruntime has no such setting and refuses "throughput"."""
    compile_cache: bool = True
    """OpenVINO: keep compiled graphs in `cache_dir` so that the next start skips compilation."""
    cache_dir: Path | None = None
    """OpenVINO's compiled-model cache (None: the user's cache folder, per bundle digest). onnxruntime
    compiles nothing to cache and refuses a folder."""


def check_chain(roles: Sequence[str]) -> tuple[str, ...]:
    """Stages must be a consecutive run of encoder -> decoder -> vocoder."""
    roles = tuple(roles)
    if not roles or any(r not in ROLES for r in roles):
        raise ValueError(f"stages must be a non-empty run of {ROLES}, got {roles}")
    first = ROLES.index(roles[0])
    if roles != ROLES[first : first + len(roles)]:
        raise ValueError(f"stages must be consecutive in {ROLES}, got {roles}")
    return roles


def batch_layout(first_role: str, shape: Sequence[int]) -> str | None:
    """None when `shape` is a valid batch for a chain starting at `first_role`, else what it should be."""
    if first_role == ENCODER:
        ok = len(shape) == 4 and shape[1] == 1 and shape[3] == N_MELS
        want = f"[batch, 1, frames, {N_MELS}]"
    elif first_role == DECODER:
        ok = len(shape) == 4 and shape[1] == LATENT_CHANNELS and shape[3] == LATENT_FREQ_BINS
        want = f"[batch, {LATENT_CHANNELS}, latent_frames, {LATENT_FREQ_BINS}]"
    else:
        ok = len(shape) == 3 and shape[2] == N_MELS
        want = f"[batch, frames, {N_MELS}]"
    ok = ok and all(int(s) > 0 for s in shape)
    return None if ok else want


FP16_MAX: Final = float(np.finfo(np.float16).max)


def require_finite(array: np.ndarray, what: str, inputs: np.ndarray, precision: str) -> None:
    """Fail loudly instead of returning NaN/inf audio, saying whether `inputs` (finite: callers check)
    or the precision is to blame: only fp16 lacks float32's range, so elsewhere (or with inputs past
    fp16's own range) the input overflowed the graphs."""
    if np.isfinite(array).all():
        return
    peak = float(np.abs(inputs).max()) if inputs.size else 0.0
    if precision == FP16 and peak <= FP16_MAX:
        raise NumericalError(
            f"{what} contains NaN or inf at fp16 (the input's largest magnitude is {peak:.3g}); try --precision fp32"
        )
    raise NumericalError(
        f"{what} contains NaN or inf: the input's values (largest magnitude {peak:.3g}) overflow the graphs "
        f"at {precision}",
        input_caused=True,
    )


class Executor(ABC):
    """Runs consecutive stages of one bundle at one precision on one device.

    Thread-safe: `run` may be called from several threads at once. Sessions are created in
    `prepare` or on first use, under a lock, and never replaced.
    """

    backend: str = ""

    def __init__(
        self,
        bundle_dir: Path,
        contract: Contract,
        provider: str,
        precision: str,
        options: ExecutorOptions,
        graph_precision: str | None = None,
    ):
        """`graph_precision`: the bundle graphs run, when it differs from `precision` (bf16 runs the fp32 graphs)."""
        self.bundle_dir = Path(bundle_dir)
        self.contract = contract
        self.provider = provider
        self.precision = precision
        self.graph_precision = graph_precision or precision
        self.options = options
        self._lock = threading.Lock()
        for role in ROLES:
            if contract.graph(role, self.graph_precision) is None:
                raise BundleError(f"{self.bundle_dir}: no {role} graph at {self.graph_precision}")

    # -------------------------------------------------------------- public
    def run(self, roles: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
        """Run `roles` on a batch; returns the last stage's outputs (host float32 arrays).

        Input layouts: encoder [B, 1, T, 64]; decoder [B, 8, T/4, 16]; vocoder [B, T, 64].
        """
        roles = check_chain(roles)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        want = batch_layout(roles[0], x.shape)
        if want is not None:
            raise ValueError(f"{roles[0]} input must be {want}, got {list(x.shape)}")
        outputs = self._run(roles, x)
        names = [t.name for t in self.contract.graph(roles[-1], self.graph_precision).outputs]  # type: ignore[union-attr]
        for name, out in zip(names, outputs):
            require_finite(out, f"{roles[-1]} graph output {name!r}", x, self.precision)
        return outputs

    def prepare(self, roles: Sequence[str]) -> None:
        """Create (and verify) the sessions for `roles` now instead of on first use."""
        for role in roles:
            self._stage(role)

    @property
    def loaded_stages(self) -> list[str]:
        """Stages whose sessions exist, in chain order."""
        return [r for r in ROLES if self._has_stage(r)]

    def describe(self) -> str:
        """Backend, device and what runs, e.g. "onnxruntime on CPU: fp32 graphs"."""
        return f"{self.backend} on {self.provider.upper()}: {self.graph_precision} graphs"

    # -------------------------------------------------------------- per engine
    @abstractmethod
    def _run(self, roles: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        """Run the stages on a checked, contiguous float32 batch."""

    @abstractmethod
    def _stage(self, role: str) -> object:
        """The engine's compiled stage, created under the lock on first use."""

    @abstractmethod
    def _has_stage(self, role: str) -> bool: ...


def vocoder_input(x: np.ndarray) -> np.ndarray:
    """The decoder's [B, 1, T, 64] mel is the vocoder's [B, T, 64] input."""
    return x[:, 0] if x.ndim == 4 else x
