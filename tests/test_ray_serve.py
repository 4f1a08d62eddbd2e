"""`recon-run serve --ray`: the server's app as a Ray Serve deployment (local Ray, tiny bundle, 127.0.0.1 only).

Two replicas answer concurrent requests (each response names its replica in `X-Recon-Replica`),
with results equal to the in-process runtime (a Reconstructor with the server's bucket_frames), as
tests/test_server.py checks for the plain server. The CLI test runs `recon-run serve --ray` as a
process, waits for /readyz, sends one request and stops it with SIGTERM (exit 0).
"""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from .conftest import tone

MISSING = [
    m
    for m in ("ray", "fastapi", "uvicorn", "httpx", "prometheus_client", "multipart")
    if not importlib.util.find_spec(m)
]
if "ray" not in MISSING and importlib.util.find_spec("ray.serve") is None:
    MISSING.append("ray.serve")
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"Ray Serve tests need the `ray` and `serve` extras ({', '.join(MISSING)} missing)",
)

if not MISSING:
    import httpx

    from recon_runtime.serving.client import Client

    from .test_server import free_port, rel_l2, wav_bytes

RATE = 16000
REL = 1e-5
HEADER = "X-Recon-Replica"


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Any:
    from recon_runtime import Reconstructor
    from recon_runtime.serving.config import SERVER_BUCKET_FRAMES

    return Reconstructor.load(
        tiny_bundle, provider="cpu", precision="fp32", threads=1, bucket_frames=SERVER_BUCKET_FRAMES
    )


def wait_ready(url: str, proc: subprocess.Popen | None = None, log: Path | None = None, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"recon-run serve --ray exited with {proc.returncode}:\n{log.read_text() if log else ''}"
            )
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"not ready in {timeout} s:\n{log.read_text() if log else ''}")


# ---------------------------------------------------------------------- the CLI (its own local Ray, so first)
def test_serve_ray_cli_answers_and_exits_0_on_sigterm(tiny_bundle: Path, rec: Any, tmp_path: Path) -> None:
    import ray

    assert not ray.is_initialized()  # the command starts its own local Ray; the module's comes later
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve-ray.log"
    cmd = [str(Path(sys.executable).with_name("recon-run")), "serve", "--ray", "--replicas", "1"]
    cmd += ["--model", str(tiny_bundle), "--provider", "cpu", "--precision", "fp32", "--threads", "1"]
    cmd += ["--port", str(port), "--grace-s", "5"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url, proc, log, timeout=150)
        end = time.monotonic() + 30  # the proxy may route to the replica a moment before serve.run returns
        while f"on {url} with 1 replica" not in log.read_text() and time.monotonic() < end:
            time.sleep(0.2)
        assert f"on {url} with 1 replica" in log.read_text(), log.read_text()
        audio = tone(0.9, RATE, 311.0)
        with Client(url, timeout=60) as c:
            assert rel_l2(c.reconstruct(audio, RATE), rec.reconstruct(audio, RATE)) <= REL
            assert c.info()["fingerprint"] == rec.contract.fingerprint
        r = httpx.get(url + "/healthz", timeout=10)
        assert r.status_code == 200 and r.headers.get(HEADER)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()


def test_ray_options_need_ray_and_a_fixed_port(tiny_bundle: Path) -> None:
    from click.testing import CliRunner

    from recon_runtime.cli import main

    r = CliRunner().invoke(main, ["serve", "--model", str(tiny_bundle), "--replicas", "2"])
    assert r.exit_code == 2 and "--replicas need --ray" in r.output
    r = CliRunner().invoke(main, ["serve", "--ray", "--model", str(tiny_bundle), "--port", "0"])
    assert r.exit_code == 2 and "fixed --port" in r.output


