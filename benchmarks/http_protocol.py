"""The HTTP layer `recon-run serve` pins (uvicorn's h11 with the header timeout) against httptools.

uvicorn's `auto` picks httptools where it is installed; `recon-run serve` pins h11 because its
request-head timeout extends uvicorn's h11 protocol. This measures what that costs, each
implementation serving the same app (the tiny or a given bundle, no warm-up) on loopback in this
process, with one keep-alive httpx client:

- small requests: `GET /healthz`, requests per second;
- uploads: a body of `--upload-mb` MiB to `/v1/decode` (read whole, then refused as not a .npy), MiB/s;
- reconstruct: 10.24 s clips end to end, requests per second (the model's share dominates).

    python -m benchmarks.http_protocol --model /tmp/tiny --out benchmarks/results

Implementations run one after another in one process, alternating, `--rounds` times; compare them
only within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from benchmarks.machine import describe

RATE = 16000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The app on a uvicorn server in a thread, with the given HTTP protocol."""

    def __init__(self, app: Any, http: Any):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", http=http)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def measure(url: str, upload: bytes, clip: bytes, small: int, uploads: int, clips: int) -> dict[str, float]:
    import httpx

    with httpx.Client(timeout=120) as c:
        while c.get(url + "/readyz").status_code != 200:
            time.sleep(0.05)
        t0 = time.perf_counter()
        for _ in range(small):
            assert c.get(url + "/healthz").status_code == 200
        small_rps = small / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(uploads):
            r = c.post(url + "/v1/decode", content=upload)
            assert r.status_code == 400, r.text
        upload_mibs = uploads * len(upload) / 2**20 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(clips):
            assert c.post(url + "/v1/reconstruct", content=clip).status_code == 200
        clip_rps = clips / (time.perf_counter() - t0)
    return {"healthz_req_per_s": small_rps, "upload_mib_per_s": upload_mibs, "reconstruct_req_per_s": clip_rps}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from recon_runtime import Reconstructor
    from recon_runtime.serving.app import create_app
    from recon_runtime.serving.config import ServerConfig
    from recon_runtime.serving.http_protocol import with_timeouts

    rec = Reconstructor.load(args.model, provider="cpu", precision="fp32", threads=args.threads)
    config = ServerConfig(model=str(args.model), warmup=False, max_body_mb=args.upload_mb + 1, max_batch=1)
    upload = b"\x93NOTNPY" + b"\0" * (args.upload_mb * 2**20)
    t = np.arange(int(10.24 * RATE)) / RATE
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), RATE, subtype="FLOAT", format="WAV")
    clip = buf.getvalue()
    impls = {
        "h11 + timeouts (serve)": with_timeouts(config.header_timeout_s, config.send_timeout_s),
        "httptools": "httptools",
    }
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in impls}
    for _ in range(args.rounds):
        for name, http in impls.items():
            served = Served(create_app(config, reconstructor=rec), http)
            try:
                rows[name].append(measure(served.url, upload, clip, args.small, args.uploads, args.clips))
            finally:
                served.close()
            print(name, json.dumps(rows[name][-1]), flush=True)
    medians = {
        name: {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]} for name, runs in rows.items()
    }
    return {
        "benchmark": "http_protocol",
        "date": date.today().isoformat(),
        "machine": describe(("audioldm2-recon", "uvicorn", "h11", "httptools", "fastapi", "httpx")),
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "median": medians,
        "runs": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--small", type=int, default=1000, help="GET /healthz requests per round")
    p.add_argument("--uploads", type=int, default=5, help="uploads per round")
    p.add_argument("--upload-mb", type=int, default=32)
    p.add_argument("--clips", type=int, default=5, help="10.24 s reconstructions per round")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    args = p.parse_args()
    result = run(args)
    print(json.dumps(result["median"], indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"http-protocol-cpu-{result['date']}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
