"""onnxruntime against OpenVINO at fp32 on the CPU: the whole chain, interleaved in one process.

    python -m benchmarks.backend_ab --model models/full --repeats 6 --out benchmarks/results/x.json

Both engines are loaded once (every stage) and warmed up; then `Reconstructor.reconstruct` of the
same clip alternates between them, `--repeats` times each, so that other work on the machine
slows both alike. Reports each run, the medians, the ratio (onnxruntime median / OpenVINO median:
above 1 means OpenVINO is faster), and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import describe

RATE = 16000
BACKENDS = ("onnxruntime", "openvino")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a full-size bundle with fp32 graphs")
    ap.add_argument("--seconds", type=float, default=10.24, help="clip length")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from recon_runtime import Reconstructor
    from recon_runtime.contract import ROLES

    info = describe()  # at the start: its load average is the other work's
    rng = np.random.default_rng(0)
    t = np.arange(int(args.seconds * RATE)) / RATE
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    recs = {
        b: Reconstructor.load(
            args.model, provider="cpu", precision="fp32", backend=b, threads=args.threads, stages=ROLES
        )
        for b in BACKENDS
    }
    for rec in recs.values():
        rec.reconstruct(audio, RATE)  # warm-up: first runs prepare kernels
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for i in range(args.repeats):
        for b in BACKENDS if i % 2 == 0 else BACKENDS[::-1]:
            t0 = time.perf_counter()
            recs[b].reconstruct(audio, RATE)
            times[b].append(round(time.perf_counter() - t0, 3))
            print(b, times[b][-1], flush=True)
    medians = {b: statistics.median(v) for b, v in times.items()}
    result = {
        "machine": info,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": args.seconds,
        "threads": args.threads,
        "runs_s": times,
        "median_s": medians,
        "onnxruntime_over_openvino": round(medians["onnxruntime"] / medians["openvino"], 3),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
