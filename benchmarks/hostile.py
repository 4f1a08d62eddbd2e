"""`recon-run serve` against the clients of docs/serving.md's "Slow and hostile clients", bounded, on loopback.

Each part starts a fresh `recon-run serve` (the given bundle, CPU fp32, defaults unless said) and
records what a user of the server sees:

- `answer`: a FLAC of `--answer-seconds` at 8 kHz, asked back at each of `--rates`: the status, the
  size of the answer, and the server process's peak RSS (VmHWM) after it. `--max-response-mb` is
  passed to these servers when given (to measure what the default refuses).
- `heads`: `--heads` sockets that send `POST /v1/reconstruct` with `Content-Length: 100000` and no
  body, each replaced when the server closes it, while one client sends `--normal` short
  reconstructs one after the other: each one's status and seconds.
- `unread`: a client that never reads a 15 MB answer (10 s asked back at 384 kHz, its receive
  buffer 4 KiB): how long until the server frees the request (`recon_requests_in_flight` back to
  0), and how much of the answer reached the client's socket by then.

    python -m benchmarks.hostile --model /tmp/tiny --out benchmarks/results

Options the server does not know (an older build) are left out with `--old`, to compare builds.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: argparse.Namespace, *extra: str):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(Path(sys.executable).with_name("recon-run")), "serve", "--model", str(args.model)]
        cmd += ["--provider", "cpu", "--precision", "fp32", "--port", str(self.port), *extra]
        self.log = open(Path(args.out) / f"hostile-server-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("server not ready in 300 s")

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def encoded(seconds: float, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, rate), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def answer_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    import httpx

    flac = encoded(args.answer_seconds, 8000, "FLAC")
    rows = []
    for rate in args.rates:
        extra = [] if args.max_response_mb is None else ["--max-response-mb", str(args.max_response_mb)]
        server = Server(args, "--max-seconds", str(args.answer_seconds), *extra)
        try:
            base = server.peak_rss_mb()
            t0 = time.perf_counter()
            r = httpx.post(server.url + "/v1/reconstruct", params={"output_rate": rate}, content=flac, timeout=600)
            row = {
                "output_rate": rate,
                "upload_bytes": len(flac),
                "status": r.status_code,
                "answer_bytes": len(r.content),
                "seconds": round(time.perf_counter() - t0, 2),
                "server_peak_rss_mb_before": base,
                "server_peak_rss_mb": server.peak_rss_mb(),
            }
        finally:
            server.stop()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def heads_part(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    head = b"POST /v1/reconstruct HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: 100000\r\n\r\n"
    server = Server(args)
    stop = threading.Event()
    opened = [0]

    def attack() -> None:
        socks: list[socket.socket | None] = [None] * args.heads
        end = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < end:
            for i, sock in enumerate(socks):
                if sock is not None:
                    try:
                        sock.setblocking(False)
                        if sock.recv(65536) != b"":
                            continue  # its answer: the server closes it next
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    sock.close()
                try:
                    socks[i] = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                    socks[i].sendall(head)  # type: ignore[union-attr]
                    opened[0] += 1
                except OSError:
                    socks[i] = None
            stop.wait(0.1)
        for sock in socks:
            if sock is not None:
                sock.close()

    wav = io.BytesIO()
    sf.write(wav, tone(0.3, 16000), 16000, format="WAV", subtype="FLOAT")
    attacker = threading.Thread(target=attack, daemon=True)
    results = []
    try:
        attacker.start()
        time.sleep(2.0)  # the attack under way (its sockets connected and their heads sent)
        for _ in range(args.normal):
            t0 = time.perf_counter()
            r = httpx.post(server.url + "/v1/reconstruct", content=wav.getvalue(), timeout=120)
            results.append({"status": r.status_code, "seconds": round(time.perf_counter() - t0, 2)})
            print(json.dumps(results[-1]), flush=True)
    finally:
        stop.set()
        attacker.join(30)
        server.stop()
    return {"head_only_sockets": args.heads, "connections_opened": opened[0], "normal_requests": results}


def unread_part(args: argparse.Namespace) -> dict[str, Any]:
    extra = [] if args.old else ["--send-timeout-s", str(args.send_timeout_s)]
    server = Server(args, *extra)
    clip = encoded(10.0, 8000, "WAV")
    head = (
        "POST /v1/reconstruct?output_rate=384000 HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: {len(clip)}\r\n\r\n"
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(120)
    try:
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(head + clip)
        sock.recv(1, socket.MSG_PEEK)
        begun = time.monotonic()
        held_at_start = server.metric("recon_requests_in_flight")
        freed = None
        while time.monotonic() - begun < args.unread_wait_s:
            if server.metric("recon_requests_in_flight") == 0:
                freed = round(time.monotonic() - begun, 2)
                break
            time.sleep(0.1)
        peak = server.peak_rss_mb()
        got = 0
        try:
            while part := sock.recv(1 << 20):  # what the server still holds for it comes now
                got += len(part)
        except (ConnectionResetError, TimeoutError):
            pass
    finally:
        sock.close()
        server.stop()
    row = {
        "answer_bytes": 10 * 384000 * 4,
        "in_flight_when_the_answer_began": held_at_start,
        "freed_after_s": freed,
        "waited_up_to_s": args.unread_wait_s,
        "bytes_the_client_could_read": got,
        "server_peak_rss_mb": peak,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--parts", default="answer,heads,unread")
    p.add_argument("--answer-seconds", type=float, default=600.0)
    p.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[48000, 384000])
    p.add_argument("--max-response-mb", type=float, default=None)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--normal", type=int, default=12)
    p.add_argument("--send-timeout-s", type=float, default=30.0)
    p.add_argument("--unread-wait-s", type=float, default=60.0)
    p.add_argument("--old", action="store_true", help="leave out the options an older server lacks")
    p.add_argument("--out", default="/tmp/recon-hostile")
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": describe(), "args": vars(args)}
    parts = args.parts.split(",")
    if "answer" in parts:
        result["answer"] = answer_part(args)
    if "heads" in parts:
        result["heads"] = heads_part(args)
    if "unread" in parts:
        result["unread"] = unread_part(args)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["date"] = date.today().isoformat()
    path = Path(args.out) / f"{args.tag or 'hostile-' + result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
