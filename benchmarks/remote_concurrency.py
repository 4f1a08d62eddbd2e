"""`--server URL` file jobs at several concurrencies against a real local `recon-run serve`.

One server (default settings but `--provider cpu --precision fp32`) on loopback; the same clips
are sent through `remote.run_bounded` + `remote.retrying_client` at each concurrency, the whole
list `--repeats` times, interleaved, after an untimed warm-up round at each concurrency. Each
file is read from disk in its worker (as the CLI does) and its answer is written to a temporary
folder. Reported per concurrency: the median wall time, files per second, audio seconds per wall
second, the retries, the mean batch the server ran (windows per graph run, from its
`recon_batch_size` histogram: whether the files in flight fill its batches), and the load average when each run started (the server and this client share
the machine's cores).

    python -m benchmarks.remote_concurrency --model /tmp/tiny --out benchmarks/results
    python -m benchmarks.remote_concurrency --model /tmp/tiny --files 8 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import soundfile as sf

from benchmarks.machine import describe
from benchmarks.server import RATE, clips, free_port
from recon_runtime.serving.retry import RetryPolicy, retrying_client, run_bounded


def start_server(model: Path, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("recon-run")
    cmd = [str(exe), "serve", "--model", str(model), "--provider", "cpu", "--precision", "fp32", "--port", str(port)]
    proc = subprocess.Popen([*cmd, *extra], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server not ready in 300 s:\n{log.read_text()}")


def batch_counters(url: str) -> tuple[float, float]:
    """The server's `recon_batch_size` histogram: (windows run, graph runs), all stages together."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = [
        sum(float(m) for m in re.findall(rf"^recon_batch_size_{name}\{{[^}}]*\}} (\S+)$", text, re.M))
        for name in ("sum", "count")
    ]
    return found[0], found[1]


def one_run(url: str, files: list[Path], out: Path, concurrency: int) -> dict[str, Any]:
    client, transport = retrying_client(url, concurrency=concurrency, policy=RetryPolicy())

    def work(src: Path) -> float:
        wave, wav = client.reconstruct_wav(src.read_bytes())
        (out / src.name).write_bytes(wav)
        return wave.shape[0] / RATE

    load = os.getloadavg()[0]
    windows0, runs0 = batch_counters(url)
    started = time.perf_counter()
    try:
        outcomes = list(run_bounded(files, work, concurrency))
    finally:
        client.close()
    wall = time.perf_counter() - started
    windows1, runs1 = batch_counters(url)
    failed = [str(o.error) for o in outcomes if o.error is not None]
    seconds = sum(o.result for o in outcomes if o.error is None)
    return {
        "wall_s": wall,
        "audio_s": seconds,
        "failed": failed,
        "retries": transport.retries,
        "load_1min": load,
        "mean_batch": (windows1 - windows0) / max(runs1 - runs0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--files", type=int, default=24)
    p.add_argument("--seconds", type=float, default=5.0, help="Length of each clip.")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--server-args", default="", help="Extra `recon-run serve` options, space-separated.")
    p.add_argument("--out", type=Path, default=None, help="Folder for the JSON result.")
    p.add_argument("--tag", default="", help="Added to the result's file name.")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = []
        for i, x in enumerate(clips(args.files, args.seconds, seed=7)):
            files.append(folder / f"clip{i:03d}.wav")
            sf.write(str(files[-1]), x, RATE, subtype="FLOAT")
        answers = folder / "answers"
        answers.mkdir()
        port = free_port()
        server = start_server(args.model, port, folder / "server.log", args.server_args.split())
        url = f"http://127.0.0.1:{port}"
        runs: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
        try:
            for c in levels:  # warm-up: every batch shape the server will see at this concurrency
                one_run(url, files[: max(c, 2) * 2], answers, c)
            for r in range(args.repeats):
                for c in levels if r % 2 == 0 else levels[::-1]:
                    runs[c].append(one_run(url, files, answers, c))
                    row = runs[c][-1]
                    print(
                        f"repeat {r} concurrency {c}: {row['wall_s']:.2f} s, {len(row['failed'])} failed, "
                        f"{row['retries']} retries, mean batch {row['mean_batch']:.2f}, load {row['load_1min']:.1f}",
                        file=sys.stderr,
                    )
        finally:
            server.terminate()
            server.wait(60)
    rows = []
    for c, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        audio = results[0]["audio_s"]
        rows.append(
            {
                "concurrency": c,
                "median_wall_s": round(wall, 3),
                "files_per_s": round(args.files / wall, 3),
                "audio_s_per_s": round(audio / wall, 2),
                "walls_s": [round(r["wall_s"], 3) for r in results],
                "retries": [r["retries"] for r in results],
                "failed": sum(len(r["failed"]) for r in results),
                "load_1min": [round(r["load_1min"], 2) for r in results],
                "mean_batch": round(statistics.mean(r["mean_batch"] for r in results), 2),
            }
        )
    base = rows[0]["median_wall_s"]
    for row in rows:
        row["speedup_vs_first"] = round(base / row["median_wall_s"], 2)
    result = {
        "benchmark": "remote_concurrency",
        "date": date.today().isoformat(),
        "machine": describe(("audioldm2-recon", "onnxruntime", "fastapi", "uvicorn", "httpx", "numpy")),
        "model": str(args.model),
        "files": args.files,
        "seconds_per_file": args.seconds,
        "repeats": args.repeats,
        "server_args": args.server_args,
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"remote-concurrency-cpu{'-' + args.tag if args.tag else ''}-{result['date']}.json"
        (args.out / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
