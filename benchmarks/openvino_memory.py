"""What each engine holds in memory, stage by stage, and what OpenVINO's `release_memory` gives back.

    python -m benchmarks.openvino_memory --model models/full --out benchmarks/results/x.json
    python -m benchmarks.openvino_memory --model models/full --variants base,release,release_trim --seconds 120

Two parts, each case in a fresh process (so no case inherits another's allocations):

- phases (`--phases`, onnxruntime and openvino at fp32): RSS (VmRSS, after `malloc_trim`, so freed
  heap pages do not count) after each stage is loaded, after each stage's first and second run on
  one 10.24 s window, and on OpenVINO after `CompiledModel.release_memory()` of that stage. What
  stays after a run and after its release is what the engine keeps (repacked weights, kernels);
  what the release gives back is the stage's activations.
- variants (`--variants`): a whole `Reconstructor.reconstruct` of `--seconds` on OpenVINO fp32,
  peak RSS (ru_maxrss): `base` as the runtime runs it, `release` with each stage's
  `release_memory()` after its run, `release_trim` also `malloc_trim(0)` after it, and
  `release_mmap` with glibc's mmap threshold fixed at 1 MiB (large buffers back to the system on
  free; a process-wide setting a library should not make, measured for the record).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import describe

RATE = 16000
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _libc() -> Any:
    return ctypes.CDLL("libc.so.6")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _clip(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _phases(model: str, backend: str) -> dict[str, Any]:
    from recon_runtime import Reconstructor
    from recon_runtime.contract import ROLES, VOCODER
    from recon_runtime.executors.base import vocoder_input

    libc = _libc()

    def now() -> float:
        libc.malloc_trim(0)
        return _rss_mb()

    rows: dict[str, Any] = {"start": now()}
    rec = Reconstructor.load(model, provider="cpu", backend=backend, precision="fp32", stages=())
    for role in ROLES:
        rec.executor.prepare((role,))
        rows[f"load {role}"] = now()
    x = np.stack(rec.reconstruction_job(rec.features(_clip(10.24), RATE)).windows)
    for run in (1, 2):
        outs = [x]
        for role in ROLES:
            outs = rec.executor.run((role,), vocoder_input(outs[0]) if role == VOCODER else outs[0])
            rows[f"run {run} {role}"] = now()
            if backend == "openvino":
                rec.executor.compiled(role).compiled.release_memory()
                rows[f"run {run} {role}, released"] = now()
    return {"backend": rec.backend, "rss_mb": rows, "peak_rss_mb": _peak_mb()}


def _variant(model: str, variant: str, seconds: float) -> dict[str, Any]:
    libc = _libc()
    if variant == "release_mmap":
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    from recon_runtime import Reconstructor
    from recon_runtime.contract import ROLES
    from recon_runtime.executors import openvino as ov_exec

    if variant != "base":
        run = ov_exec.CompiledStage.run

        def releasing(self: Any, x: np.ndarray) -> list[np.ndarray]:
            out = run(self, x)
            self.compiled.release_memory()
            if variant == "release_trim":
                libc.malloc_trim(0)
            return out

        ov_exec.CompiledStage.run = releasing  # type: ignore[method-assign]
    audio = _clip(seconds)
    rec = Reconstructor.load(model, provider="cpu", backend="openvino", precision="fp32", stages=ROLES)
    loaded = _peak_mb()
    t0 = time.perf_counter()
    out = rec.reconstruct(audio, RATE)
    wall = time.perf_counter() - t0
    assert out.shape == audio.shape and np.isfinite(out).all()
    return {
        "variant": variant,
        "seconds": seconds,
        "peak_rss_after_load_mb": loaded,
        "peak_rss_mb": _peak_mb(),
        "rss_at_end_mb": _rss_mb(),
        "wall_s": round(wall, 1),
    }


def _in_child(*args: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "benchmarks.openvino_memory", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child {args} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a full-size bundle with fp32 graphs")
    ap.add_argument("--phases", action="store_true", help="the stage-by-stage part (onnxruntime and openvino)")
    ap.add_argument("--variants", default="", help="comma-separated: base, release, release_trim, release_mmap")
    ap.add_argument("--seconds", type=float, default=120.0, help="input length of the variants")
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        result = _phases(args.model, rest[0]) if kind == "phases" else _variant(args.model, rest[0], float(rest[1]))
        print(json.dumps(result))
        return
    result: dict[str, Any] = {"machine": describe(), "model": args.model, "phases": [], "variants": []}
    if args.phases:
        for backend in ("onnxruntime", "openvino"):
            row = {
                **_in_child("--model", args.model, "--child", "phases", backend),
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }
            result["phases"].append(row)
            print(json.dumps(row), flush=True)
    for variant in filter(None, args.variants.split(",")):
        load = [round(x, 2) for x in os.getloadavg()]
        row = _in_child("--model", args.model, "--child", "variant", variant, str(args.seconds))
        row["load_average_at_start"] = load
        result["variants"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
