"""Peak resident memory of the CPU chain, measured in a fresh process per case.

    python -m benchmarks.memory --model models/demo 10.24 600
    python -m benchmarks.memory --model models/full --backend onnxruntime,openvino,auto --repeats 2 120

Each case runs `Reconstructor.reconstruct` on a generated clip in its own process and reports
ru_maxrss (the kernel's peak RSS), so cases do not inherit each other's arenas. Several backends
(`auto`: whatever `Reconstructor.load` picks) run interleaved, `--repeats` times, so that their
wall times compare within one run; each row records the load average when it started.
"""

from __future__ import annotations

import argparse
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
from recon_runtime.contract import SAMPLE_RATE


def _child(
    model: str, seconds: float, precision: str, arena: bool, threads: int | None, backend: str
) -> dict[str, Any]:
    from recon_runtime import Reconstructor
    from recon_runtime.contract import ROLES

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    del t
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # every session created at load, so their weights are in "after load", not in the growth
    rec = Reconstructor.load(
        model, provider="cpu", precision=precision, backend=backend, cpu_arena=arena, threads=threads, stages=ROLES
    )
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    out = rec.reconstruct(audio, SAMPLE_RATE)
    wall = time.perf_counter() - t0
    assert out.shape == audio.shape and np.isfinite(out).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    input_mb = audio.nbytes / 2**20
    return {
        "seconds": seconds,
        "backend_asked": backend,
        "backend": rec.backend,
        "precision_asked": precision,
        "precision": rec.precision,
        "cpu_arena": arena,
        "threads": threads,
        "input_mb": round(input_mb, 1),
        "peak_rss_mb": round(peak, 1),
        "rss_before_load_mb": round(base, 1),
        "rss_after_load_mb": round(loaded, 1),
        "peak_minus_input_mb": round(peak - input_mb, 1),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--arena", action="store_true", help="enable onnxruntime's CPU memory arena")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the engine's)")
    ap.add_argument("--backend", default="onnxruntime", help="comma-separated: onnxruntime, openvino, auto")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each case (backends interleaved)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="append results to this JSON file")
    ap.add_argument("seconds", nargs="+", type=float)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.model, args.seconds[0], args.precision, args.arena, args.threads, args.backend)))
        return
    backends = args.backend.split(",")
    info = describe()  # at the start: its load average is the other work's
    rows = []
    cases = [(s, b) for _ in range(args.repeats) for s in args.seconds for b in backends]
    for seconds, backend in cases:
        load = [round(x, 2) for x in os.getloadavg()]
        cmd = (
            [
                sys.executable,
                "-m",
                "benchmarks.memory",
                "--child",
                "--model",
                args.model,
                "--precision",
                args.precision,
                "--backend",
                backend,
                str(seconds),
            ]
            + (["--arena"] if args.arena else [])
            + (["--threads", str(args.threads)] if args.threads else [])
        )
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append({**json.loads(r.stdout.strip().splitlines()[-1]), "load_average_at_start": load})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.is_file() else []
        if isinstance(old, dict):  # a file of this format: {"machine": ..., "rows": [...]}
            old = old["rows"]
        path.write_text(json.dumps({"machine": info, "rows": old + rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
