"""Executors run a chain of graph stages on a batch of equal-shape windows, one class per backend.

`Reconstructor` picks one at load and never changes it. A backend's module (and its engine) is
imported only when that backend is used.
"""

from __future__ import annotations

from typing import Final

from .base import Executor, ExecutorOptions, check_chain, require_finite

ONNXRUNTIME: Final = "onnxruntime"
OPENVINO: Final = "openvino"
BACKENDS: Final = (ONNXRUNTIME, OPENVINO)

__all__ = ["Executor", "ExecutorOptions", "check_chain", "require_finite", "ONNXRUNTIME", "OPENVINO", "BACKENDS"]
