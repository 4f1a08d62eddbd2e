"""`recon-run serve` under bounded closed-loop load on loopback, against the in-process runtime.

For each server setting (each of `--backend`, times each of `--max-batches`, e.g. 1 and 8, or
`default` for the runtime's per-device batch, times each of `--hints`: OpenVINO's latency or
throughput hint, or `default`; the whole list `--repeats` times, interleaved), each clip length
and each client count, a fixed number of reconstruct requests is sent by that many closed-loop clients (each sends its
next request when the last one answered), so every run stops by itself. Each row is preceded by an
untimed warm-up round at the same concurrency (engines compile each new batch shape on its first
run); the in-process runs are warmed at the batch sizes they will use. Reported per row:
throughput (audio seconds per second, requests per second), p50/p95/p99 latency and the mean
batch size (windows per graph run, from the server's `recon_batch_size` histogram), the load average
when the row started, and the server process's peak and current RSS after it (VmHWM and VmRSS: the
peak is the server's so far, over its earlier rows too). Unless `--no-in-process`, the same inputs
then run in this process through `Reconstructor.reconstruct_many` (same bucket_frames and max_batch
as the server, so the same work) for the in-process throughput.

Overload: a server with `--max-queue Q` gets 2*Q closed-loop clients; accepted requests' p99 is
compared with the unloaded (one client) p99, refused ones must get 503 quickly, and no client may
time out. A refused client waits 50 ms before its next try.

    python -m benchmarks.server --model models/audioldm2-music --out benchmarks/results
    python -m benchmarks.server --model /tmp/tiny --requests 8 --quick        # a smoke run
    python -m benchmarks.server --model models/full --backend openvino --max-batches default \
        --hints latency,throughput --lengths 10.24 --clients 1,16 --no-in-process  # the hint, full size

The server and this process share the machine's cores; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from benchmarks.machine import describe

RATE = 16000


def machine() -> dict[str, Any]:
    return describe(("audioldm2-recon", "onnxruntime", "openvino", "fastapi", "uvicorn", "numpy"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clips(n: int, seconds: float, seed: int) -> list[np.ndarray]:
    """Distinct clips: two tones plus a little noise, each of exactly `seconds`."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * RATE))) / RATE
    out = []
    for _ in range(n):
        f1, f2 = rng.uniform(100, 2000, 2)
        x = 0.3 * np.sin(2 * np.pi * f1 * t) + 0.1 * np.sin(2 * np.pi * f2 * t) + 0.02 * rng.standard_normal(t.size)
        out.append(x.astype(np.float32))
    return out


def wav(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, RATE, subtype="FLOAT", format="WAV")
    return buf.getvalue()


class Server:
    def __init__(self, args: argparse.Namespace, *extra: str, backend: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(Path(sys.executable).with_name("recon-run")), "serve", "--model", str(args.model)]
        cmd += ["--provider", args.provider, "--precision", args.precision, "--backend", backend or args.backend]
        cmd += ["--port", str(self.port)]
        cmd += ["--max-queue", "1000", "--timeout-s", str(args.timeout), *extra]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        self.log = open(Path(args.out) / f"server-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        end = time.monotonic() + 600
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("server not ready in 600 s")

    def info(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.url + "/v1/info", timeout=10).json()

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for name in ("recon_batch_size_sum", "recon_batch_size_count"):
            out[name] = sum(float(m) for m in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))
        return out

    def memory_mb(self) -> dict[str, float]:
        """The server process's peak and current resident memory (Linux /proc), MB."""
        out: dict[str, float] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[{"VmHWM": "server_peak_rss_mb", "VmRSS": "server_rss_mb"}[key]] = round(
                    int(value.split()[0]) / 1024, 1
                )
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    a = np.asarray(values) * 1000
    return {f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)}


