"""The machine a benchmark ran on: CPU model and the flags that decide speed, cores, versions.

Every result file records it, since numbers are comparable only within one machine (and one run).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Final

CPU_FLAGS_RECORDED: Final = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma")
DISTRIBUTIONS: Final = ("audioldm2-recon", "onnxruntime", "onnxruntime-gpu", "openvino", "numpy")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (Linux /proc/cpuinfo; elsewhere what platform says)."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return model, flags


def describe(distributions: Sequence[str] = DISTRIBUTIONS) -> dict[str, Any]:
    """Hostname, CPU model, recorded CPU flags, cores, Python, and the versions of `distributions`."""
    model, flags = cpu_model_and_flags()
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": model,
        "cpu_flags": sorted(flags & set(CPU_FLAGS_RECORDED)),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        # other work on the machine when this was called, at the start of a run (1, 5, 15 min averages):
        # well above 0 before the run begins means its timings are contended
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    for dist in distributions:
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info
