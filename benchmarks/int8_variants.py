"""Speed vs error of int8 variants, per graph, to show why the exported default was chosen.

    python -m benchmarks.int8_variants --model models/demo-int8 --seconds 2.56

Variants: fp32 (reference), int8 with every Conv/MatMul block quantized, and the bundle's int8
graph (blocks kept fp32 by the export's measured budget search). Errors are rel-L2 vs the fp32
graph on the export's calibration-independent validation signals; times are medians on this CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.latency import machine_info, test_mel
from recon_export.quantize import Int8Quantizer, _session, calibration_mels
from recon_runtime.contract import FP32, HOP_LENGTH, INT8, LATENT_DOWNSAMPLE, ROLES, SAMPLE_RATE, read_contract


def _time(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray], repeats: int) -> float:
    sess = _session(model)
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/demo-int8")
    ap.add_argument("--seconds", type=float, default=2.56)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bundle = Path(args.model)
    contract = read_contract(bundle)
    frames = int(round(args.seconds * SAMPLE_RATE)) // HOP_LENGTH + 1
    frames += (-frames) % LATENT_DOWNSAMPLE
    mel = test_mel(frames, 1).astype(np.float32)
    fp32 = {r: bundle / contract.graph(r, FP32).file for r in ROLES}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        q = Int8Quantizer(fp32, Path(work), calibration_mels(None), echo=lambda s: None)
        z = q._run32("encoder", mel[:, None])[0]
        feeds = {"encoder": {"log_mel": mel[:, None]}, "decoder": {"latent": z}, "vocoder": {"log_mel": mel}}
        for role in ROLES:
            chosen = contract.graph(role, INT8)
            variants = [
                ("fp32", onnx.load(str(fp32[role])), []),
                ("int8, every block", q.quantize(role, []), []),
                ("int8, exported default", onnx.load(str(bundle / chosen.file)), chosen.notes["kept_fp32_blocks"]),
            ]
            for name, model, kept in variants:
                err = 0.0 if name == "fp32" else q.error(role, model)
                ms = _time(model, feeds[role], args.repeats)
                rows.append(
                    {"graph": role, "variant": name, "kept_fp32_blocks": len(kept), "rel_l2": err, "median_ms": ms}
                )
                print(f"{role:<8} {name:<24} kept fp32 {len(kept):2d}  rel-L2 {err:.4f}  {ms:8.1f} ms", flush=True)
    result = {"machine": machine_info("cpu", None), "seconds": args.seconds, "bundle": str(bundle), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
