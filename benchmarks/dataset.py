"""The same files through `recon-run encode` (one process) and through `recon-run dataset encode`
(Ray Data, local Ray) with 1 and 2 workers: files/s, audio-s/s and the overhead against the CLI.

    python -m benchmarks.dataset --model models/audioldm2-music --files 8 --seconds 3

Writes benchmarks/results/dataset-<provider>-<date>.json with the machine (CPU model and flags,
load average), versions and the command line. Each run is a fresh process, timed from launch to
exit, so Ray's start-up and the model's load are in the numbers, as a user sees them. Every run's
output is checked: one latent per file and no failures, else the benchmark stops without writing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from benchmarks.machine import describe
from recon_runtime.options import DEFAULT_MODEL


def machine() -> dict[str, Any]:
    return describe(("audioldm2-recon", "onnxruntime", "ray", "pyarrow", "numpy"))


def make_files(folder: Path, count: int, seconds: float) -> float:
    """`count` clips of a few tones and noise at 16 kHz; returns the total audio seconds."""
    rng = np.random.default_rng(0)
    for i in range(count):
        t = np.arange(int(seconds * 16000)) / 16000
        audio = sum(0.1 * np.sin(2 * np.pi * f * t) for f in (110 * (i + 1), 440, 1250)) + 0.01 * rng.standard_normal(
            t.size
        )
        sf.write(str(folder / f"clip{i:03d}.wav"), audio.astype(np.float32), 16000, subtype="FLOAT")
    return count * seconds


def count_rows(name: str, out: Path, files: int) -> None:
    """Stop unless the run wrote exactly one latent per input file and no error."""
    if name == "cli":
        got = len(list(out.rglob("*.npy")))
    else:
        import pyarrow.parquet as pq

        summary = json.loads((out / "summary.json").read_text())
        if summary["failed"] or summary["ok"] != files:
            raise SystemExit(f"{name}: {summary['ok']} ok, {summary['failed']} failed, expected {files} ok")
        got = sum(pq.read_metadata(p).num_rows for p in (out / "latents").glob("part-*.parquet"))
    if got != files:
        raise SystemExit(f"{name}: {got} latents written for {files} files")


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--backend", default="onnxruntime", choices=("auto", "onnxruntime", "openvino"))
    ap.add_argument("--gpus-per-worker", default="0", help="with --provider cuda, e.g. 1")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts for the Ray runs")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/...)")
    args = ap.parse_args()
    exe = Path(sys.executable).parent
    contract = json.loads((Path(args.model) / "recon.json").read_text())
    rows = []
    info = machine()  # at the start: its load average is the other work's
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        audio_s = make_files(src, args.files, args.seconds)
        cores = os.cpu_count() or 1
        model = ["--model", args.model, "--provider", args.provider, "--backend", args.backend]
        runs: list[tuple[str, list[str]]] = [
            ("cli", [str(exe / "recon-run"), "encode", str(src), "-o", f"{tmp}/cli", *model]),
        ]
        for w in (int(x) for x in args.workers.split(",")):
            runs.append(
                (
                    f"ray, {w} worker{'s' if w > 1 else ''}",
                    [
                        str(exe / "recon-run"),
                        "dataset",
                        "encode",
                        str(src),
                        "-o",
                        f"{tmp}/ray{w}",
                        *model,
                        "--gpus-per-worker",
                        args.gpus_per_worker,
                        "--workers",
                        str(w),
                        "--cpus-per-worker",
                        str(max(1, cores // w)),
                        "--batch-size",
                        "2",
                        "--no-progress",
                    ],
                )
            )
        for name, cmd in runs:
            wall = timed(cmd)
            count_rows(name, Path(cmd[cmd.index("-o") + 1]), args.files)
            rows.append(
                {
                    "run": name,
                    "wall_s": round(wall, 2),
                    "files_per_s": round(args.files / wall, 4),
                    "audio_s_per_s": round(audio_s / wall, 4),
                }
            )
            print(
                f"{name:<16} {wall:7.1f} s  {args.files / wall:6.3f} files/s  {audio_s / wall:6.3f} audio-s/s",
                flush=True,
            )
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    cli_wall = rows[0]["wall_s"]
    for r in rows:
        r["overhead_vs_cli"] = round(r["wall_s"] / cli_wall - 1, 4)
    result = {
        "what": "encode the same files: recon-run encode vs recon-run dataset encode (local Ray), wall from launch",
        "date": dt.date.today().isoformat(),
        "model": args.model,
        "provider": args.provider,
        "backend": args.backend,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "checked": "each run wrote one latent per file and reported no failure",
        "architecture": contract.get("source", {}).get("config") or contract.get("source", {}).get("model"),
        "random_weights": contract.get("source", {}).get("weights") == "random",
        "files": args.files,
        "seconds_per_file": args.seconds,
        "audio_seconds": audio_s,
        "machine": info,
        "rows": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"dataset-{args.provider}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