# ---------------------------------------------------------------------- two replicas in this process's Ray
@pytest.fixture(scope="module")
def deployed(tiny_bundle: Path) -> Iterator[str]:
    import ray
    from ray import serve

    from recon_runtime.serving.config import ServerConfig
    from recon_runtime.serving.ray_serve import deploy

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        config = ServerConfig(model=str(tiny_bundle), provider="cpu", precision="fp32", threads=1, max_wait_ms=20)
        url = deploy(config, host="127.0.0.1", port=free_port(), replicas=2, cpus_per_replica=1, grace_s=5)
        yield url
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def test_two_replicas_answer_concurrent_requests_equal_to_the_in_process_runtime(deployed: str, rec: Any) -> None:
    # serve.run returned: every replica has loaded and warmed up its model, so /readyz is 200 at once
    r = httpx.get(deployed + "/readyz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ready"} and r.headers.get(HEADER)

    clips = [tone(0.5 + 0.07 * i, RATE, 180.0 + 37 * i) for i in range(12)]
    refs = [rec.reconstruct(clip, RATE) for clip in clips]
    seen: set[str] = set()
    started = time.monotonic()
    for _ in range(3):  # Ray's router spreads load between the replicas; a round of 12 almost always hits both
        barrier = threading.Barrier(len(clips))

        def one(clip: np.ndarray, barrier: threading.Barrier = barrier) -> tuple[np.ndarray, str]:
            barrier.wait(30)
            resp = httpx.post(deployed + "/v1/reconstruct", content=wav_bytes(clip), timeout=60)
            assert resp.status_code == 200, resp.text
            out, rate = sf.read(io.BytesIO(resp.content), dtype="float32")
            assert rate == RATE
            return out, resp.headers[HEADER]

        with ThreadPoolExecutor(len(clips)) as pool:
            results = list(pool.map(one, clips, timeout=120))
        for (out, replica), ref in zip(results, refs):
            assert rel_l2(out, ref) <= REL
            seen.add(replica)
        if len(seen) >= 2 or time.monotonic() - started > 60:
            break
    assert len(seen) == 2, seen

    # encode, decode and the streaming decode go through the proxy unchanged too
    audio = tone(2.3, 22050, 440.0)
    with Client(deployed, timeout=60) as c:
        z, meta = c.encode_with_info(audio, 22050)
        assert rel_l2(z, rec.encode(audio, 22050)) <= REL
        ref = rec.decode(z, num_samples=meta.num_samples) * np.float32(meta.gain)
        assert rel_l2(c.decode(z, num_samples=meta.num_samples, gain=meta.gain), ref) <= REL
        assert (
            rel_l2(np.concatenate(list(c.decode_stream(z, num_samples=meta.num_samples, gain=meta.gain))), ref) <= REL
        )


def test_errors_limits_and_metrics_are_the_plain_servers(deployed: str) -> None:
    r = httpx.post(deployed + "/v1/reconstruct", content=b"not audio at all", timeout=30)
    assert r.status_code == 400 and "error" in r.json() and r.headers.get(HEADER)
    r = httpx.get(deployed + "/nowhere", timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    info = httpx.get(deployed + "/v1/info", timeout=30).json()
    from recon_runtime.serving.config import SERVER_BUCKET_FRAMES

    assert info["bucket_frames"] == SERVER_BUCKET_FRAMES and info["limits"]["max_queue"] == 64
    assert info["limits"]["threads"] == 1
    r = httpx.get(deployed + "/metrics", timeout=30)  # the metrics of the replica that answered
    assert r.status_code == 200 and r.headers.get(HEADER)
    assert "recon_ready 1.0" in r.text and "# TYPE recon_requests_total counter" in r.text


def test_a_model_that_fails_to_load_fails_the_deployment_with_the_reason(
    deployed: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    """Last in the module: it replaces the deployment above (the same application name)."""
    import shutil

    from recon_runtime.errors import ReconError
    from recon_runtime.serving.config import ServerConfig
    from recon_runtime.serving.ray_serve import deploy

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    graph = broken / "encoder.fp32.onnx"
    graph.write_bytes(graph.read_bytes()[:100])  # recon.json's size check refuses it when the replica loads it
    config = ServerConfig(model=str(broken), provider="cpu", precision="fp32", threads=1)
    with pytest.raises(ReconError, match="the model did not load: .*encoder.fp32.onnx"):
        deploy(config, host="127.0.0.1", port=free_port(), replicas=1, cpus_per_replica=1, grace_s=1)