def closed_loop(
    url: str, bodies: list[bytes], clients: int, total: int, timeout: float, retry_pause: float | None = None
) -> dict[str, Any]:
    """`clients` threads send `total` accepted requests in all (503s are retried after `retry_pause`)."""
    import httpx

    lock = threading.Lock()
    state = {"next": 0}
    ok: list[float] = []
    refused: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(timeout=timeout) as http:
            while True:
                with lock:
                    if state["next"] >= total:
                        return
                    i = state["next"]
                    state["next"] += 1
                while True:
                    t0 = time.perf_counter()
                    try:
                        r = http.post(url + "/v1/reconstruct", content=bodies[i % len(bodies)])
                    except httpx.HTTPError as e:
                        with lock:
                            errors.append(type(e).__name__)
                        break
                    dt = time.perf_counter() - t0
                    if r.status_code == 503 and retry_pause is not None:
                        with lock:
                            refused.append(dt)
                        time.sleep(retry_pause)
                        continue
                    with lock:
                        if r.status_code == 200:
                            ok.append(dt)
                        else:
                            errors.append(str(r.status_code))
                    break

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall": time.perf_counter() - t0, "ok": ok, "refused": refused, "errors": errors}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from recon_runtime import Reconstructor
    from recon_runtime.serving.config import SERVER_BUCKET_FRAMES

    info = machine()  # at the start: its load average is the other work's
    Path(args.out).mkdir(parents=True, exist_ok=True)
    lengths = [float(x) for x in args.lengths.split(",")]
    concurrency = [int(x) for x in args.clients.split(",")]
    batches = [None if x == "default" else int(x) for x in args.max_batches.split(",")]
    hints = [None if x == "default" else x for x in args.hints.split(",")]
    backends = args.backend.split(",")
    inputs = {s: clips(args.requests, s, seed=int(s * 100)) for s in lengths}
    bodies = {s: [wav(x) for x in xs] for s, xs in inputs.items()}
    rows: list[dict[str, Any]] = []
    served: dict[str, Any] = {}
    settings = [(e, b, h) for e in backends for b in batches for h in hints]
    for backend, max_batch, hint in [x for _ in range(args.repeats) for x in settings]:
        extra = ["--max-wait-ms", str(args.max_wait_ms)]
        extra += ["--max-batch", str(max_batch)] if max_batch is not None else []
        extra += ["--performance-hint", hint] if hint is not None else []
        server = Server(args, *extra, backend=backend)
        try:
            sinfo = server.info()
            served = {k: sinfo[k] for k in ("backend", "provider", "precision", "weights", "source")}
            for s in lengths:
                for c in concurrency:
                    # warm-up at this concurrency: an engine compiles each new batch shape on its first run
                    # (OpenVINO: about 0.7 s per new batch size with the tiny model), a one-time cost
                    warm = c if args.warmup_requests is None else args.warmup_requests
                    if warm:
                        closed_loop(server.url, bodies[s][-warm:], min(c, warm), warm, args.timeout)
                    load = [round(x, 2) for x in os.getloadavg()]
                    m0 = server.metrics()
                    total = args.single_client_requests if c == 1 and args.single_client_requests else args.requests
                    res = closed_loop(server.url, bodies[s], c, total, args.timeout)
                    m1 = server.metrics()
                    runs = m1["recon_batch_size_count"] - m0["recon_batch_size_count"]
                    windows = m1["recon_batch_size_sum"] - m0["recon_batch_size_sum"]
                    n = len(res["ok"])
                    row = {
                        "mode": "server",
                        "backend": sinfo["backend"],
                        "max_batch": sinfo["limits"]["max_batch"],
                        "performance_hint": hint or "default",
                        "seconds": s,
                        "clients": c,
                        "requests": n,
                        "errors": res["errors"],
                        "audio_s_per_s": round(n * s / res["wall"], 3),
                        "req_per_s": round(n / res["wall"], 3),
                        **percentiles(res["ok"]),
                        "mean_batch": round(windows / runs, 2) if runs else None,
                        "load_average_at_start": load,
                        **server.memory_mb(),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            server.stop()
        if not args.in_process:
            continue
        rec = Reconstructor.load(
            args.model,
            backend=backend,
            provider=args.provider,
            precision=args.precision,
            threads=args.threads,
            max_batch=max_batch,
            bucket_frames=SERVER_BUCKET_FRAMES,
            performance_hint=hint,
        )
        for s in lengths:
            mb = rec.max_batch
            warm = {mb, args.requests % mb or mb}  # the batch sizes the timed run will use
            for b in warm:
                rec.reconstruct_many([(x, RATE) for x in inputs[s][:b]])
            t0 = time.perf_counter()
            rec.reconstruct_many([(x, RATE) for x in inputs[s]])
            wall = time.perf_counter() - t0
            row = {
                "mode": "in-process reconstruct_many",
                "backend": rec.backend,
                "max_batch": mb,
                "performance_hint": hint or "default",
                "seconds": s,
                "clients": None,
                "requests": args.requests,
                "audio_s_per_s": round(args.requests * s / wall, 3),
                "req_per_s": round(args.requests / wall, 3),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del rec

    overload = None
    if args.overload_queue:
        s = max(lengths)
        q = args.overload_queue
        server = Server(args, "--max-queue", str(q), backend=backends[0])  # the default max-batch and hint
        try:
            closed_loop(server.url, bodies[s][:4], 2 * q, 2 * q, args.timeout, retry_pause=0.05)  # warm-up
            unloaded = closed_loop(server.url, bodies[s], 1, args.requests, args.timeout)
            loaded = closed_loop(server.url, bodies[s], 2 * q, args.requests, args.timeout, retry_pause=0.05)
        finally:
            server.stop()
        u99 = percentiles(unloaded["ok"])["p99"]
        l99 = percentiles(loaded["ok"])["p99"]
        overload = {
            "seconds": s,
            "max_queue": q,
            "clients": 2 * q,
            "accepted": len(loaded["ok"]),
            "refused_503": len(loaded["refused"]),
            "client_errors_or_timeouts": loaded["errors"],
            "unloaded_ms": percentiles(unloaded["ok"]),
            "accepted_ms": percentiles(loaded["ok"]),
            "refused_ms": percentiles(loaded["refused"]),
            "p99_ratio": round(l99 / u99, 2) if u99 and l99 else None,
        }
        print(json.dumps(overload), flush=True)
    return {"machine": info, "served": served, "args": vars(args), "rows": rows, "overload": overload}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| mode | backend | hint | max batch | clip s | clients | req | audio-s/s | req/s | p50 ms | p95 ms | p99 ms "
        "| mean batch | server peak RSS MB | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        cells = [r["mode"], r.get("backend", "-"), r.get("performance_hint", "-"), r["max_batch"], r["seconds"]]
        cells += [r.get("clients") or "-", r["requests"], r["audio_s_per_s"], r["req_per_s"]]
        cells += [r.get("p50", "-"), r.get("p95", "-"), r.get("p99", "-"), r.get("mean_batch", "-")]
        cells += [r.get("server_peak_rss_mb", "-"), (r.get("load_average_at_start") or ["-"])[0]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--backend", default="auto", help="comma-separated: each backend's servers in turn")
    p.add_argument("--repeats", type=int, default=1, help="run the server settings this many times, interleaved")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lengths", default="1.0,10.24")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--max-batches", default="1,8", help="comma-separated; default: the runtime's per-device batch")
    p.add_argument("--hints", default="default", help="comma-separated: latency, throughput, default (none passed)")
    p.add_argument("--no-in-process", dest="in_process", action="store_false", help="skip the in-process rows")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--requests", type=int, default=32, help="requests per row (a fixed count: the run stops by itself)")
    p.add_argument("--single-client-requests", type=int, default=None, help="requests of the 1-client rows")
    p.add_argument(
        "--warmup-requests", type=int, default=None, help="untimed requests before each server row (default: clients)"
    )
    p.add_argument("--overload-queue", type=int, default=2, help="--max-queue of the overload run (0: skip it)")
    p.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, s")
    p.add_argument("--out", default="/tmp/recon-server-bench")
    p.add_argument("--tag", default=None, help="name of the JSON written to --out")
    args = p.parse_args()
    result = run(args)
    result["date"] = date.today().isoformat()
    name = args.tag or f"server-{args.provider}-{result['date']}"
    path = Path(args.out) / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['machine']}\n{result['served']}\n")
    print(table(result))
    if result["overload"]:
        print("\noverload:", json.dumps(result["overload"]))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
