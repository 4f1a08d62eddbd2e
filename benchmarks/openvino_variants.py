"""The bf16 plan's variants on OpenVINO (CPU): which stages stay f32 -> speed and errors.

    python -m benchmarks.openvino_variants --model /tmp/ov/full

Every (stage, precision) is compiled once. Errors are measured on 2.56 s of generated speech and
music where they mean something with random weights (encoder and vocoder on real mels, decoder on
the f32 encoder's latents; the chain is reported, not budgeted). Speed: each stage at 10.24 s,
batch 1, median of `--repeats` runs; a variant's chain time is the sum of its stages' medians.
Writes benchmarks/results/openvino-variants-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from recon_export.validate import BF16_CHECK_FRAMES, BF16_CHECK_KINDS, log_mel_l1, mel_batch, rel_l2
from recon_runtime.contract import (
    BF16,
    BF16_ENCODER_REL_L2_BUDGET,
    BF16_F32_STAGES,
    BF16_VOCODER_LOG_MEL_L1_BUDGET,
    DECODER,
    ENCODER,
    FP32,
    ROLES,
    TRAINING_WINDOW_FRAMES,
    VOCODER,
    read_contract,
)
from recon_runtime.executors import ExecutorOptions
from recon_runtime.executors import openvino as ov_exec

RESULTS = Path(__file__).with_name("results")


def _inputs(frames: int) -> dict[str, np.ndarray]:
    mel = mel_batch(("music",), frames)
    return {
        ENCODER: mel[:, None],
        DECODER: np.random.default_rng(0).standard_normal((1, 8, frames // 4, 16)).astype(np.float32),
        VOCODER: mel,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a full-size bundle with fp32 graphs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=TRAINING_WINDOW_FRAMES, help="frames per timed run")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    contract = read_contract(args.model)
    files = {r: args.model / contract.graph(r, FP32).file for r in ROLES}  # type: ignore[union-attr]
    supported, reason = ov_exec.BF16_PROBE()
    if not supported:
        raise SystemExit(f"bf16 not available here: {reason}")
    options = ExecutorOptions()
    compiled: dict[tuple[str, str], Any] = {}
    compile_s: dict[str, float] = {}
    for role, prec in product(ROLES, (FP32, BF16)):
        t0 = time.perf_counter()
        compiled[role, prec] = ov_exec.core().compile_model(
            str(files[role]), ov_exec.DEVICE, ov_exec.compile_config(prec, options, None)
        )
        compile_s[f"{role} {prec}"] = round(time.perf_counter() - t0, 2)
        print(f"compiled {role} {prec} in {compile_s[f'{role} {prec}']} s", flush=True)

    def run(role: str, prec: str, x: np.ndarray) -> np.ndarray:
        req = compiled[role, prec].create_infer_request()
        return np.stack([np.array(req.infer({0: item[None]})[0][0]) for item in x])

    # errors: every stage output computed once per precision
    mel = mel_batch(BF16_CHECK_KINDS, BF16_CHECK_FRAMES)
    z = {p: run(ENCODER, p, mel[:, None]) for p in (FP32, BF16)}
    dec = {(pe, pd): run(DECODER, pd, z[pe]) for pe, pd in product((FP32, BF16), repeat=2)}
    voc_real = {p: run(VOCODER, p, mel) for p in (FP32, BF16)}
    ref_chain = run(VOCODER, FP32, dec[FP32, FP32][:, 0])

    # speed: each stage at 10.24 s, batch 1
    timed = _inputs(args.frames)
    stage_ms: dict[str, dict[str, float]] = {}
    for role, prec in product(ROLES, (FP32, BF16)):
        req = compiled[role, prec].create_infer_request()
        req.infer({0: timed[role]})  # warm-up (shape-specific kernels)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            req.infer({0: timed[role]})
            times.append(time.perf_counter() - t0)
        stage_ms.setdefault(role, {})[prec] = round(1000 * float(np.median(times)), 1)
        print(f"{role} {prec}: {stage_ms[role][prec]} ms (runs {[round(t * 1000) for t in times]})", flush=True)

    variants = []
    f32_total = sum(stage_ms[r][FP32] for r in ROLES)
    for kept in ((), (VOCODER,), (ENCODER,), (DECODER,), (ENCODER, DECODER), (DECODER, VOCODER), ROLES):
        plan = ov_exec.stage_precisions(BF16, kept)
        chain_ms = sum(stage_ms[r][plan[r]] for r in ROLES)
        chain = run(VOCODER, plan[VOCODER], dec[plan[ENCODER], plan[DECODER]][:, 0])
        row = {
            "f32_stages": list(kept),
            "chain_ms_10s": round(chain_ms, 1),
            "speedup_vs_openvino_f32": round(f32_total / chain_ms, 2),
            "encoder_rel_l2": rel_l2(z[FP32], z[plan[ENCODER]]),
            "decoder_rel_l2": rel_l2(dec[FP32, FP32], dec[FP32, plan[DECODER]]),
            "vocoder_real_mel_log_mel_l1": log_mel_l1(voc_real[FP32], voc_real[plan[VOCODER]]),
            "chain_log_mel_l1": log_mel_l1(ref_chain, chain),
        }
        row["within_budget"] = (
            row["encoder_rel_l2"] <= BF16_ENCODER_REL_L2_BUDGET
            and row["vocoder_real_mel_log_mel_l1"] <= BF16_VOCODER_LOG_MEL_L1_BUDGET
        )
        variants.append(row)
        print(json.dumps(row), flush=True)
    out = {
        "device": "cpu",
        "cpu": ov_exec.core().get_property("CPU", "FULL_DEVICE_NAME"),
        "cpu_flags": sorted(
            (ov_exec.cpu_flags() or set()) & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2"}
        ),
        "bf16_probe": reason,
        "openvino": ov_exec.ov.__version__,
        "default_f32_stages": list(BF16_F32_STAGES),
        "error_signals": list(BF16_CHECK_KINDS),
        "error_frames": BF16_CHECK_FRAMES,
        "timed_frames": args.frames,
        "repeats": args.repeats,
        "compile_s": compile_s,
        "stage_ms": stage_ms,
        "variants": variants,
        "budgets": {"encoder_rel_l2": BF16_ENCODER_REL_L2_BUDGET, "vocoder_log_mel_l1": BF16_VOCODER_LOG_MEL_L1_BUDGET},
        "date": _dt.date.today().isoformat(),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"openvino-variants-cpu-{out['date']}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
