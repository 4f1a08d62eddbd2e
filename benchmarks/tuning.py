"""Session settings chosen by measurement: the encoder->decoder->vocoder chain under each variant.

    python -m benchmarks.tuning --model models/demo --device cpu  --seconds 2.56
    python -m benchmarks.tuning --model DIR         --device cuda --seconds 10.24

CPU variants: threads, memory arena, graph optimisation level, memory patterns. CUDA variants: cuDNN algorithm
search (EXHAUSTIVE vs HEURISTIC, first run and steady state), the 1-D convolution padding, NHWC,
CUDA graph capture for the fixed window shape (with IO binding, on the dynamic graphs and on the
runtime's fixed-shape chain, whose pinned dimensions leave no shape computation on the CPU). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.latency import machine_info, test_mel
from recon_runtime.contract import HOP_LENGTH, LATENT_DOWNSAMPLE, ROLES, SAMPLE_RATE, read_contract
from recon_runtime.executors.onnxruntime import CUDA_PROVIDER_OPTIONS, FixedShapeChain, SessionConfig

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _sessions(
    bundle: Path,
    precision: str,
    providers: list[Any],
    threads: int | None,
    arena: bool,
    level: str,
    mem_pattern: bool = True,
):
    contract = read_contract(bundle)
    out = {}
    for role in ROLES:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = arena
        so.enable_mem_pattern = mem_pattern
        so.graph_optimization_level = LEVELS[level]
        if threads:
            so.intra_op_num_threads = threads
        entry = contract.graph(role, precision)
        out[role] = ort.InferenceSession(str(bundle / entry.file), so, providers=providers)
    return out


def _chain_host(sessions: dict[str, Any], mel: np.ndarray) -> np.ndarray:
    z = sessions["encoder"].run(None, {"log_mel": mel[:, None]})[0]
    m = sessions["decoder"].run(None, {"latent": z})[0]
    return sessions["vocoder"].run(None, {"log_mel": m[:, 0]})[0]


def _chain_bound(sessions: dict[str, Any], mel: np.ndarray) -> Any:
    """IO binding with device buffers allocated once: the form CUDA graph capture needs."""
    b, t, f = mel.shape
    x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(mel[:, None]), "cuda", 0)
    z = ort.OrtValue.ortvalue_from_shape_and_type([b, 8, t // 4, 16], np.float32, "cuda", 0)
    s = ort.OrtValue.ortvalue_from_shape_and_type([b, 8, t // 4, 16], np.float32, "cuda", 0)
    m = ort.OrtValue.ortvalue_from_shape_and_type([b, 1, t, f], np.float32, "cuda", 0)
    w = ort.OrtValue.ortvalue_from_shape_and_type([b, HOP_LENGTH * t + 32], np.float32, "cuda", 0)
    bindings = []
    for role, ins, outs in (
        ("encoder", [("log_mel", x, None)], [("latent", z), ("latent_std", s)]),
        ("decoder", [("latent", z, None)], [("log_mel", m)]),
        ("vocoder", [("log_mel", m, (b, t, f))], [("waveform", w)]),
    ):
        bind = sessions[role].io_binding()
        for name, value, shape in ins:
            if shape:
                bind.bind_input(name, "cuda", 0, np.float32, list(shape), value.data_ptr())
            else:
                bind.bind_ortvalue_input(name, value)
        for name, value in outs:
            bind.bind_ortvalue_output(name, value)
        bindings.append((sessions[role], bind))

    def run() -> np.ndarray:
        for sess, bind in bindings:
            sess.run_with_iobinding(bind)
        return w.numpy()

    return run


def measure(fn: Any, repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_run_ms": first * 1e3, "median_ms": statistics.median(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--seconds", type=float, default=None, help="clip length (default 2.56 on CPU, 10.24 on CUDA)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bundle = Path(args.model)
    seconds = args.seconds or (10.24 if args.device == "cuda" else 2.56)
    frames = int(round(seconds * SAMPLE_RATE)) // HOP_LENGTH + 1
    frames += (-frames) % LATENT_DOWNSAMPLE
    mel = test_mel(frames, 1).astype(np.float32)
    repeats = args.repeats or (20 if args.device == "cuda" else 2)
    rows = []
    if args.device == "cpu":
        variants = [  # name, threads, arena, optimisation level, memory patterns
            ("threads=default arena=off level=all", None, False, "all", True),
            ("threads=default arena=on level=all", None, True, "all", True),
            ("threads=1 arena=off level=all", 1, False, "all", True),
            ("threads=2 arena=off level=all", 2, False, "all", True),
            ("threads=default arena=off level=extended", None, False, "extended", True),
            ("threads=default arena=off level=basic", None, False, "basic", True),
            ("threads=default arena=off level=all mem_pattern=off", None, False, "all", False),
        ]
        for name, threads, arena, level, pattern in variants:
            sessions = _sessions(bundle, "fp32", ["CPUExecutionProvider"], threads, arena, level, pattern)
            r = measure(lambda s=sessions: _chain_host(s, mel), repeats)
            rows.append({"variant": name, "precision": "fp32", **r})
            print(f"{name:<45} median {r['median_ms']:9.1f} ms", flush=True)
    else:
        import torch  # noqa: F401 - loads the CUDA/cuDNN libraries onnxruntime-gpu links against

        for precision in ("fp16", "fp32"):
            for name, extra, bound in [
                ("recon default (HEURISTIC, conv1d pad, max workspace)", {}, False),
                ("EXHAUSTIVE", {"cudnn_conv_algo_search": "EXHAUSTIVE"}, False),
                ("DEFAULT algo", {"cudnn_conv_algo_search": "DEFAULT"}, False),
                ("no conv1d pad", {"cudnn_conv1d_pad_to_nc1d": "0"}, False),
                ("prefer NHWC", {"prefer_nhwc": "1"}, False),
                ("IO binding", {}, True),
                ("IO binding + CUDA graph", {"enable_cuda_graph": "1"}, True),
            ]:
                opts = {**CUDA_PROVIDER_OPTIONS, **extra}
                try:
                    sessions = _sessions(bundle, precision, [("CUDAExecutionProvider", opts)], None, True, "all")
                    fn = _chain_bound(sessions, mel) if bound else (lambda s=sessions: _chain_host(s, mel))
                    r = measure(fn, repeats)
                except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
                    r = {"error": " ".join(str(e).split())[:200]}
                rows.append({"variant": name, "precision": precision, **r})
                print(f"{precision} {name:<55} {r}", flush=True)
            # The runtime's own fixed-shape chain (free dimensions pinned, so no CPU shape nodes),
            # without and with CUDA graph capture: what `Reconstructor(cuda_graph=True)` runs.
            contract = read_contract(bundle)
            entries = [contract.graph(role, precision) for role in ROLES]
            for name, graph in (("runtime fixed-shape chain", False), ("runtime fixed-shape chain + CUDA graph", True)):
                try:
                    config = SessionConfig(provider="cuda", cuda_graph=graph)
                    chain = FixedShapeChain(bundle, contract, entries, config, mel[:, None].shape)
                    r = measure(lambda c=chain: c.run(mel[:, None]), repeats)
                except Exception as e:  # noqa: BLE001 - reported, not fatal
                    r = {"error": " ".join(str(e).split())[:200]}
                rows.append({"variant": name, "precision": precision, **r})
                print(f"{precision} {name:<55} {r}", flush=True)
    result = {
        "machine": machine_info(args.device, None),
        "seconds": seconds,
        "frames": frames,
        "rows": rows,
        "tf32_override": os.environ.get("NVIDIA_TF32_OVERRIDE"),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
