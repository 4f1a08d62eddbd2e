"""Speed vs error of int8 variants, per graph and for the chain, to show why the exported default was chosen.

    python -m benchmarks.int8_variants --model models/demo-int8 --seconds 2.56 --out results/int8-variants.json

Per graph: fp32 (reference), every Conv/MatMul block int8 with MinMax and with percentile calibration,
and the bundle's int8 graph (blocks kept fp32 by the export's measured, cost-aware search). Each row
has the graph's rel-L2 vs fp32, the chain's log-mel L1 vs the fp32 chain with only that graph int8,
the share of multiply-accumulates in int8, and the median time on this CPU. Chain rows: fp32, every
block int8 in all three graphs, and the exported set. Errors are measured on the export's
calibration-independent validation signals; times at --seconds, batch 1, in one process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.latency import machine_info, test_mel
from benchmarks.tuning import measure
from recon_export.quantize import DEFAULT_SCHEME, Int8Quantizer, _session, calibration_mels
from recon_runtime.contract import FP32, HOP_LENGTH, INT8, LATENT_DOWNSAMPLE, ROLES, SAMPLE_RATE, read_contract


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
    fp32_files = {r: bundle / contract.graph(r, FP32).file for r in ROLES}
    exported = {r: onnx.load(str(bundle / contract.graph(r, INT8).file)) for r in ROLES}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        q = Int8Quantizer(fp32_files, Path(work), calibration_mels(None), echo=lambda s: None)
        fp32 = {r: q.fp32_model(r) for r in ROLES}
        z = q._run32("encoder", mel[:, None])[0]
        feeds = {"encoder": {"log_mel": mel[:, None]}, "decoder": {"latent": z}, "vocoder": {"log_mel": mel}}
        every: dict[str, onnx.ModelProto] = {}

        def add(graph: str, variant: str, models: dict[str, onnx.ModelProto], share: float | None) -> None:
            if graph == "chain":
                sessions = {r: _session(m) for r, m in models.items()}
                chain = q.chain_error(models)

                def run() -> None:
                    zz = sessions["encoder"].run(None, feeds["encoder"])[0]
                    mm = sessions["decoder"].run(None, {"latent": zz})[0]
                    sessions["vocoder"].run(None, {"log_mel": mm[:, 0]})

                err = None
            else:
                chain = q.chain_error({r: (models[graph] if r == graph else fp32[r]) for r in ROLES})
                err = 0.0 if variant == "fp32" else q.error(graph, models[graph])
                sess = _session(models[graph])

                def run() -> None:
                    sess.run(None, feeds[graph])

            ms = measure(run, args.repeats)["median_ms"]
            row = {"graph": graph, "variant": variant, "rel_l2": err, "chain_log_mel_l1": chain}
            row.update({"int8_mac_share": share, "median_ms": ms})
            rows.append(row)
            err_text = "" if err is None else f"rel-L2 {err:7.4f}"
            share_text = "" if share is None else f"int8 {share:4.0%}"
            print(
                f"{graph:<8} {variant:<34} {err_text:<15} chain {chain:.4f} nats  {share_text:<9} {ms:8.1f} ms",
                flush=True,
            )

        for role in ROLES:
            add(role, "fp32", fp32, 0.0)
            for scheme, name in ((replace(DEFAULT_SCHEME, calibration="minmax"), "minmax"), (DEFAULT_SCHEME, "")):
                q.scheme = scheme
                model = q.quantize(role, [])
                label = f"int8 every block, {name or f'percentile {scheme.percentile}'}"
                add(role, label, {**fp32, role: model}, q.int8_share(role, []))
                if scheme == DEFAULT_SCHEME:
                    every[role] = model
            entry = contract.graph(role, INT8)
            kept = entry.notes.get("kept_fp32_blocks", [])
            add(
                role,
                f"exported ({len(kept)} blocks kept fp32)",
                {**fp32, role: exported[role]},
                q.int8_share(role, kept),
            )
        add("chain", "fp32", fp32, None)
        add("chain", "int8 every block, all graphs", every, None)
        add("chain", "exported int8 set", exported, None)
    report = json.loads((bundle / "recon.json").read_text())["validation"].get(INT8, {})
    result = {
        "machine": machine_info("cpu", None),
        "seconds": args.seconds,
        "bundle": str(bundle),
        "scheme": DEFAULT_SCHEME.label(),
        "rows": rows,
        "export_search": report.get("search", []),
        "budgets": {r: g.get("budget") for r, g in report.get("graphs", {}).items()}
        | {"chain": report.get("chain_budget")},
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
