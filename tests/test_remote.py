"""Remote file jobs: Retry-After parsing, the retry transport's bounds, the bounded runner, and a real busy server."""

from __future__ import annotations

import importlib.util
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from .conftest import tone

MISSING = [
    m for m in ("fastapi", "uvicorn", "httpx", "prometheus_client", "multipart") if not importlib.util.find_spec(m)
]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"remote jobs need the `serve` extra ({', '.join(MISSING)} missing)"
)

if not MISSING:
    import httpx

    from recon_runtime.serving.client import Client, ServerError
    from recon_runtime.serving.retry import (
        MAX_ATTEMPTS,
        MAX_TOTAL_WAIT_S,
        RetryPolicy,
        RetryTransport,
        retry_after_seconds,
        retrying_client,
        run_bounded,
    )

    from .test_server import Server, metric, wait_until, wav_bytes

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)


# ---------------------------------------------------------------------- Retry-After
@pytest.mark.parametrize(
    "value, seconds",
    [
        ("3", 3.0),
        (" 0 ", 0.0),
        (format_datetime(NOW + timedelta(seconds=7), usegmt=True), 7.0),
        (format_datetime(NOW - timedelta(seconds=7), usegmt=True), 0.0),  # a date past: now
        (None, None),
        ("", None),
        ("-1", None),
        ("1.5", None),
        ("soon", None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value, NOW) == seconds


def test_the_bounds_are_checked() -> None:
    assert RetryPolicy() == RetryPolicy(MAX_ATTEMPTS, MAX_TOTAL_WAIT_S)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="max_total_wait_s"):
        RetryPolicy(max_total_wait_s=float("inf"))


# ---------------------------------------------------------------------- the transport
class Scripted(httpx.BaseTransport):
    """Answers each request with the next (status, headers) of a script; records the bodies it got."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]):
        self.script = list(script)
        self.bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.read())
        status, headers = self.script.pop(0) if self.script else (200, {})
        return httpx.Response(status, headers=headers, json={"error": f"status {status}"})


def transport(script: list[tuple[int, dict[str, str]]], **policy: Any) -> tuple[RetryTransport, Scripted, list[float]]:
    inner = Scripted(script)
    slept: list[float] = []
    return RetryTransport(inner, RetryPolicy(jitter=0.0, **policy), sleep=slept.append), inner, slept


def test_a_refusal_is_sent_again_after_the_time_the_server_asks() -> None:
    t, inner, slept = transport([(503, {"Retry-After": "2"}), (429, {"Retry-After": "1"}), (503, {})])
    with httpx.Client(transport=t, base_url="http://x") as c:
        r = c.post("/v1/reconstruct", content=b"body")
    assert r.status_code == 200 and slept == [2.0, 1.0, 1.0]  # no header: DEFAULT_RETRY_AFTER_S
    assert inner.bodies == [b"body"] * 4 and t.retries == 3


def test_other_statuses_are_not_retried() -> None:
    for status in (200, 400, 413, 422, 500, 504):
        t, inner, slept = transport([(status, {"Retry-After": "1"})])
        with httpx.Client(transport=t, base_url="http://x") as c:
            assert c.post("/v1/encode", content=b"x").status_code == status
        assert slept == [] and len(inner.bodies) == 1


def test_the_attempts_bound_returns_the_last_refusal() -> None:
    t, inner, slept = transport([(503, {"Retry-After": "0"})] * 10, max_attempts=3)
    with httpx.Client(transport=t, base_url="http://x") as c:
        assert c.post("/v1/decode", content=b"x").status_code == 503
    assert len(inner.bodies) == 3 and slept == [0.0, 0.0]


def test_the_total_wait_bound_is_never_passed() -> None:
    t, inner, slept = transport([(503, {"Retry-After": "4"})] * 10, max_total_wait_s=10.0)
    with httpx.Client(transport=t, base_url="http://x") as c:
        assert c.post("/v1/decode", content=b"x").status_code == 503
    assert slept == [4.0, 4.0] and len(inner.bodies) == 3  # a third wait would make 12 s
    t, inner, slept = transport([(503, {"Retry-After": "3600"})], max_total_wait_s=10.0)
    with httpx.Client(transport=t, base_url="http://x") as c:
        assert c.post("/v1/decode", content=b"x").status_code == 503  # an hour asked: not waited for
    assert slept == []


def test_jitter_only_lengthens_the_wait() -> None:
    policy = RetryPolicy(jitter=0.5)
    waits = [policy.next_wait(503, "2", 1, 0.0) for _ in range(50)]
    assert all(w is not None and 2.0 <= w <= 3.0 for w in waits) and len(set(waits)) > 1


def test_a_body_that_cannot_be_sent_twice_is_not_retried() -> None:
    t, inner, slept = transport([(503, {"Retry-After": "1"})])
    with httpx.Client(transport=t, base_url="http://x") as c:
        r = c.post("/v1/reconstruct", content=iter([b"a", b"b"]))  # a generator: gone once sent
    assert r.status_code == 503 and slept == [] and inner.bodies == [b"ab"]


# ---------------------------------------------------------------------- the runner
def test_the_runner_keeps_at_most_n_in_flight_and_fills_every_slot() -> None:
    release = threading.Event()
    lock = threading.Lock()
    active, most = [0], [0]

    def work(i: int) -> int:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        release.wait(60)
        with lock:
            active[0] -= 1
        return i * i

    outcomes = run_bounded(range(10), work, concurrency=3)
    results: dict[int, Any] = {}
    first = threading.Thread(target=lambda: results.update({o.item: o.result for o in outcomes}))
    first.start()
    wait_until(lambda: active[0] == 3, 30, "the runner never had 3 items in flight")
    release.set()
    first.join(60)
    assert results == {i: i * i for i in range(10)} and most[0] == 3


def test_an_item_that_fails_fails_alone_and_items_are_read_lazily() -> None:
    taken: list[int] = []

    def items() -> Iterator[int]:
        for i in range(6):
            taken.append(i)
            yield i

    def work(i: int) -> int:
        if i == 2:
            raise ServerError(503, f"file {i}: HTTP 503: server busy")
        return i

    gen = run_bounded(items(), work, concurrency=2)
    outcomes = list(gen)
    assert sorted(o.item for o in outcomes) == list(range(6))
    failed = [o for o in outcomes if o.error is not None]
    assert [o.item for o in failed] == [2] and isinstance(failed[0].error, ServerError)
    assert all(o.result == o.item for o in outcomes if o.error is None)
    taken.clear()
    gen = run_bounded(items(), lambda i: i, concurrency=2)
    next(gen)
    gen.close()  # the caller stops early: the rest of the listing is never read
    assert len(taken) <= 3, taken
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        list(run_bounded([1], lambda i: i, concurrency=0))


# ---------------------------------------------------------------------- against a real busy server
class SlotHolder:
    """Holds the only slot of a `--max-queue 1` server: a request whose 15 MB answer it does not read
    (the server keeps the slot until its answer is sent). `release` reads it, so the slot comes back."""

    def __init__(self, server: Server):
        self.server = server
        clip = wav_bytes(tone(10.0, 8000), 8000, "PCM_16")
        head = (
            "POST /v1/reconstruct?output_rate=384000 HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
            f"Content-Length: {len(clip)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(60)
        self.sock.connect(("127.0.0.1", server.port))
        self.sock.sendall(head + clip)
        assert self.sock.recv(1, socket.MSG_PEEK)  # the answer has begun: the slot is taken
        assert metric(server.metrics(), "recon_requests_in_flight") == 1
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        while self.sock.recv(1 << 20):  # the whole answer; the server then closes the connection
            pass
        self.sock.close()
        wait_until(lambda: metric(self.server.metrics(), "recon_requests_in_flight") == 0, 60, "slot never freed")


@pytest.fixture
def busy(tiny_bundle: Path, tmp_path: Path) -> Iterator[Server]:
    s = Server(tiny_bundle, tmp_path, "--max-queue", "1", "--send-timeout-s", "300")
    try:
        yield s
    finally:
        assert s.stop() == 0, s.log.read_text()


def refused(server: Server) -> float:
    return metric(server.metrics(), "recon_requests_total", route="/v1/reconstruct", status="503")


def test_a_bulk_run_rides_out_a_busy_server_without_failing_a_file(busy: Server) -> None:
    clips = [wav_bytes(tone(0.4 + 0.1 * i, 16000, 300 + 50 * i)) for i in range(6)]
    with Client(busy.url, timeout=60) as plain:
        want = [plain.reconstruct(c) for c in clips]  # the server idle: each answered at once
    holder = SlotHolder(busy)
    with Client(busy.url, timeout=60) as plain, pytest.raises(ServerError) as e:
        plain.reconstruct(clips[0])  # without retries a file fails on the busy server
    assert e.value.status == 503
    client, retries = retrying_client(
        busy.url, concurrency=4, policy=RetryPolicy(max_attempts=100, max_total_wait_s=300)
    )
    outcomes: list[Any] = []
    runner = threading.Thread(
        target=lambda: outcomes.extend(run_bounded(range(6), lambda i: client.reconstruct(clips[i]), 4))
    )
    try:
        runner.start()
        wait_until(lambda: refused(busy) >= 5, 60, "the held slot never refused the run's files")
        assert (
            not outcomes
        )  # the plain try and the 4 files in flight were refused; every file waits for its retry, none failed
        holder.release()
        runner.join(300)
        assert not runner.is_alive()
    finally:
        holder.release()
        client.close()
    assert sorted(o.item for o in outcomes) == list(range(6))
    assert [o.error for o in outcomes] == [None] * 6
    for o in outcomes:
        np.testing.assert_array_equal(o.result, want[o.item])
    assert retries.retries >= 4


def test_only_the_file_that_exhausts_its_retries_fails(busy: Server) -> None:
    clips = [wav_bytes(tone(0.5)), wav_bytes(tone(0.6))]
    holder = SlotHolder(busy)
    client, _ = retrying_client(busy.url, concurrency=1, policy=RetryPolicy(max_attempts=2))

    def work(i: int) -> Any:
        try:
            return client.reconstruct(clips[i])
        except ServerError:
            holder.release()  # the first file gave up; the server is free for the second
            raise

    try:
        outcomes = {o.item: o for o in run_bounded(range(2), work, concurrency=1)}
    finally:
        holder.release()
        client.close()
    error = outcomes[0].error
    assert isinstance(error, ServerError) and error.status == 503
    assert "\n" not in str(error) and "/v1/reconstruct: HTTP 503: server busy" in str(error), str(error)
    assert outcomes[1].error is None and outcomes[1].result.shape == (round(0.6 * 16000),)
    assert refused(busy) == 2  # the first file's two tries (the second found the server free)


# ---------------------------------------------------------------------- the CLI against a real busy server
def remote_cli(server: Server, *args: str) -> subprocess.Popen:
    """`recon-run ... --server URL` in a subprocess, its stderr to a pipe (read once it exits)."""
    exe = str(Path(sys.executable).with_name("recon-run"))
    cmd = [exe, *args, "--server", server.url]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_bulk_cli_run_at_concurrency_4_finishes_every_file_on_a_server_busy_part_of_the_time(
    busy: Server, tiny_bundle: Path, tmp_path: Path
) -> None:
    from recon_runtime import Reconstructor

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(8):
        sf.write(str(folder / f"f{i}.wav"), tone(0.4 + 0.05 * i, 16000, 300 + 40 * i), 16000)
    holder = SlotHolder(busy)
    proc = remote_cli(busy, "reconstruct", str(folder), "-o", str(tmp_path / "out"), "--concurrency", "4")
    try:
        wait_until(lambda: refused(busy) >= 4, 120, "the held slot never refused the run's files")
        assert proc.poll() is None  # refused, waiting for its retries: no file failed the run
        holder.release()
        _, stderr = proc.communicate(timeout=300)
    finally:
        holder.release()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("reconstruct: 8 ok, 0 failed"), stderr
    retried = int(re.search(r"; (\d+) requests? sent again \(server busy\)$", lines[0]).group(1))
    assert retried >= 4 and refused(busy) >= retried
    rec = Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32", threads=1)
    for i in range(8):
        out, rate = sf.read(str(tmp_path / "out" / f"f{i}.wav"), dtype="float32")
        want = rec.reconstruct(*sf.read(str(folder / f"f{i}.wav"), dtype="float32"))
        assert rate == 16000 and out.shape == want.shape
        assert np.linalg.norm(out - want) <= 1e-5 * np.linalg.norm(want)


def test_the_file_that_exhausts_its_retries_fails_alone_in_the_cli(busy: Server, tmp_path: Path) -> None:
    for name, seconds in (("a", 0.5), ("b", 0.6)):
        sf.write(str(tmp_path / f"{name}.wav"), tone(seconds), 16000)
    holder = SlotHolder(busy)
    args = ["reconstruct", str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "-o", str(tmp_path / "out")]
    proc = remote_cli(busy, *args, "--concurrency", "1")
    try:  # a.wav goes first (one at a time) and is refused at each of its tries; then b.wav finds the slot free
        wait_until(lambda: refused(busy) >= MAX_ATTEMPTS, 120 + 60, "a.wav was not refused at each try")
        holder.release()
        _, stderr = proc.communicate(timeout=300)
    finally:
        holder.release()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    error, summary = stderr.splitlines()
    assert error.startswith(f"error: {tmp_path / 'a.wav'}: ") and "/v1/reconstruct: HTTP 503: server busy" in error
    assert summary.startswith("reconstruct: 1 ok, 1 failed") and "sent again (server busy)" in summary, stderr
    assert not (tmp_path / "out" / "a.wav").exists()  # no partial output
    assert sf.info(str(tmp_path / "out" / "b.wav")).frames == round(0.6 * 16000)
    assert "Traceback" not in stderr
