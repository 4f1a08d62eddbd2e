"""Parity on the GPU: ORT CUDA graphs vs PyTorch fp32, per stage, on realistic log-mel.

    NVIDIA_TF32_OVERRIDE=0 python -m benchmarks.gpu_parity --model DIR [--device cuda]

fp16 graphs must stay within the fp16 export threshold of PyTorch fp32; fp32 graphs (with TF32
disabled by NVIDIA_TF32_OVERRIDE=0) within the fp32 threshold. Prints a table, writes JSON, exits
non-zero when a stage is over its threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from recon_runtime.contract import FP16, FP32, REL_L2_THRESHOLDS, read_contract


def main() -> int:
    import torch

    from recon_export.checkpoint import reference_checkpoint
    from recon_export.graphs import wrappers
    from recon_export.validate import mel_batch, rel_l2
    from recon_runtime import Reconstructor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a --random-weights bundle (its seed rebuilds the weights)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    contract = read_contract(Path(args.model))
    if not contract.random_weights:
        sys.exit("gpu_parity rebuilds the PyTorch modules from a --random-weights bundle's config and seed")
    ckpt = reference_checkpoint(contract)  # its own weights, rebuilt from config, seed and tiny
    modules = {k: v.to(args.device).float() for k, v in wrappers(ckpt.vae, ckpt.vocoder).items()}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    mel = mel_batch(("speech", "music"), 256).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(mel).to(args.device)
        z = modules["encoder"](x[:, None])[0]
        ref = {
            "encoder": z.cpu().numpy(),
            "decoder": modules["decoder"](z).cpu().numpy(),
            "vocoder": modules["vocoder"](x).cpu().numpy(),
        }
    rows, ok = [], True
    for precision in (FP16, FP32):
        rec = Reconstructor.load(args.model, provider=args.device, precision=precision)
        got = {
            "encoder": rec.run_graphs(("encoder",), mel[:, None])[0],
            "decoder": rec.run_graphs(("decoder",), ref["encoder"])[0],
            "vocoder": rec.run_graphs(("vocoder",), mel)[0],
        }
        for stage, expected in ref.items():
            err = rel_l2(expected, got[stage])
            passed = err <= REL_L2_THRESHOLDS[precision]
            ok &= passed
            rows.append(
                {
                    "precision": precision,
                    "stage": stage,
                    "rel_l2": err,
                    "threshold": REL_L2_THRESHOLDS[precision],
                    "passed": passed,
                }
            )
            print(
                f"{precision} {stage:<8} rel-L2 {err:.2e} (threshold {REL_L2_THRESHOLDS[precision]:.0e}) "
                f"{'ok' if passed else 'FAIL'}",
                flush=True,
            )
    result = {"device": args.device, "tf32_override": os.environ.get("NVIDIA_TF32_OVERRIDE"), "rows": rows}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
