"""`recon-run serve` as a real uvicorn server on a free 127.0.0.1 port with the tiny bundle.

Every endpoint's output equals the in-process runtime (the default Reconstructor, as the server's
default is the runtime's; `--bucket-frames N` equals `bucket_frames=N`); concurrent requests share batches; bad input gets its status and JSON error; queue
limits, timeouts, the API key, SIGTERM draining, readiness and streaming are checked for real.
"""

from __future__ import annotations

import importlib.util
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
    bool(MISSING), reason=f"server tests need the `serve` extra ({', '.join(MISSING)} missing)"
)

if not MISSING:
    import httpx

    from recon_runtime.serving.client import Client, ServerError

KEY_VAR = "RECON_TEST_API_KEY"
KEY = "test-key-5c1e2a"
RATE = 16000
REL = 1e-5
DRAIN_REFUSAL_S = 10.0  # after SIGTERM the listener must close well within this (the drain takes longer)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_bytes(audio: np.ndarray, rate: int = RATE, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, subtype=subtype, format="WAV")
    return buf.getvalue()


def wav_with_rate(wav: bytes, rate: int) -> bytes:
    """The WAV with its header's sample rate (and byte rate) patched, as a hostile client could send it."""
    import struct

    assert wav[12:16] == b"fmt "
    block_align = struct.unpack("<H", wav[32:34])[0]
    return wav[:24] + struct.pack("<II", rate, (rate * block_align) % 2**32) + wav[32:]


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_claiming(shape: tuple[int, ...], data: int = 2000, dtype: str = "<f4") -> bytes:
    """A .npy header that declares `shape`, followed by `data` zero bytes (whatever the header says)."""
    from numpy.lib import format as npy_format

    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * data


class Server:
    """A `recon-run serve` process; its log goes to a file (never a full pipe)."""

    def __init__(self, bundle: Path, tmp: Path, *args: str, api_key: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        env = {**os.environ, KEY_VAR: KEY}
        cmd = [str(Path(sys.executable).with_name("recon-run")), "serve", "--model", str(bundle)]
        cmd += ["--provider", "cpu", "--precision", "fp32", "--threads", "1", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key-env", KEY_VAR]
        self.headers = {"Authorization": f"Bearer {KEY}"} if api_key else {}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/readyz", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log.read_text()}")

    def client(self) -> Client:
        return Client(self.url, api_key=KEY if self.headers else None, timeout=60)

    def post(self, path: str, body: bytes, **kw: Any) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return httpx.post(self.url + path, content=body, headers=headers, timeout=60, **kw)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Any:
    from recon_runtime import Reconstructor

    return Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32", threads=1)  # the runtime's defaults


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(
        tiny_bundle,
        tmp_path_factory.mktemp("srv"),
        "--max-wait-ms", "40", "--max-body-mb", "2", "--max-seconds", "120", "--max-decoded-mb", "8",
        "--max-batch", "8",  # above the CPU's default of 1, so that concurrent requests share batches
        api_key=True,
    )  # fmt: skip
    yield s
    assert s.stop() == 0, s.log.read_text()


# ---------------------------------------------------------------------- results equal the runtime's
def test_every_endpoint_equals_the_in_process_runtime(server: Server, rec: Any, tmp_path: Path) -> None:
    audio = tone(3.3, 22050, 330.0) + 0.05 * np.random.default_rng(0).standard_normal(round(3.3 * 22050)).astype(
        np.float32
    )
    with server.client() as c:
        info = c.info()
        assert info["fingerprint"] == rec.contract.fingerprint
        weights = "random" if rec.contract.random_weights else "trained"
        assert (info["weights"], info["provider"], info["precision"]) == (weights, "cpu", "fp32")
        assert info["bucket_frames"] == rec.bucket_frames == 4 and info["limits"]["max_batch"] == 8
        assert "api_key" not in json.dumps(info["limits"]) and KEY not in json.dumps(info)

        out = c.reconstruct(audio, 22050)
        assert out.shape == (round(3.3 * RATE),)
        assert rel_l2(out, rec.reconstruct(audio, 22050)) <= REL
        out48 = c.reconstruct(audio, 22050, output_rate=48000)
        assert rel_l2(out48, rec.reconstruct(audio, 22050, output_rate=48000)) <= REL
        stereo = np.stack([audio, np.roll(audio, 100) * 0.5], axis=1)  # mixed down while it is read
        assert rel_l2(c.reconstruct(stereo, 22050), rec.reconstruct(stereo, 22050)) <= REL
        short = tone(0.3, RATE, 700.0)  # one short window: no extra padding, so encode equals too
        assert rel_l2(c.encode(short, RATE), rec.encode(short, RATE)) <= REL

        z, meta = c.encode_with_info(audio, 22050)
        assert rel_l2(z, rec.encode(audio, 22050)) <= REL
        feats = rec.features(audio, 22050)
        assert (meta.num_samples, meta.input_sample_rate, meta.sampled) == (feats.num_samples, 22050, False)
        assert meta.gain == pytest.approx(feats.gain, rel=1e-7) and meta.fingerprint == rec.contract.fingerprint
        zs, meta_s = c.encode_with_info(audio, 22050, sample=True, seed=11)
        assert meta_s.seed == 11 and meta_s.sampled
        assert rel_l2(zs, rec.encode(audio, 22050, sample=True, seed=11)) <= REL

        long_z = rec.encode(np.tile(audio, 4), 22050)  # 13.2 s: two windows
        ref = rec.decode(long_z, num_samples=300_000) * np.float32(meta.gain)
        dec = c.decode(long_z, num_samples=300_000, gain=meta.gain, fingerprint=meta.fingerprint)
        assert rel_l2(dec, ref) <= REL
        parts = list(c.decode_stream(long_z, num_samples=300_000, gain=meta.gain))
        assert len(parts) >= 2 and rel_l2(np.concatenate(parts), ref) <= REL
        assert ref.size == long_z.shape[1] * 640 + 32  # asked past the latents: the vocoder's last samples too
        short_z = rec.encode(short, RATE)  # the same in one window
        one = rec.decode(short_z, num_samples=short_z.shape[1] * 640 + 100)
        assert one.size == short_z.shape[1] * 640 + 32
        assert rel_l2(c.decode(short_z, num_samples=one.size + 68, fingerprint=meta.fingerprint), one) <= REL
        assert rel_l2(np.concatenate(list(c.decode_stream(short_z, num_samples=one.size + 68))), one) <= REL

    # a multipart upload and a PCM16 answer, as curl -F file=@x.wav sends it
    r = httpx.post(
        server.url + "/v1/reconstruct",
        params={"subtype": "pcm16"},
        files={"file": ("in.wav", wav_bytes(audio, 22050), "audio/wav")},
        headers=server.headers,
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert sf.info(io.BytesIO(r.content)).subtype == "PCM_16"
    pcm, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == RATE and np.abs(pcm - np.clip(rec.reconstruct(audio, 22050), -1, 1)).max() <= 2 / 32768

    docs = httpx.get(server.url + "/docs", headers=server.headers, timeout=10)
    spec = httpx.get(server.url + "/openapi.json", headers=server.headers, timeout=10).json()
    assert docs.status_code == 200 and {"/v1/reconstruct", "/v1/encode", "/v1/decode"} <= set(spec["paths"])


def test_cli_jobs_run_against_the_server(server: Server, rec: Any, tmp_path: Path) -> None:
    src = tmp_path / "in.flac"
    audio = tone(2.1, 44100, 523.0)
    sf.write(str(src), audio, 44100)
    exe = str(Path(sys.executable).with_name("recon-run"))
    env = {**os.environ, KEY_VAR: KEY}
    common = ["--server", server.url, "--api-key-env", KEY_VAR]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *args, *common], capture_output=True, text=True, env=env, timeout=120)

    r = run("reconstruct", str(src), "-o", str(tmp_path / "rec.wav"))
    assert r.returncode == 0, r.stderr
    out, rate = sf.read(str(tmp_path / "rec.wav"), dtype="float32")
    assert rate == RATE and rel_l2(out, rec.reconstruct(*sf.read(str(src), dtype="float32"))) <= REL

    import dataclasses

    from recon_runtime.files.encoded import EncodedAudio

    r = run("encode", str(src), "-o", str(tmp_path / "z.safetensors"))  # the encoded-audio file, as locally
    assert r.returncode == 0, r.stderr
    clip = EncodedAudio.load(tmp_path / "z.safetensors")
    feats = rec.features(*sf.read(str(src), dtype="float32"))
    assert clip.num_samples == feats.num_samples and clip.bundle_fingerprint == rec.contract.fingerprint
    assert clip.input_sample_rate == 44100 and clip.gain[0] == pytest.approx(feats.gain, rel=1e-7)
    z = clip.latents[0]
    assert rel_l2(z, rec.encode(*sf.read(str(src), dtype="float32"))) <= REL  # the latents a local encode writes

    r = run("decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "dec.wav"))
    assert r.returncode == 0, r.stderr
    dec, _ = sf.read(str(tmp_path / "dec.wav"), dtype="float32")
    assert rel_l2(dec, rec.decode(z, num_samples=clip.num_samples) * np.float32(clip.gain[0])) <= REL

    other = dataclasses.replace(clip, bundle_fingerprint="0123456789abcdef")  # latents from another model
    other.save(tmp_path / "other.safetensors")
    r = run("decode", str(tmp_path / "other.safetensors"), "-o", str(tmp_path / "dec2.wav"))
    assert r.returncode == 1 and "another model" in r.stderr and "Traceback" not in r.stderr


def test_cli_with_server_pins_the_digest_and_prints_no_http_log(
    server: Server, tiny_bundle: Path, tmp_path: Path
) -> None:
    """--expect-digest with --server is compared with /v1/info before any file runs; httpx's own
    INFO line per request ("HTTP Request: POST ...") is not the CLI's output."""
    from recon_runtime.contract import read_contract

    src = tmp_path / "in.wav"
    sf.write(str(src), tone(0.6, RATE), RATE)
    z = tmp_path / "z0.npy"
    np.save(z, np.zeros((8, 16, 16), np.float32))
    exe = str(Path(sys.executable).with_name("recon-run"))
    env = {**os.environ, KEY_VAR: KEY}
    digest = read_contract(tiny_bundle).digest
    wrong = "0" * len(digest)

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [exe, *args, "--server", server.url, "--api-key-env", KEY_VAR]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    refusal = (
        f"error: {server.url}: the server's bundle digest is {digest}, expected {wrong} (--expect-digest); "
        "this is not the bundle you pinned"
    )
    out = tmp_path / "out"
    for command, given in (("reconstruct", src), ("encode", src), ("decode", z)):
        r = run(command, str(given), "-o", str(out / command), "--expect-digest", wrong)
        assert (r.returncode, r.stderr.splitlines()) == (1, [refusal]), r.stderr
    assert not out.exists()  # refused before any file ran

    r = run("encode", str(src), "-o", str(tmp_path / "z.safetensors"), "--expect-digest", digest)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.glob("z.*")) == ["z.safetensors"]  # one file, no sidecar
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("encode: 1 ok, 0 failed"), r.stderr


# ---------------------------------------------------------------------- the encoded-audio file
def same_facts(got: Any, want: Any) -> None:
    """Two encoded clips agree on every field (the server's has no source; gains to float32 rounding)."""
    from recon_runtime.files.encoded import GAIN, SOURCE

    a, b = got.fields(), want.fields()
    assert a[SOURCE] is None and a.pop(GAIN) == pytest.approx(b.pop(GAIN), rel=1e-7)
    assert {**a, SOURCE: b[SOURCE]} == b


def test_the_encoded_file_round_trip_equals_the_in_process_runtime(server: Server, rec: Any) -> None:
    from recon_runtime.channels import decode_audio, encode_audio
    from recon_runtime.files.encoded import ENCODED_MEDIA_TYPE

    audio = tone(3.3, 22050, 330.0) + 0.05 * np.random.default_rng(1).standard_normal(round(3.3 * 22050)).astype(
        np.float32
    )
    stereo = np.stack([audio, 0.2 * np.roll(audio, 500)], axis=1)
    with server.client() as c:
        clip = c.encode_file(audio, 22050)
        want = encode_audio(rec, audio, 22050)
        same_facts(clip, want)
        assert rel_l2(clip.latents, want.latents) <= REL
        assert rel_l2(c.decode_file(clip), decode_audio(rec, want)) <= REL  # the input's length and level
        drawn = c.encode_file(audio, 22050, sample=True, seed=5)
        want = encode_audio(rec, audio, 22050, sample=True, seed=5)
        same_facts(drawn, want)
        assert rel_l2(drawn.latents, want.latents) <= REL
        mixed = c.encode_file(stereo, 22050)  # the server mixes, as its .npy answer does
        same_facts(mixed, encode_audio(rec, stereo, 22050))
        assert (mixed.channels, mixed.input_channels) == (1, 2)
        each = encode_audio(rec, stereo, 22050, mode="each")  # a file of `encode --channels each`
        two = c.decode_file(each)
        assert two.shape == (each.num_samples, 2) and rel_l2(two, decode_audio(rec, each)) <= REL
        z, info = c.encode_with_info(audio, 22050)  # the default answer is today's .npy and headers
        assert rel_l2(z, clip.latents[0]) <= REL and info.num_samples == clip.num_samples
        r = server.post("/v1/encode", wav_bytes(audio, 22050))
        assert r.headers["content-type"] == "application/x-npy" and r.headers["X-Recon-Input-Channels"] == "1"
        assert r.headers["X-Recon-Latent-Shape"] == ",".join(map(str, z.shape)) and "X-Recon-Source" not in r.headers
        r = server.post("/v1/encode", wav_bytes(audio, 22050), headers={"Accept": f"{ENCODED_MEDIA_TYPE};q=0"})
        assert r.headers["content-type"] == "application/x-npy"  # refused by its q: the .npy


def test_a_stdlib_client_reads_the_encoded_answer_and_sends_it_back(server: Server, rec: Any) -> None:
    """urllib as a user's script would: the encoded file by Accept or by ?format=encoded, and back to
    /v1/decode with its content type, or with none of ours (as curl --data-binary sends it)."""
    import urllib.request

    from recon_runtime.channels import decode_audio
    from recon_runtime.files.encoded import ENCODED_MEDIA_TYPE, EncodedAudio

    audio = tone(1.7, RATE, 523.0)
    body = wav_bytes(audio)

    def post(path: str, data: bytes, headers: dict[str, str]) -> tuple[str, bytes]:
        request = urllib.request.Request(server.url + path, data=data, headers={**server.headers, **headers})
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.headers["Content-Type"], r.read()

    kind, data = post("/v1/encode", body, {"Accept": f"audio/wav, {ENCODED_MEDIA_TYPE}", "Content-Type": "audio/wav"})
    assert kind == ENCODED_MEDIA_TYPE
    clip = EncodedAudio.from_bytes(data)
    kind, again = post("/v1/encode?format=encoded", body, {"Content-Type": "audio/wav"})
    assert kind == ENCODED_MEDIA_TYPE and EncodedAudio.from_bytes(again).fields() == clip.fields()
    kind, npy = post("/v1/encode", body, {"Content-Type": "audio/wav"})  # no Accept: the .npy as before
    assert kind == "application/x-npy" and np.array_equal(np.load(io.BytesIO(npy)), clip.latents[0])
    want = decode_audio(rec, clip)
    for headers in ({"Content-Type": ENCODED_MEDIA_TYPE}, {}):  # urllib's default: x-www-form-urlencoded
        kind, wav = post("/v1/decode", data, headers)
        out, rate = sf.read(io.BytesIO(wav), dtype="float32")
        assert kind == "audio/wav" and rate == RATE and out.shape == audio.shape and rel_l2(out, want) <= REL


def test_a_bad_encoded_upload_gets_its_status_and_one_line(server: Server, rec: Any) -> None:
    from dataclasses import replace

    from recon_runtime.channels import encode_audio
    from recon_runtime.files.encoded import ENCODED_MEDIA_TYPE

    from .test_encoded import rewrite

    clip = encode_audio(rec, tone(0.9), RATE)
    stereo = encode_audio(rec, np.stack([tone(0.9), tone(0.9, freq=220.0)], axis=1), RATE, mode="each")
    data = clip.to_bytes()
    flipped = bytearray(data)
    flipped[-7] ^= 0x40  # a bit of the latents
    kind = {"Content-Type": ENCODED_MEDIA_TYPE}
    cases = [
        (replace(clip, bundle_fingerprint="0123456789abcdef").to_bytes(), {}, kind, 422, "another model"),
        (data, {}, {**kind, "X-Recon-Bundle-Fingerprint": "0123456789abcdef"}, 422, "another model"),
        (bytes(flipped), {}, kind, 400, "do not match the SHA-256"),
        (data[:-10], {}, kind, 400, "uploaded encoded audio: "),
        (data[:5], {}, kind, 400, "not an encoded-audio file"),
        (rewrite(data, format_version="2"), {}, kind, 400, "format version 2; this build reads version 1"),
        (rewrite(data, format_version="2"), {"stream": "true"}, kind, 400, "this build reads version 1"),
        (npy_bytes(clip.latents[0]), {}, kind, 400, "not an encoded-audio file"),  # a .npy said to be one
        (replace(clip, sample_rate=22050).to_bytes(), {}, kind, 422, "22050 Hz"),
        (data, {"num_samples": "100"}, kind, 400, "drop num_samples from the query"),
        (data, {"gain": "2", "stream": "true"}, {}, 400, "drop gain from the query"),
        (stereo.to_bytes(), {"stream": "true"}, kind, 422, "this file has 2"),
    ]
    for body, params, headers, status, text in cases:
        r = server.post("/v1/decode", body, params=params, headers=headers)
        assert r.status_code == status, (params, text, r.status_code, r.text)
        error = r.json()["error"]
        assert text in error and "\n" not in error and "Traceback" not in r.text, error
    parts = b"".join(server.post("/v1/decode", data, params={"stream": "true"}, headers=kind).iter_bytes())
    with server.client() as c:
        want = c.decode_file(clip)  # one channel streams at its recorded length and level
    np.testing.assert_allclose(np.frombuffer(parts, "<f4"), want, rtol=0, atol=1e-6)
    assert 'status="500"' not in server.metrics()


@pytest.fixture(scope="module")
def patient_server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose batcher waits up to 3 s for a batch to fill: on a busy machine 16 clients'
    requests reach it spread over hundreds of ms, more than a default 10-40 ms window."""
    s = Server(tiny_bundle, tmp_path_factory.mktemp("patient"), "--max-wait-ms", "3000", "--max-batch", "8")
    yield s
    assert s.stop() == 0, s.log.read_text()


def test_sixteen_concurrent_requests_share_batches_and_stay_unchanged(patient_server: Server, rec: Any) -> None:
    server = patient_server
    before = server.metrics()
    clips = [tone(0.5, RATE, 200.0 + 40 * i) for i in range(16)]  # one length: one window shape
    barrier = threading.Barrier(16)

    def one(clip: np.ndarray) -> np.ndarray:
        with server.client() as c:
            barrier.wait(30)
            return c.reconstruct(clip, RATE)

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, clips, timeout=120))
    for clip, out in zip(clips, outs):
        assert rel_l2(out, rec.reconstruct(clip, RATE)) <= REL
    after = server.metrics()
    stages = "encoder+decoder+vocoder"
    runs = metric(after, "recon_batch_size_count", stages=stages) - metric(
        before, "recon_batch_size_count", stages=stages
    )
    windows = metric(after, "recon_batch_size_sum", stages=stages) - metric(
        before, "recon_batch_size_sum", stages=stages
    )
    singles = metric(after, "recon_batch_size_bucket", stages=stages, le="1.0") - metric(
        before, "recon_batch_size_bucket", stages=stages, le="1.0"
    )
    assert windows == 16
    assert runs < 16 and singles < runs, f"no batch of more than one window: {runs} runs, {singles} of size 1"
    ok = metric(after, "recon_requests_total", route="/v1/reconstruct", status="200")
    assert ok - metric(before, "recon_requests_total", route="/v1/reconstruct", status="200") == 16
    assert metric(after, "recon_audio_seconds_total", route="/v1/reconstruct") > 0
    assert "recon_queue_depth" in after and "recon_request_seconds_bucket" in after


def test_bad_input_gets_its_status_and_the_next_request_works(server: Server, rec: Any) -> None:
    good = tone(0.7)
    zeros = wav_bytes(np.zeros(0, np.float32))
    nan = wav_bytes(np.array([0.1, np.nan, 0.2] * 100, np.float32))
    z = rec.encode(good, RATE)
    too_long = wav_bytes(np.zeros(121 * 4000, np.int16), 4000, "PCM_16")  # 121 s at 4 kHz, under the 2 MB body limit
    flac = io.BytesIO()
    sf.write(flac, np.zeros((300_000, 8), np.int16), 48000, format="FLAC", subtype="PCM_16")
    silent_flac = flac.getvalue()  # 6.25 s, 8 channels: 9.2 MiB of float32 samples from a few KiB
    assert len(silent_flac) < 200_000
    cases = [
        ("/v1/reconstruct", b"this is not audio", {}, {}, 400),
        ("/v1/reconstruct", b"", {}, {}, 400),
        ("/v1/reconstruct", zeros, {}, {}, 400),
        ("/v1/reconstruct", nan, {}, {}, 400),
        ("/v1/encode", b"RIFF\x00\x00", {}, {}, 400),
        ("/v1/reconstruct", too_long, {}, {}, 413),
        ("/v1/reconstruct", wav_bytes(good), {"output_rate": "12"}, {}, 422),
        ("/v1/reconstruct", wav_bytes(good), {"subtype": "mp3"}, {}, 422),
        ("/v1/decode", b"not an npy", {}, {}, 400),
        ("/v1/decode", npy_bytes(z[:, :, :8]), {}, {}, 422),
        ("/v1/decode", npy_bytes(z[None]), {}, {}, 422),
        ("/v1/decode", npy_bytes(z.astype(np.int32)), {}, {}, 422),
        ("/v1/decode", npy_bytes(np.full_like(z, np.nan)), {}, {}, 400),
        ("/v1/decode", npy_bytes(z), {}, {"X-Recon-Bundle-Fingerprint": "0123456789abcdef"}, 422),
        ("/v1/decode", npy_bytes(z), {"stream": "true"}, {"X-Recon-Bundle-Fingerprint": "ffff"}, 422),
        ("/v1/decode", npy_bytes(z), {"gain": "nan"}, {}, 422),
        ("/v1/decode", npy_bytes(z), {"gain": "1e39"}, {}, 422),
        ("/v1/decode", npy_bytes(z), {"gain": "-1"}, {}, 422),
        ("/v1/decode", npy_bytes(z.astype(np.float64) * 1e300), {}, {}, 400),  # inf as float32
        ("/v1/reconstruct", wav_with_rate(wav_bytes(good), 2**31 - 1), {}, {}, 400),
        ("/v1/reconstruct", wav_with_rate(wav_bytes(good), 0), {}, {}, 400),
        ("/v1/reconstruct", wav_bytes(np.full(1, 0.5, np.float32), 384000), {}, {}, 400),  # under one sample
        ("/v1/reconstruct", wav_bytes(np.zeros((100, 9), np.float32)), {}, {}, 400),  # 9 channels
        ("/v1/reconstruct", silent_flac, {}, {}, 413),  # a small file that decodes past --max-decoded-mb
        ("/v1/decode", npy_bytes(np.zeros((8, 3001, 16), np.float16)), {}, {}, 413),  # 120.04 s of latents
        ("/v1/decode", np.array([1, 2]).tobytes(), {}, {"content-type": "multipart/form-data; boundary=x"}, 400),
        # .npy headers that lie: refused from the header, before anything is allocated (47.7 GiB, 15 GB before)
        ("/v1/decode", npy_claiming((8, 100_000_000, 16)), {}, {}, 413),
        ("/v1/decode", npy_claiming((8, 30_000_000, 16)), {"stream": "true"}, {}, 413),
        ("/v1/decode", npy_claiming((8, 100, 16)), {}, {}, 400),  # declares 51200 bytes, 2000 follow
        ("/v1/decode", npy_claiming((8, 10, 16), data=5121), {}, {}, 400),  # one byte more than declared
        ("/v1/decode", npy_claiming((8, 10, 16), data=8 * 10 * 16 * 8, dtype="|O"), {}, {}, 400),  # objects
        ("/v1/decode", npy_claiming((8, 10, 16), data=8 * 10 * 16 * 8, dtype=">f8"), {}, {}, 200),  # big-endian
        ("/v1/decode", npy_claiming((8, 2000, 16), data=0, dtype="<f4")[:60], {}, {}, 400),  # truncated header
    ]
    with server.client() as c:
        for path, body, params, headers, status in cases:
            r = server.post(path, body, params=params, headers=headers)
            assert r.status_code == status, (path, params, r.status_code, r.text)
            assert "--precision" not in r.text, r.text  # never advice meant for the server's operator
            if status == 200:
                continue
            assert r.headers["content-type"].startswith("application/json"), r.headers
            assert r.json()["error"] and "Traceback" not in r.text and "/tmp" not in r.text, r.text
            out = c.reconstruct(good, RATE)  # the server serves the next request normally
            assert rel_l2(out, rec.reconstruct(good, RATE)) <= REL
    r = httpx.get(server.url + "/v1/nothing-here", headers=server.headers, timeout=10)
    assert r.status_code == 404 and r.json()["error"]
    r = httpx.get(server.url + "/v1/reconstruct", headers=server.headers, timeout=10)
    assert r.status_code == 405
    assert 'status="500"' not in server.metrics()


def test_values_that_overflow_the_graphs_are_the_clients_422_without_advice_to_an_fp32_server(
    server: Server, rec: Any
) -> None:
    huge = npy_bytes(np.full((8, 100, 16), 3e38, np.float32))  # finite, but no graph can carry it
    for params in ({}, {"stream": "true"}):
        r = server.post("/v1/decode", huge, params=params)
        assert r.status_code == 422, (params, r.status_code, r.text)
        assert "3e+38" in r.json()["error"] and "--precision" not in r.text, r.text
    signs = np.sign(np.random.default_rng(0).standard_normal(22050)).astype(np.float32)
    loud = wav_bytes(signs * np.float32(3.4e38), 22050)  # overflowed the resampler into NaN features (500)
    r = server.post("/v1/encode", loud)
    assert r.status_code == 200, r.text  # prepared as the same signal at a lower level
    r = server.post("/v1/reconstruct", loud)  # at the input's level the answer is past float32's range
    assert r.status_code == 422 and "float32" in r.json()["error"], r.text
    # a stream whose later window overflows: aborted after its 200, recorded as the client's 422
    z = rec.encode(tone(30.0, RATE, 250.0), RATE)
    z[:, -40:] = 3e38
    before = metric(server.metrics(), "recon_requests_total", route="/v1/decode", status="422")
    with pytest.raises(httpx.HTTPError):
        with httpx.stream(
            "POST", server.url + "/v1/decode", params={"stream": "true"}, content=npy_bytes(z),
            headers=server.headers, timeout=60,
        ) as r:  # fmt: skip
            assert r.status_code == 200
            for _ in r.iter_raw():
                pass
    m = wait_for_metric(
        server.url, "recon_requests_total", before + 1, headers=server.headers, route="/v1/decode", status="422"
    )
    assert metric(m, "recon_requests_total", route="/v1/decode", status="422") == before + 1
    assert 'status="500"' not in server.metrics()


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it (or `timeout`)."""
    return exchange(port, data, timeout)[0]


def exchange(port: int, data: bytes, timeout: float) -> tuple[bytes, bool]:
    """Send `data` on a fresh connection and read until the server closes it or `timeout` passes:
    what came, and whether the server closed (or reset) the connection within `timeout`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                return got, True
            except TimeoutError:
                break
            if not part:
                return got, True
            got += part
        return got, False


def bound(configured_s: float) -> float:
    """How long a test waits for what a server does after `configured_s`: generous on a busy machine."""
    return 4 * configured_s + 30


def test_an_oversized_body_with_expect_100_continue_is_refused_from_its_header_without_reading_it(
    server: Server,
) -> None:
    head = (
        b"POST /v1/reconstruct HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nExpect: 100-continue\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {5 * 2**20}\r\n\r\n".encode()
    )
    from recon_runtime.serving.edge import REFUSED_BODY_DRAIN_S, REFUSED_BODY_IDLE_S

    # not told to continue, the client never sends the body: answered without waiting for it (the
    # server that waited would have answered the body timeout's 408), and the connection closed
    answer, closed = exchange(server.port, head, bound(REFUSED_BODY_DRAIN_S))
    text = answer.decode(errors="replace")
    assert closed and text.startswith("HTTP/1.1 413"), text  # no "100 Continue" first
    assert "application/json" in text and '"error"' in text and "connection: close" in text.lower(), text
    # without Expect and without the body (waiting for the answer): answered once nothing came for 1 s
    t0 = time.monotonic()
    answer, closed = exchange(server.port, head.replace(b"Expect: 100-continue\r\n", b""), bound(REFUSED_BODY_DRAIN_S))
    text = answer.decode(errors="replace")
    assert closed and text.startswith("HTTP/1.1 413") and '"error"' in text, text
    assert time.monotonic() - t0 >= REFUSED_BODY_IDLE_S  # it waited for the body it would discard
    # a body that declares more than the server drains is answered without draining, the connection closed
    huge = head.replace(b"Expect: 100-continue\r\n", b"").replace(str(5 * 2**20).encode(), str(2**30).encode())
    answer, closed = exchange(server.port, huge + b"RIFF" * 16, bound(REFUSED_BODY_DRAIN_S))
    text = answer.decode(errors="replace")
    assert closed and text.startswith("HTTP/1.1 413") and '"error"' in text, text
    assert "connection: close" in text.lower(), text
    # a chunked body (no length) over the limit is cut off as it arrives
    r = httpx.post(
        server.url + "/v1/reconstruct", content=iter([b"\0" * 2**20] * 3), headers=server.headers, timeout=30
    )
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_every_client_reads_the_refusal_of_a_body_it_sends_whole(server: Server) -> None:
    """urllib and http.client send the whole body before they read: closing on them with the body
    unread reset the connection (urllib: 20 resets or broken pipes in 20 tries at 5 MB)."""
    import http.client
    import urllib.error
    import urllib.request

    big = b"\0" * (5 * 2**20)  # over the server's 2 MB limit
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "audio/wav"}

    def expect_json(status: int, got: int, text: bytes, who: str) -> None:
        assert got == status, (who, got, text[:200])
        assert json.loads(text)["error"], (who, text[:200])

    for _ in range(5):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(server.url + "/v1/reconstruct", big, auth), timeout=30)
        expect_json(413, e.value.code, e.value.read(), "urllib")
        with pytest.raises(urllib.error.HTTPError) as e:  # refused before routing (401), the body unread
            urllib.request.urlopen(urllib.request.Request(server.url + "/v1/encode", big), timeout=30)
        expect_json(401, e.value.code, e.value.read(), "urllib")
    for path, body, status in [("/v1/reconstruct", big, 413), ("/v1/decode?gain=-1", big[: 2**20], 422)]:
        for _ in range(5):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            try:
                conn.request("POST", path, body, auth)
                r = conn.getresponse()
                expect_json(status, r.status, r.read(), "http.client")
            finally:
                conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:  # chunked: no length to refuse it by, cut off as it arrives, then the rest is drained
        conn.request("POST", "/v1/reconstruct", iter([b"\0" * 2**20] * 5), auth, encode_chunked=True)
        r = conn.getresponse()
        expect_json(413, r.status, r.read(), "http.client chunked")
    finally:
        conn.close()
    for _ in range(3):
        r = httpx.post(server.url + "/v1/reconstruct", content=big, headers=auth, timeout=30)
        expect_json(413, r.status_code, r.content, "httpx")
    # a refusal whose body was drained leaves the connection usable
    with httpx.Client(headers=server.headers, timeout=30) as c:
        assert c.post(server.url + "/v1/decode", params={"gain": "-1"}, content=big[: 2**20]).status_code == 422
        assert c.get(server.url + "/v1/info").status_code == 200


def read_until_closed(sock: socket.socket, timeout: float = 30) -> tuple[bytes, bool]:
    """What the server sends on `sock` until it closes the connection (or `timeout`), and whether it
    reset the connection (instead of closing it cleanly)."""
    got = b""
    end = time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < end:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            return got, True
        except TimeoutError:
            break
        if not part:
            break
        got += part
    return got, False


def test_a_client_that_sends_its_body_after_expect_100_continue_reads_the_answer(server: Server) -> None:
    """RFC 9110 lets a client send its body without waiting for `100 Continue` (curl does after 1 s, and
    HTTP/1.0 never gets one); the server that answered at once and closed on it reset the connection:
    HTTP/1.0 5 times in 5, HTTP/1.1 4 in 5 with 4 MiB sent at once."""
    body = b"\0" * (4 * 2**20)  # over the fixture's 2 MB limit: refused from its header
    for version in ("1.0", "1.1"):
        for attempt in range(5):
            head = (
                f"POST /v1/reconstruct HTTP/{version}\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Expect: 100-continue\r\nContent-Type: audio/wav\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            failed: list[BaseException] = []
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:

                def send_all(sock: socket.socket = sock, data: bytes = head + body, failed: list = failed) -> None:
                    try:
                        sock.sendall(data)
                    except OSError as e:
                        failed.append(e)

                sender = threading.Thread(target=send_all)
                sender.start()
                answer, reset = read_until_closed(sock)
                sender.join(30)
            case = f"HTTP/{version}, try {attempt + 1}"
            assert not reset and not failed, f"{case}: the connection was reset ({failed}) after {answer[:100]!r}"
            text = answer.decode(errors="replace")
            assert text.startswith("HTTP/1.1 413") and json.loads(text.split("\r\n\r\n", 1)[1])["error"], case


# ---------------------------------------------------------------------- slow clients
class Trickle:
    """Raw connections that each send their bytes one at a time, every `pace` seconds, from one
    thread (a slow client's pace, not a wait on the server), and record what the server answers."""

    def __init__(self, port: int, payloads: list[bytes], pace: float, head: bytes = b""):
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in payloads]
        for s in self.socks:
            s.sendall(head)  # sent whole, before the trickle starts
        self.payloads = payloads
        self.answers: list[bytes] = [b""] * len(payloads)
        self.closed: list[float | None] = [None] * len(payloads)  # when the server closed each one
        self.stop = threading.Event()
        self.pace = pace
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sent = [0] * len(self.socks)
        while not self.stop.is_set() and any(c is None for c in self.closed):
            for i, s in enumerate(self.socks):
                if self.closed[i] is not None:
                    continue
                try:
                    if sent[i] < len(self.payloads[i]):
                        s.sendall(self.payloads[i][sent[i] : sent[i] + 1])
                        sent[i] += 1
                    s.setblocking(False)
                    try:
                        while part := s.recv(65536):
                            self.answers[i] += part
                        self.closed[i] = time.monotonic()  # recv returned b"": closed by the server
                    except BlockingIOError:
                        pass
                    finally:
                        s.setblocking(True)
                except OSError:
                    self.closed[i] = time.monotonic()
            self.stop.wait(self.pace)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for s in self.socks:
            s.close()


@pytest.fixture(scope="module")
def guarded(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default limits (16 upload slots, 4 KiB/s minimum upload rate) with a short header timeout."""
    s = Server(tiny_bundle, tmp_path_factory.mktemp("guarded"), "--header-timeout-s", "1.5", "--body-timeout-s", "20")
    yield s
    assert s.stop() == 0, s.log.read_text()


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
PROTOCOL_FROM_ENV = "recon_runtime.serving.http_protocol:HeadTimeoutH11Protocol"


def wait_until(condition: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def test_a_connection_whose_request_head_trickles_in_is_closed_within_the_header_timeout(guarded: Server) -> None:
    head = b"POST /v1/reconstruct HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: 10\r\n\r\n"
    with httpx.Client(timeout=30) as c:  # a kept-alive connection that trickles its next head: closed too
        assert c.get(guarded.url + "/healthz").status_code == 200
    opened = time.monotonic()  # before the connections: the server's timers start after this
    slow = Trickle(guarded.port, [head, b"", head], pace=0.25)  # 1 byte each 0.25 s: 21 s for this head
    try:
        wait_until(lambda: all(c is not None for c in slow.closed), bound(1.5), "a slow head was never closed")
        for i in (0, 2):  # part of a head came: 408 as JSON (a head that came whole would get another answer)
            assert slow.closed[i] - opened >= 1.5, slow.closed[i] - opened  # type: ignore[operator]
            answer = slow.answers[i].decode()
            assert answer.startswith("HTTP/1.1 408") and "1.5 s" in json.loads(answer.split("\r\n\r\n")[1])["error"]
        assert slow.answers[1] == b""  # nothing came: closed without a word
    finally:
        slow.close()
    # a malformed head gets the server's JSON error, not uvicorn's plain text
    answer = raw_exchange(guarded.port, b"NOT HTTP AT ALL\r\n\r\n").decode()
    assert answer.startswith("HTTP/1.1 400") and json.loads(answer.split("\r\n\r\n")[1])["error"], answer
    assert httpx.get(guarded.url + "/readyz", timeout=10).status_code == 200


def test_a_kept_alive_connection_gets_the_header_timeout_for_its_next_head(guarded: Server) -> None:
    opened = time.monotonic()
    # the first request whole, then the next head on the same connection at a byte each 0.25 s
    slow = Trickle(guarded.port, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"], pace=0.25, head=HEALTHZ)
    try:
        wait_until(
            lambda: slow.closed[0] is not None, bound(1.5), "the connection trickling its second head was never closed"
        )
        answers = slow.answers[0].decode()
        assert answers.startswith("HTTP/1.1 200") and answers.count("HTTP/1.1 ") == 2, answers
        assert "HTTP/1.1 408" in answers and "1.5 s" in answers.rsplit("\r\n\r\n", 1)[1], answers
        assert slow.closed[0] - opened >= 1.5, slow.closed[0] - opened  # type: ignore[operator]
    finally:
        slow.close()


def test_part_of_a_pipelined_head_that_came_with_the_last_request_still_gets_its_408(guarded: Server) -> None:
    """The start of a next head that came with the previous request's last bytes, then stalled, was
    closed without a word when that answer took longer than the header timeout (what had come of the
    head was forgotten when the timer restarted after the answer)."""
    clip = wav_bytes(tone(10.0, 8000), 8000, "PCM_16")
    head = (
        "POST /v1/reconstruct?output_rate=384000 HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: {len(clip)}\r\n\r\n"
    ).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the 15 MB answer waits on this client
        sock.settimeout(60)
        sock.connect(("127.0.0.1", guarded.port))
        sock.sendall(head + clip + b"GET /heal")  # the next head begins with the body's last bytes
        assert sock.recv(1, socket.MSG_PEEK)  # the answer has begun
        time.sleep(1.5 + 1.0)  # the client's pace: it reads its answer after the header timeout (1.5 s)
        answer, _ = read_until_closed(sock, 60)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"HTTP/1.1 408" in answer[-400:] and b"1.5 s" in answer[-400:], answer[-400:]


def test_other_uvicorn_hosts_get_the_timeouts_from_the_environment_once_at_start(
    tiny_bundle: Path, rec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`uvicorn --http recon_runtime.serving.http_protocol:HeadTimeoutH11Protocol` reads RECON_HEADER_TIMEOUT_S
    (and every RECON_* setting, checked) when uvicorn loads the class, not on each connection."""
    import uvicorn

    import recon_runtime.serving.http_protocol as http_protocol
    from recon_runtime.serving.app import create_app
    from recon_runtime.serving.config import ServerConfig

    monkeypatch.setattr(http_protocol, "_from_env", None)  # as in a fresh process
    monkeypatch.setenv("RECON_MAX_WAIT_MS", "abc")  # a bad value fails the start, naming the variable
    bad = uvicorn.Config(create_app(ServerConfig(model=str(tiny_bundle))), http=PROTOCOL_FROM_ENV)
    with pytest.raises(ValueError, match="RECON_MAX_WAIT_MS=abc: not a number"):
        bad.load()
    monkeypatch.delenv("RECON_MAX_WAIT_MS")
    monkeypatch.setenv("RECON_HEADER_TIMEOUT_S", "0.5")
    app = create_app(ServerConfig(model=str(tiny_bundle), warmup=False), reconstructor=rec)
    srv = _Threaded(app, http=PROTOCOL_FROM_ENV)
    try:
        monkeypatch.setenv("RECON_HEADER_TIMEOUT_S", "x")  # read once: connections do not read it again
        opened = time.monotonic()
        answer, closed = exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHo", bound(0.5))
        assert closed and answer.startswith(b"HTTP/1.1 408") and b"0.5 s" in answer, answer
        assert time.monotonic() - opened >= 0.5
        assert httpx.get(srv.url + "/healthz", timeout=10).status_code == 200
    finally:
        srv.close()


def test_the_protocol_refuses_a_uvicorn_without_what_it_extends(monkeypatch: pytest.MonkeyPatch) -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    import recon_runtime.serving.http_protocol as http_protocol

    http_protocol._check_uvicorn()  # the pinned uvicorn has it all
    monkeypatch.delattr(H11Protocol, "send_400_response")
    with pytest.raises(ImportError, match=r"lacks send_400_response\(\).*needs uvicorn 0\.54") as e:
        http_protocol._check_uvicorn()
    assert "\n" not in str(e.value)
    monkeypatch.undo()

    def on_response_complete(self: Any) -> None:  # a uvicorn whose method no longer uses the flow control
        pass

    monkeypatch.setattr(H11Protocol, "on_response_complete", on_response_complete)
    with pytest.raises(ImportError, match="on_response_complete: self.transport"):
        http_protocol._check_uvicorn()


def test_a_host_without_the_protocol_is_told_its_timeouts_do_not_apply(
    tiny_bundle: Path, rec: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import recon_runtime.serving.http_protocol as http_protocol

    monkeypatch.setattr(http_protocol, "connections_served", 0)  # as in a process that never served with it
    with caplog.at_level("WARNING", logger="recon_runtime.serving"):
        srv = serve_in_process(rec, tiny_bundle)  # uvicorn's own protocol
        try:
            assert httpx.get(srv.url + "/healthz", timeout=10).status_code == 200
        finally:
            srv.close()
    lines = [r.getMessage() for r in caplog.records if "http_protocol" in r.getMessage()]
    assert len(lines) == 1 and "timeouts do not apply" in lines[0], lines


def test_a_ray_replica_is_not_told_to_use_a_uvicorn_flag(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under `serve --ray` Ray's proxy speaks HTTP: the warning advised a uvicorn flag that cannot apply.
    The replica's own app (built as Ray builds it, served here by a plain uvicorn) does not warn."""
    import recon_runtime.serving.http_protocol as http_protocol
    from recon_runtime.serving.config import ServerConfig
    from recon_runtime.serving.ray_serve import ReconReplica

    monkeypatch.setattr(http_protocol, "connections_served", 0)  # as in a replica, which never serves with it
    replica = ReconReplica.__new__(ReconReplica)  # its __init__ asks Ray for the replica's id
    replica.config, replica.replica_id, replica.service = ServerConfig(model=str(tiny_bundle), warmup=False), "r1", None
    with caplog.at_level("WARNING", logger="recon_runtime.serving"):
        srv = _Threaded(replica.__serve_build_asgi_app__())  # its start-up returns once the model is loaded
        try:
            r = httpx.get(srv.url + "/readyz", timeout=10)
            assert r.status_code == 200 and r.headers["x-recon-replica"] == "r1", r.text
        finally:
            srv.close()
    lines = [r.getMessage() for r in caplog.records if "http_protocol" in r.getMessage()]
    assert lines == [], lines


def test_slow_uploads_give_their_slots_back_and_do_not_starve_a_normal_client(
    tiny_bundle: Path, rec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """17 uploads at 1 byte/s held every upload slot for 30 s (--body-timeout-s); below the minimum
    rate after the grace they get 408 (or, one that found no slot within the grace, 503), and a
    normal client is answered meanwhile instead of a 503.

    The grace is held off until the server counts all 17 (on a busy machine the 17th head can be
    parsed after the first upload's grace ended), then set once every one is older than it: each is
    cut off at its next byte, and the normal client, which then finds every slot taken, waits for one
    for the whole grace."""
    from recon_runtime.serving import inputs

    grace = 10.0
    monkeypatch.setattr(inputs, "UPLOAD_GRACE_S", 3600.0)  # no upload is cut off before all are counted
    srv = serve_in_process(rec, tiny_bundle, body_timeout_s=600.0)  # the default slots and minimum rate
    head = b"POST /v1/reconstruct HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: 100000\r\n\r\n"
    uploads = 17  # one more than the default --max-uploads 16
    # the heads go at once (the header timeout is not what this tests), the bodies at 2 bytes/s
    slow = Trickle(srv.port, [b"RIFF" * 25_000] * uploads, pace=0.5, head=head)
    try:
        m = wait_for_metric(srv.url, "recon_requests_receiving", uploads, timeout=60)
        assert metric(m, "recon_requests_receiving") == uploads, m  # 16 hold the slots, 1 waits
        time.sleep(grace)  # now every slow upload is older than the grace about to apply
        monkeypatch.setattr(inputs, "UPLOAD_GRACE_S", grace)
        r = httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(tone(0.3)), timeout=bound(grace))
        assert r.status_code == 200, r.text
        wait_until(lambda: all(c is not None for c in slow.closed), bound(grace), "a slow upload was never answered")
        statuses = []
        for answer in slow.answers:
            text = answer.decode(errors="replace")
            statuses.append(text[9:12])
            assert text[9:12] in ("408", "503") and json.loads(text.split("\r\n\r\n", 1)[1])["error"], text
            assert text[9:12] == "503" or "4096 bytes/s" in text, text
        assert statuses.count("408") >= uploads - 1, statuses  # every slot holder fell below the rate
    finally:
        slow.close()
        srv.close()


def test_an_idle_server_takes_a_body_that_begins_after_the_grace_without_a_minimum_rate(
    tiny_bundle: Path, rec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --min-upload-rate 0, a body whose first byte came after UPLOAD_GRACE_S got 503 "server
    busy: 16 uploads in progress" from an idle server: the slot wait was `wait_for(acquire, 0)`,
    which cancels the acquire before it runs."""
    from recon_runtime.serving import inputs

    monkeypatch.setattr(inputs, "UPLOAD_GRACE_S", 0.5)  # the grace shortened: the test waits less
    srv = serve_in_process(rec, tiny_bundle, min_upload_rate=0.0)
    clip = wav_bytes(tone(0.3))
    head = (
        "POST /v1/reconstruct HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: {len(clip)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            sock.sendall(head)
            time.sleep(1.5)  # the client's pace: its body begins well after the (shortened) grace
            sock.sendall(clip)
            answer, _ = read_until_closed(sock, 60)
        text = answer.decode(errors="replace")
        assert text.startswith("HTTP/1.1 200"), text[:300]
        out, _ = sf.read(io.BytesIO(answer.split(b"\r\n\r\n", 1)[1]), dtype="float32")
        assert rel_l2(out, rec.reconstruct(tone(0.3), RATE)) <= REL
    finally:
        srv.close()


def test_the_api_key_guards_every_route_but_healthz(server: Server) -> None:
    get = lambda path, **h: httpx.get(server.url + path, headers=h, timeout=10)  # noqa: E731
    assert get("/healthz").status_code == 200
    for path in ("/readyz", "/v1/info", "/metrics", "/docs", "/openapi.json", "/nowhere"):
        r = get(path)
        assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer", path
        assert get(path, Authorization=f"Bearer {KEY}x").status_code == 401
        assert get(path, Authorization=KEY).status_code == 401
    r = httpx.post(server.url + "/v1/reconstruct", content=wav_bytes(tone(0.3)), timeout=10)
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert get("/v1/info", Authorization=f"Bearer {KEY}").status_code == 200
    assert get("/v1/info", Authorization=f"bearer {KEY}").status_code == 200  # the scheme is case-insensitive
    m = server.metrics()
    assert metric(m, "recon_requests_total", route="/v1/info", status="401") >= 2  # labelled by route
    assert metric(m, "recon_requests_total", route="/v1/reconstruct", status="401") >= 1


def test_clients_that_send_only_a_head_do_not_starve_a_normal_client(guarded: Server) -> None:
    """64 sockets sending `POST /v1/reconstruct ... Content-Length: 100000` and no body (reconnecting when
    closed) made 10 of 12 normal requests get 503 and the other 2 wait 15-18 s: each held an admission
    slot while it waited for an upload slot, for up to --body-timeout-s."""
    head = b"POST /v1/reconstruct HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: 100000\r\n\r\n"
    count = 70  # more than the default --max-queue 64 and --max-uploads 16
    stop = threading.Event()
    opened: list[int] = [0]

    def attack() -> None:  # keeps `count` head-only connections open, replacing each the server closes
        socks: list[socket.socket | None] = [None] * count
        end = time.monotonic() + 120
        try:
            while not stop.is_set() and time.monotonic() < end:
                for i, sock in enumerate(socks):
                    if sock is not None:
                        try:
                            sock.setblocking(False)
                            if sock.recv(65536) == b"":
                                raise ConnectionResetError  # closed by the server: replace it
                        except BlockingIOError:
                            continue
                        except OSError:
                            pass
                        sock.close()
                    try:
                        socks[i] = socket.create_connection(("127.0.0.1", guarded.port), timeout=10)
                        socks[i].sendall(head)  # type: ignore[union-attr]
                        opened[0] += 1
                    except OSError:
                        socks[i] = None
                stop.wait(0.1)
        finally:
            for sock in socks:
                if sock is not None:
                    sock.close()

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:

        def waiting() -> float:  # requests the attack holds, counted before (admitted) or after the fix (receiving)
            m = httpx.get(guarded.url + "/metrics", timeout=10).text
            return metric(m, "recon_requests_in_flight") + metric(m, "recon_requests_receiving")

        wait_until(lambda: waiting() >= 64, 60, "the head-only connections never reached the server")
        for _ in range(3):  # answered, not refused (503) for the slots the head-only ones held before
            r = httpx.post(guarded.url + "/v1/reconstruct", content=wav_bytes(tone(0.3)), timeout=bound(20))
            assert r.status_code == 200, r.text
        assert attacker.is_alive() and opened[0] >= count
    finally:
        stop.set()
        attacker.join(30)


def test_an_answer_over_max_response_mb_is_refused_before_any_work(server: Server) -> None:
    """A 2.7 MB FLAC of 600 s at 8 kHz asked back at 384 kHz got a 921,600,080-byte answer (server peak
    3.05 GiB): --max-decoded-mb bounds only the input. The answer's size is checked from the upload's
    header and the query, before anything is decoded or run."""
    clip = wav_bytes(tone(100.0, 8000), 8000, "PCM_16")  # 1.6 MB, under the fixture's 2 MB body limit
    before = metric(server.metrics(), "recon_windows_total")
    r = server.post("/v1/reconstruct", clip, params={"output_rate": "384000"})  # 100 s x 384000 x 4 B = 146 MiB
    assert r.status_code == 413, r.status_code
    error = r.json()["error"]
    assert "146 MiB" in error and "384000 Hz" in error and "--max-response-mb" in error, error
    assert metric(server.metrics(), "recon_windows_total") == before  # no work done
    r = server.post("/v1/reconstruct", wav_bytes(tone(1.0, 8000), 8000), params={"output_rate": "384000"})
    assert r.status_code == 200 and len(r.content) > 384000 * 4  # a short one at that rate is fine


def test_a_client_that_reads_nothing_holds_its_slot_until_the_send_timeout_drops_it(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """The admission slot was given back before the answer was sent, uvicorn has no write timeout, and
    a client that read nothing pinned its whole answer (1.2 GB at 384 kHz) for as long as it liked."""
    s = Server(tiny_bundle, tmp_path, "--send-timeout-s", "5", "--max-queue", "1")
    clip = wav_bytes(tone(10.0, 8000), 8000, "PCM_16")
    head = (
        "POST /v1/reconstruct?output_rate=384000 HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: {len(clip)}\r\n\r\n"
    ).encode()
    answer_bytes = 10 * 384000 * 4  # 15 MB: far more than the sockets' buffers
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", s.port))
        sock.sendall(head + clip)
        assert sock.recv(1, socket.MSG_PEEK)  # its answer has begun
        m = s.metrics()
        assert metric(m, "recon_requests_in_flight") == 1, "the slot was given back before the answer was sent"
        r = httpx.post(s.url + "/v1/reconstruct", content=wav_bytes(tone(0.2)), timeout=30)
        assert r.status_code == 503 and "busy" in r.json()["error"], r.text  # --max-queue 1: still held
        wait_until(lambda: metric(s.metrics(), "recon_requests_in_flight") == 0, 60, "the slot was never freed")
        got, _ = read_until_closed(sock, 30)  # what the kernel buffered, then the end: the rest was dropped
        assert len(got) < answer_bytes, len(got)
        r = httpx.post(s.url + "/v1/reconstruct", content=wav_bytes(tone(0.2)), timeout=30)
        assert r.status_code == 200, r.text
    finally:
        sock.close()
        assert s.stop() == 0, s.log.read_text()
    assert "read nothing of the answer for 5 s" in s.log.read_text()


def test_a_request_cut_off_while_its_refusal_drains_gets_the_shutdowns_503(tiny_bundle: Path, tmp_path: Path) -> None:
    """The 404 of a request whose body trickled in waited for the body (to be readable); a shutdown that
    cut it off then got uvicorn's plain-text 500 and a traceback in the log."""
    s = Server(tiny_bundle, tmp_path, "--grace-s", "1")
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
    stop = threading.Event()

    def trickle() -> None:  # a byte each 0.4 s (the refusal's drain waits at most 1 s between bytes)
        while not stop.wait(0.4):
            try:
                sock.sendall(b"x")
            except OSError:
                return

    sender = threading.Thread(target=trickle, daemon=True)
    try:
        sock.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx")
        sender.start()
        stop.wait(1.0)  # the client's pace: two more bytes, the server discarding them
        s.proc.send_signal(signal.SIGTERM)
        answer, _ = read_until_closed(sock, 30)
        assert s.proc.wait(30) == 3, s.log.read_text()  # the grace period cut one request off
    finally:
        stop.set()
        sender.join(10)
        sock.close()
        s.stop()
    text = answer.decode(errors="replace")
    assert text.startswith("HTTP/1.1 503") and "application/json" in text and "connection: close" in text, text
    assert "shutting down" in json.loads(text.split("\r\n\r\n", 1)[1])["error"]
    log = s.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log


def test_an_fp16_overflow_of_a_finite_input_is_a_422_naming_fp32_and_a_warning_for_the_operator(
    tiny_bundle: Path, rec: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Every NumericalError was the client's 422, also an fp16 overflow on a valid input, without saying
    it is the limit of the precision the server chose; then that became a 500, a 5xx for what a client
    sent (fp16 is the default on CUDA). It is a 422 that says whose limit it is, and a warning in the log."""
    from recon_runtime.errors import NumericalError

    class Overflowing:
        def __init__(self, inner: Any):
            self._inner = inner
            self.input_caused = False

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def run_windows(self, roles: Any, windows: Any) -> Any:
            raise NumericalError("vocoder graph output contains NaN or inf at fp16 (...)", self.input_caused)

    graphs = Overflowing(rec)
    srv = serve_in_process(graphs, tiny_bundle)
    try:
        with caplog.at_level("WARNING", logger="recon_runtime.serving"):
            r = httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(tone(0.3)), timeout=30)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert "cannot carry this input" in error and "not a fault of the input" in error, error
        assert "--precision fp32" in error and "at fp16" in error, error
        logged = [x for x in caplog.records if "cannot carry this input" in x.getMessage()]
        assert [x.levelname for x in logged] == ["WARNING"], [x.getMessage() for x in caplog.records]
        graphs.input_caused = True  # the input's values overflowed graphs with float32's range: the client's
        r = httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(tone(0.3)), timeout=30)
        assert r.status_code == 422 and "--precision" not in r.json()["error"], r.text
        m = httpx.get(srv.url + "/metrics", timeout=10).text
        assert metric(m, "recon_requests_total", status="500") == 0
    finally:
        srv.close()


def test_serve_passes_a_fractional_grace_period_as_it_is(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--grace-s 0.5` became a 1 s graceful shutdown (rounded up to whole seconds)."""
    import uvicorn
    from click.testing import CliRunner

    from recon_runtime.cli import main

    seen: list[Any] = []

    class Recorded:
        def __init__(self, config: Any):
            seen.append(config.timeout_graceful_shutdown)
            self.started = True

        def run(self) -> None:
            pass

    monkeypatch.setattr(uvicorn, "Server", Recorded)
    r = CliRunner().invoke(main, ["serve", "--model", str(tiny_bundle), "--grace-s", "0.5", "--port", "0"])
    assert r.exit_code == 0, r.output
    assert seen == [0.5]


def test_serve_refuses_non_finite_numbers_and_timeouts_ray_cannot_apply(tiny_bundle: Path) -> None:
    from click.testing import CliRunner

    from recon_runtime.cli import main

    for option in ("--min-upload-rate", "--max-wait-ms", "--timeout-s", "--send-timeout-s", "--grace-s"):
        for value in ("nan", "inf"):
            r = CliRunner().invoke(main, ["serve", "--model", str(tiny_bundle), option, value])
            assert r.exit_code == 2 and "is not a finite number" in r.output, (option, value, r.output)
    r = CliRunner().invoke(main, ["serve", "--model", str(tiny_bundle), "--ray", "--header-timeout-s", "5"])
    assert r.exit_code == 2 and "--header-timeout-s cannot apply with --ray" in r.output, r.output


def test_a_port_in_use_is_one_line_before_the_model_loads(tiny_bundle: Path) -> None:
    from .conftest import run_cli

    with socket.socket() as holder:  # another server on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = run_cli("recon-run", "serve", "--model", str(tiny_bundle), "--provider", "cpu", "--port", str(port))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "stop what listens there or choose another --port"
    ), r.stderr  # one line: no model loaded ("using CPU ..."), no uvicorn start-up or traceback
    r = run_cli("recon-run", "serve", "--model", str(tiny_bundle), "--host", "no-such-host.invalid")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: --host no-such-host.invalid: cannot be resolved")


# ---------------------------------------------------------------------- limits under load
@pytest.fixture(scope="module")
def limited(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(
        tiny_bundle, tmp_path_factory.mktemp("limited"),
        "--max-queue", "2", "--max-batch", "1", "--max-wait-ms", "0", "--timeout-s", "1.5",
    )  # fmt: skip
    yield s
    assert s.stop() == 0, s.log.read_text()


def test_a_full_queue_answers_503_and_every_accepted_request_completes(limited: Server, rec: Any) -> None:
    clip = tone(1.0, RATE, 440.0)
    ref = rec.reconstruct(clip, RATE)
    body = wav_bytes(clip)
    barrier = threading.Barrier(10)

    def one(_: int) -> httpx.Response:
        barrier.wait(30)
        return httpx.post(limited.url + "/v1/reconstruct", content=body, timeout=60)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(one, range(10), timeout=120))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] and "busy" in r.json()["error"]
        else:
            out, _ = sf.read(io.BytesIO(r.content), dtype="float32")
            assert rel_l2(out, ref) <= REL
    r = httpx.post(limited.url + "/v1/reconstruct", content=body, timeout=60)  # the load is gone: accepted again
    assert r.status_code == 200
    assert metric(limited.metrics(), "recon_requests_total", route="/v1/reconstruct", status="503") == codes.count(503)


def sigterm_while_in_flight(s: Server, t: threading.Thread) -> None:
    """Start `t` (one slow request) and send SIGTERM once the server counts it in flight."""
    t.start()
    m = wait_for_metric(s.url, "recon_requests_in_flight", 1, timeout=60)
    assert metric(m, "recon_requests_in_flight") == 1 and t.is_alive(), "the request must be in flight"
    s.proc.send_signal(signal.SIGTERM)


def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny_bundle: Path, tmp_path: Path, rec: Any) -> None:
    s = Server(tiny_bundle, tmp_path)
    clip = tone(40.0, RATE, 300.0)  # seconds of work here: the drain outlasts the refusal check below
    result: dict[str, Any] = {}

    def slow() -> None:
        result["r"] = httpx.post(s.url + "/v1/reconstruct", content=wav_bytes(clip), timeout=120)

    t = threading.Thread(target=slow)
    try:
        sigterm_while_in_flight(s, t)
        # no new connections while it drains: refused while the server and its request are still alive
        end = time.monotonic() + DRAIN_REFUSAL_S
        while True:
            assert time.monotonic() < end, "the server still accepted connections after SIGTERM"
            try:
                httpx.get(s.url + "/healthz", timeout=5)
            except httpx.ConnectError:
                assert t.is_alive() and s.proc.poll() is None, "refused only after the drain ended"
                break
            except httpx.TransportError:
                pass  # a connection accepted just before the listener closed, then dropped: try again
            time.sleep(0.05)
        t.join(120)
        assert s.proc.wait(30) == 0, s.log.read_text()
    finally:
        s.stop()
    r = result["r"]
    assert r.status_code == 200, r.text
    out, _ = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rel_l2(out, rec.reconstruct(clip, RATE)) <= REL


# ---------------------------------------------------------------------- in-process uvicorn with a held model
class _Threaded:
    """The app factory's app on a real uvicorn server in a thread (to hold the model from the test)."""

    def __init__(self, app: Any, http: Any = "auto"):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", http=http)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started and time.monotonic() < end:
            time.sleep(0.02)
        assert self.server.started

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def test_readyz_is_503_until_the_model_is_loaded_and_warmed_up(tiny_bundle: Path, rec: Any) -> None:
    from recon_runtime.serving.app import create_app
    from recon_runtime.serving.config import ServerConfig

    release = threading.Event()

    def load() -> Any:
        assert release.wait(30)
        return rec

    srv = _Threaded(create_app(ServerConfig(model=str(tiny_bundle)), reconstructor=load))
    try:
        r = httpx.get(srv.url + "/readyz", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert httpx.get(srv.url + "/healthz", timeout=10).status_code == 200
        r = httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(tone(0.2)), timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert httpx.get(srv.url + "/v1/info", timeout=10).status_code == 503
        assert "recon_ready 0.0" in httpx.get(srv.url + "/metrics", timeout=10).text
        release.set()
        end = time.monotonic() + 30
        while httpx.get(srv.url + "/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < end, "never became ready"
            time.sleep(0.05)
        assert "recon_ready 1.0" in httpx.get(srv.url + "/metrics", timeout=10).text
        r = httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(tone(0.2)), timeout=30)
        assert r.status_code == 200
        srv.app.state.service.batcher.close(timeout=10)  # a worker that stopped: not ready any more
        r = httpx.get(srv.url + "/readyz", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "failed"
    finally:
        release.set()
        srv.close()


def test_streaming_decode_sends_its_first_part_before_the_last_window_is_computed(tiny_bundle: Path, rec: Any) -> None:
    from recon_runtime.reconstructor import StreamedJob
    from recon_runtime.serving.app import create_app
    from recon_runtime.serving.config import ServerConfig

    class Held:
        """The runtime, with decoder windows past those the first vocoder chunk needs held until the test lets them go."""

        def __init__(self, inner: Any, needed: int):
            self._inner = inner
            self.release = threading.Event()
            self.decoded = 0
            self.needed = needed

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def run_windows(self, roles: Any, windows: Any) -> Any:
            if tuple(roles) == ("decoder",):
                if self.decoded >= self.needed:
                    assert self.release.wait(30)
                out = self._inner.run_windows(roles, windows)
                self.decoded += len(windows)
                return out
            return self._inner.run_windows(roles, windows)

    z = rec.encode(tone(40.0, RATE, 250.0), RATE)  # 40 s: 5 windows of 216 latent frames, 2 vocoder chunks
    job = rec.decoding_job(z)
    n_windows = len(job.windows)
    assert n_windows >= 4
    steps = StreamedJob(job).steps
    needed = next(i for i, (j, _) in enumerate(steps) if j is not job)  # decoder windows before the first chunk
    assert needed < n_windows
    held = Held(rec, needed)
    srv = _Threaded(create_app(ServerConfig(model=str(tiny_bundle)), reconstructor=held))
    try:
        c = Client(srv.url, timeout=60)
        end = time.monotonic() + 30
        while not c.ready():
            assert time.monotonic() < end
            time.sleep(0.05)
        parts = []
        with httpx.stream(
            "POST", srv.url + "/v1/decode", params={"stream": "true"}, content=npy_bytes(z), timeout=60
        ) as r:
            assert r.status_code == 200
            assert r.headers["x-recon-sample-format"] == "f32le" and r.headers["x-recon-sample-rate"] == "16000"
            assert int(r.headers["x-recon-windows"]) == n_windows
            stream = r.iter_raw()
            first = next(stream)
            decoded_at_first_part = held.decoded
            held.release.set()
            parts = [first, *stream]
        assert decoded_at_first_part == needed < n_windows, (
            "the first part waited for more than the first chunk's windows"
        )
        wave = np.frombuffer(b"".join(parts), "<f4")
        ref = rec.decode(z)
        assert rel_l2(wave, ref) <= REL
        # the same through the client, cropped and scaled
        got = np.concatenate(list(c.decode_stream(z, num_samples=500_000, gain=0.5)))
        assert rel_l2(got, ref[:500_000] * np.float32(0.5)) <= REL  # = rec.decode(z, num_samples=500_000) * gain
        c.close()
    finally:
        held.release.set()
        srv.close()


class Gated:
    """The runtime with every graph run after the first `free` held until `release` is set; run number
    `fail_at` (counting from 0) raises instead. Serve it with warmup=False so only requests run."""

    def __init__(self, inner: Any, free: int = 0, fail_at: int | None = None):
        self._inner = inner
        self.release = threading.Event()
        self.entered = threading.Event()
        self.free = free
        self.fail_at = fail_at
        self.runs = 0
        self.windows = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run_windows(self, roles: Any, windows: Any) -> Any:
        from recon_runtime.errors import ReconError

        run, self.runs = self.runs, self.runs + 1
        self.entered.set()
        if run >= self.free:
            assert self.release.wait(30)
        if run == self.fail_at:
            raise ReconError("injected failure")
        out = self._inner.run_windows(roles, windows)
        self.windows += len(windows)
        return out


def serve_in_process(rec: Any, tiny_bundle: Path, **config: Any) -> _Threaded:
    from recon_runtime.serving.app import create_app
    from recon_runtime.serving.config import ServerConfig

    srv = _Threaded(create_app(ServerConfig(model=str(tiny_bundle), warmup=False, **config), reconstructor=rec))
    end = time.monotonic() + 30
    while httpx.get(srv.url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < end, "never became ready"
        time.sleep(0.05)
    return srv


def wait_for_metric(
    url: str, name: str, want: float, timeout: float = 10, headers: dict[str, str] | None = None, **labels: str
) -> str:
    end = time.monotonic() + timeout
    while True:
        m = httpx.get(url + "/metrics", headers=headers, timeout=10).text
        if metric(m, name, **labels) >= want or time.monotonic() > end:
            return m
        time.sleep(0.05)


def test_past_the_timeout_a_request_gets_504_and_its_windows_leave_the_queue(tiny_bundle: Path, rec: Any) -> None:
    gated = Gated(rec)  # the first window is held until the request has timed out: no race with the machine's speed
    srv = serve_in_process(gated, tiny_bundle, max_batch=1, max_wait_ms=0, timeout_s=1.0, timeout_per_audio_s=0)
    try:
        clip = tone(40.0, 8000)
        n = len(rec.reconstruction_job(rec.features(clip, 8000)).windows)
        assert n >= 4
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(clip, 8000, "PCM_16"), timeout=bound(1.0))
        assert r.status_code == 504 and "1 s" in r.json()["error"]
        assert time.monotonic() - t0 >= 1.0  # the server waited for its timeout, not for the held window
        gated.release.set()
        m = wait_for_metric(srv.url, "recon_windows_total", 1, stages="encoder+decoder+vocoder")
        time.sleep(0.3)
        assert gated.windows <= 1 < n, f"{gated.windows} windows ran for a request that timed out"
        assert metric(httpx.get(srv.url + "/metrics", timeout=10).text, "recon_queue_depth") == 0
        assert "recon_requests_total" in m
        r = httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(tone(0.2)), timeout=30)
        assert r.status_code == 200
    finally:
        gated.release.set()
        srv.close()


def test_the_audio_a_body_declares_is_read_from_its_header() -> None:
    from recon_runtime.files.encoded import EncodedAudio
    from recon_runtime.serving.inputs import AUDIO, LATENTS, declared_seconds

    z = np.zeros((8, 250, 16), np.float32)  # 250 latent frames: 10 s at 16 kHz
    clip = EncodedAudio(latents=np.stack([z, z]), num_samples=160000, gain=(1.0, 1.0), bundle_fingerprint="f")
    assert declared_seconds(wav_bytes(np.zeros(3 * 8000, np.float32), 8000), AUDIO, RATE) == 3.0
    assert declared_seconds(npy_bytes(z), LATENTS, RATE) == 10.0
    assert declared_seconds(clip.to_bytes(), LATENTS, RATE) == 20.0  # both channels are decoded
    for junk in (b"", b"not audio", b"\x93NUMPY\x01\x00garbage", b"\xff" * 8 + b"{"):
        assert declared_seconds(junk, AUDIO, RATE) == declared_seconds(junk, LATENTS, RATE) == 0.0


def test_the_deadline_grows_with_the_audio_a_request_declares(tiny_bundle: Path, rec: Any) -> None:
    from recon_runtime.serving.config import ServerConfig

    # the defaults: what --max-seconds admits gets the time the slowest measured CPU needs (1.8 s per audio second)
    d = ServerConfig(model=str(tiny_bundle))
    assert d.timeout_s + d.timeout_per_audio_s * d.max_seconds >= 1.8 * d.max_seconds
    gated = Gated(rec)  # the first window is held past timeout_s: no race with the machine's speed
    srv = serve_in_process(gated, tiny_bundle, max_batch=1, max_wait_ms=0, timeout_s=1.0, timeout_per_audio_s=1.0)
    try:
        answers: list[httpx.Response] = []
        for path, body in (
            ("/v1/reconstruct", wav_bytes(tone(20.0, 8000), 8000)),
            ("/v1/decode", npy_bytes(rec.encode(tone(20.0, 8000), 8000))),
        ):
            gated.release.clear()
            gated.entered.clear()
            t = threading.Thread(
                target=lambda p=path, b=body: answers.append(httpx.post(srv.url + p, content=b, timeout=60))
            )
            t.start()
            assert gated.entered.wait(30)  # admitted, its deadline set, its first window running
            held = time.monotonic() + 1.5  # past the 1 s a fixed deadline gives it
            while time.monotonic() < held:
                time.sleep(0.05)
            gated.release.set()
            t.join(60)
            assert answers[-1].status_code == 200, (path, answers[-1].text)  # 20 s of audio: 1 s + 20 s
    finally:
        gated.release.set()
        srv.close()


def test_a_window_budget_refuses_what_does_not_fit_and_what_never_can(tiny_bundle: Path, rec: Any) -> None:
    def windows(seconds: float) -> int:
        return len(rec.reconstruction_job(rec.features(tone(seconds, 8000), 8000)).windows)

    long_s = 40.0
    n = windows(long_s)
    two_s = next(x / 2 for x in range(2, 80) if windows(x / 2) == 2)  # the shortest clip of two windows
    assert n >= 4 and windows(0.2) == 1
    gated = Gated(rec)  # the long request's first window is held: the rest of its windows wait
    srv = serve_in_process(gated, tiny_bundle, max_batch=1, max_wait_ms=0, max_windows=n)
    result: dict[str, Any] = {}

    def post(seconds: float) -> httpx.Response:
        return httpx.post(
            srv.url + "/v1/reconstruct", content=wav_bytes(tone(seconds, 8000), 8000, "PCM_16"), timeout=60
        )

    t = threading.Thread(target=lambda: result.setdefault("long", post(long_s)))
    fits = threading.Thread(target=lambda: result.setdefault("short", post(0.2)))
    try:
        too_long = post(long_s * 1.5)  # needs more windows than the whole budget: 413, even on an idle server
        assert windows(long_s * 1.5) > n
        assert too_long.status_code == 413 and "--max-windows" in too_long.json()["error"], too_long.text
        t.start()
        assert gated.entered.wait(30)
        m = wait_for_metric(srv.url, "recon_queue_depth", n - 1)
        assert metric(m, "recon_queue_depth") == n - 1, m  # the long request's other windows wait
        busy = post(two_s)  # n - 1 waiting + 2 > n: refused whole, none of its windows queued
        assert busy.status_code == 503 and busy.headers.get("Retry-After") == "1", busy.text
        assert "windows are waiting" in busy.json()["error"]
        assert metric(httpx.get(srv.url + "/metrics", timeout=10).text, "recon_queue_depth") == n - 1
        fits.start()  # n - 1 waiting + 1 = n: accepted (the running window does not count)
        m = wait_for_metric(srv.url, "recon_queue_depth", n)
        assert metric(m, "recon_queue_depth") == n, m
        gated.release.set()
        t.join(60)
        fits.join(60)
        assert result.get("long") is not None and result["long"].status_code == 200, result
        assert result.get("short") is not None and result["short"].status_code == 200, result
        assert post(two_s).status_code == 200  # the queue drained: it fits again
    finally:
        gated.release.set()
        for thread in (t, fits):
            if thread.is_alive():
                thread.join(60)
        srv.close()


def test_an_admitted_request_is_never_refused_at_its_vocoder_pass(tiny_bundle: Path, rec: Any) -> None:
    """--max-windows admits a request with its VAE windows; the vocoder pass over its joined log-mel
    is the rest of that work. While A's windows run, B fills the budget: A still gets its 200 (it got
    a 503 after all its VAE work when the pass was budgeted again)."""
    from recon_runtime import Reconstructor

    batched = Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32", threads=1, max_batch=8)
    gated = Gated(batched)  # A's VAE batch (its 3 windows) is held until B has been admitted
    srv = serve_in_process(gated, tiny_bundle, max_batch=8, max_wait_ms=3000, max_windows=4, timeout_per_audio_s=0)
    result: dict[str, httpx.Response] = {}

    def post(name: str, seconds: float) -> None:
        body = wav_bytes(tone(seconds, 16000, 250.0), 16000)
        result[name] = httpx.post(srv.url + "/v1/reconstruct", content=body, timeout=120)

    def windows(seconds: float) -> int:
        return len(rec.reconstruction_job(rec.features(tone(seconds, 16000, 250.0), 16000)).windows)

    a = threading.Thread(target=post, args=("A", 20.0))
    b = threading.Thread(target=post, args=("B", 30.0))
    try:
        assert windows(20.0) == 3 and windows(30.0) == 4
        a.start()
        assert gated.entered.wait(60)
        b.start()
        m = wait_for_metric(srv.url, "recon_queue_depth", 4, timeout=60)
        assert metric(m, "recon_queue_depth") == 4, (result.get("B") and result["B"].text, m[-300:])
        gated.release.set()
        a.join(120)
        b.join(120)
        assert result["A"].status_code == 200, result["A"].text
        assert result["B"].status_code == 200, result["B"].text
        want = rec.reconstruct(tone(20.0, 16000, 250.0), 16000)
        got, _ = sf.read(io.BytesIO(result["A"].content), dtype="float32")
        assert rel_l2(got, want) <= REL  # the same reconstruction as in-process
    finally:
        gated.release.set()
        for thread in (a, b):
            if thread.is_alive():
                thread.join(60)
        srv.close()


def test_a_vocoder_failure_before_a_streams_first_audio_keeps_its_status(tiny_bundle: Path, rec: Any) -> None:
    """Long latents stream decoder windows first and the first vocoder chunk after them: an
    input-caused vocoder failure (an fp16 overflow) there is a 422, as without stream=true, not a
    200 whose body is then cut off."""
    from recon_runtime.errors import NumericalError

    class VocoderOverflows:
        def __init__(self, inner: Any):
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def run_windows(self, roles: Any, windows: Any) -> Any:
            if "vocoder" in tuple(roles):
                raise NumericalError("vocoder graph output contains NaN or inf at fp16", True)
            return self._inner.run_windows(roles, windows)

    srv = serve_in_process(VocoderOverflows(rec), tiny_bundle, timeout_per_audio_s=0)
    try:
        for seconds in (5.0, 20.0):  # one window (the chain in one run), and three decoder windows
            body = npy_bytes(rec.encode(tone(seconds, RATE, 250.0), RATE))
            plain = httpx.post(srv.url + "/v1/decode", content=body, timeout=60)
            with httpx.stream("POST", srv.url + "/v1/decode?stream=true", content=body, timeout=60) as r:
                r.read()
            for answer in (plain, r):
                assert answer.status_code == 422, (seconds, answer.status_code, answer.text)
                assert "NaN or inf" in answer.json()["error"]
    finally:
        srv.close()


def test_a_stream_is_budgeted_at_its_first_window_only_and_long_plain_decodes_fall_back_to_it(
    tiny_bundle: Path, rec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's later windows skip the budget (the batcher test shows they then queue past a full
    one), so a started stream is never cut off by it; the client streams what a plain decode cannot."""
    from recon_runtime.serving.batcher import WindowBatcher

    calls: list[tuple[int, bool]] = []
    real = WindowBatcher.submit_many

    def spy(self: Any, entries: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((len(entries), kwargs.get("budgeted", True)))
        return real(self, entries, *args, **kwargs)

    monkeypatch.setattr(WindowBatcher, "submit_many", spy)
    from recon_runtime.reconstructor import StreamedJob

    z = rec.encode(tone(40.0, RATE, 250.0), RATE)
    n = len(rec.decoding_job(z).windows)
    assert n >= 3
    steps = len(StreamedJob(rec.decoding_job(z)).steps)  # the decoder windows and the vocoder chunks
    srv = serve_in_process(rec, tiny_bundle, max_batch=1, max_wait_ms=0, max_windows=1)
    try:
        with Client(srv.url, timeout=60) as c:
            wave = np.concatenate(list(c.decode_stream(z)))
        assert rel_l2(wave, rec.decode(z)) <= REL
        # its first run is checked against the budget; the later ones are queued whatever it is
        assert calls == [(1, True)] + [(1, False)] * (steps - 1), calls
        # the same latents without stream=true need n windows at once: 413, with the advice to stream
        r = httpx.post(srv.url + "/v1/decode", content=npy_bytes(z), timeout=60)
        assert r.status_code == 413 and "stream=true" in r.json()["error"], r.text
        # which the client (and so `recon-run decode --server`) follows by itself
        with Client(srv.url, timeout=60) as c:
            assert rel_l2(c.decode(z, gain=0.5), rec.decode(z) * np.float32(0.5)) <= REL
    finally:
        srv.close()


def test_a_stream_gives_its_admission_slot_back_even_when_its_body_never_starts() -> None:
    import asyncio

    from starlette.requests import ClientDisconnect

    from recon_runtime.serving.routes import ReleasingStream

    closed: list[bool] = []
    started: list[bool] = []

    async def body() -> Any:
        started.append(True)
        yield b"never"

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        raise OSError("the client went away")

    stream = ReleasingStream(body(), lambda: closed.append(True), media_type="application/octet-stream")
    with pytest.raises((OSError, ClientDisconnect)):  # Starlette turns the OSError into ClientDisconnect
        asyncio.run(stream({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    assert closed == [True] and started == []


def test_a_client_that_gives_up_takes_its_windows_out_of_the_queue(tiny_bundle: Path, rec: Any) -> None:
    gated = Gated(rec)
    srv = serve_in_process(gated, tiny_bundle, max_batch=1, max_wait_ms=0)
    try:
        clip = tone(40.0, 8000)
        n = len(rec.reconstruction_job(rec.features(clip, 8000)).windows)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its first window is held
            httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(clip, 8000, "PCM_16"), timeout=1.0)
        m = wait_for_metric(srv.url, "recon_requests_total", 1, route="/v1/reconstruct", status="499")
        assert metric(m, "recon_requests_total", route="/v1/reconstruct", status="499") == 1, m
        assert metric(m, "recon_queue_depth") == 0
        gated.release.set()
        r = httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(tone(0.2)), timeout=30)
        assert r.status_code == 200
        assert gated.windows <= 2 < n + 1, f"{gated.windows} windows ran, the request that left had {n}"
        m = httpx.get(srv.url + "/metrics", timeout=10).text
        assert (
            metric(m, "recon_requests_total", status="503") == 0
            and metric(m, "recon_requests_total", status="504") == 0
        )
    finally:
        gated.release.set()
        srv.close()


def test_a_full_server_answers_503_before_the_body_and_a_stalled_upload_gets_408(tiny_bundle: Path, rec: Any) -> None:
    gated = Gated(rec)  # the admitted request's window is held: the queue stays full until the test lets it go
    srv = serve_in_process(gated, tiny_bundle, max_queue=1, body_timeout_s=1.5)
    head = b"POST /v1/reconstruct HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: 100000\r\n\r\n"
    result: dict[str, Any] = {}
    admitted = threading.Thread(
        target=lambda: result.setdefault(
            "r", httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(tone(0.2)), timeout=60)
        )
    )
    try:
        admitted.start()
        assert gated.entered.wait(30), "the first request never ran"
        m = wait_for_metric(srv.url, "recon_requests_in_flight", 1)
        assert metric(m, "recon_requests_in_flight") == 1, m
        # headers that ask before sending the body: answered 503 without waiting for it (had the server
        # waited, its answer would be the body timeout's 408)
        answer = raw_exchange(srv.port, head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"), 30)
        text = answer.decode(errors="replace")
        assert text.startswith("HTTP/1.1 503") and "busy" in text and "100 Continue" not in text, text
        # a client that sends its body at once reads the refusal once the server has discarded it
        answer = raw_exchange(srv.port, head + b"\0" * 100000, 30).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 503") and "busy" in answer, answer
        gated.release.set()
        admitted.join(60)
        assert result["r"].status_code == 200, result["r"].text
        # an upload that stalls is not admitted: it gets its 408 once --body-timeout-s has passed
        answer = raw_exchange(srv.port, head + b"RIFF", 30).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 408") and "1.5 s" in answer, answer
        r = httpx.post(srv.url + "/v1/reconstruct", content=wav_bytes(tone(0.2)), timeout=30)
        assert r.status_code == 200
    finally:
        gated.release.set()
        srv.close()


def test_a_window_that_fails_mid_stream_aborts_the_stream(tiny_bundle: Path, rec: Any) -> None:
    from recon_runtime.reconstructor import StreamedJob

    z = rec.encode(tone(40.0, RATE, 250.0), RATE)
    job = rec.decoding_job(z)
    assert len(job.windows) >= 4
    steps = StreamedJob(job).steps
    first_chunk = next(i for i, (j, _) in enumerate(steps) if j is not job)
    assert first_chunk + 1 < len(steps)
    gated = Gated(
        rec, free=10**6, fail_at=first_chunk + 1
    )  # the run after the first vocoder chunk fails, its part sent
    srv = serve_in_process(gated, tiny_bundle)
    try:
        got = []
        with pytest.raises(httpx.HTTPError):  # a truncated chunked body, never a clean end
            with httpx.stream(
                "POST", srv.url + "/v1/decode", params={"stream": "true"}, content=npy_bytes(z), timeout=30
            ) as r:
                assert r.status_code == 200
                for part in r.iter_raw():
                    got.append(part)
        assert got, "the first parts were sent"
        m = wait_for_metric(srv.url, "recon_requests_total", 1, route="/v1/decode", status="500")
        assert metric(m, "recon_requests_total", route="/v1/decode", status="500") == 1
        assert metric(m, "recon_requests_total", route="/v1/decode", status="200") == 0
        assert httpx.get(srv.url + "/readyz", timeout=10).status_code == 200
    finally:
        srv.close()


def test_parsing_and_encoding_run_off_the_event_loop(
    tiny_bundle: Path, rec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Multipart parsing, .npy loading and checks, WAV/.npy/PCM encoding never run on the event loop
    (a 57 MB multipart upload stalled /healthz for 0.3-0.7 s when they did)."""
    import asyncio

    from recon_runtime.serving import inputs, routes

    on_loop: list[str] = []

    def off_loop(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop.append(name)
            except RuntimeError:
                pass
            return fn(*args, **kwargs)

        return wrapper

    for module, name in (
        (inputs, "multipart_file"),
        (routes, "wav_bytes"),
        (routes, "npy_bytes"),
        (routes, "_pcm_bytes"),
        (inputs, "latents"),
    ):
        monkeypatch.setattr(module, name, off_loop(name, getattr(module, name)))
    srv = serve_in_process(rec, tiny_bundle, max_body_mb=64)
    try:
        clip = tone(0.5, RATE, 330.0)
        z = rec.encode(tone(12.0, RATE, 250.0), RATE)
        with Client(srv.url, timeout=60) as c:
            c.reconstruct(clip, RATE)
            c.encode(clip, RATE)
            c.decode(z)
            assert len(list(c.decode_stream(z))) >= 2
        r = httpx.post(srv.url + "/v1/decode", files={"file": ("z.npy", npy_bytes(z), "application/x-npy")}, timeout=60)
        assert r.status_code == 200
        assert on_loop == [], f"ran on the event loop: {sorted(set(on_loop))}"

        # and /healthz answers while a large multipart body is parsed (a generous bound: it is timing)
        done = threading.Event()
        latencies: list[float] = []

        statuses: list[int] = []

        def probe() -> None:
            with httpx.Client(timeout=bound(1.0)) as c:
                while not done.is_set():
                    t0 = time.perf_counter()
                    statuses.append(c.get(srv.url + "/healthz").status_code)
                    latencies.append(time.perf_counter() - t0)
                    time.sleep(0.01)

        t = threading.Thread(target=probe)
        t.start()
        try:
            body = {"file": ("z.npy", b"\x93NUMPY" + b"\0" * (48 * 2**20), "application/x-npy")}
            r = httpx.post(srv.url + "/v1/decode", files=body, timeout=60)
        finally:
            done.set()
            t.join(30)
        assert r.status_code == 400, r.text
        # answered meanwhile; the bound is generous (a busy machine), the on_loop check above is the exact one
        assert latencies and set(statuses) == {200}, statuses
        assert max(latencies) < 5.0, f"/healthz stalled {max(latencies):.3f} s"
    finally:
        srv.close()


def test_bucket_frames_is_an_opt_in_that_equals_the_bucketed_runtime(tiny_bundle: Path) -> None:
    from recon_runtime import Reconstructor
    from recon_runtime.serving.app import create_app
    from recon_runtime.serving.config import ServerConfig

    kw = {"provider": "cpu", "precision": "fp32", "threads": 1}
    bucketed = Reconstructor.load(tiny_bundle, bucket_frames=128, **kw)
    srv = _Threaded(create_app(ServerConfig(model=str(tiny_bundle), bucket_frames=128, warmup=False, **kw)))
    try:
        c = Client(srv.url, timeout=60)
        end = time.monotonic() + 60
        while not c.ready():
            assert time.monotonic() < end
            time.sleep(0.05)
        assert c.info()["bucket_frames"] == 128
        clip = tone(0.6, RATE, 330.0)
        assert rel_l2(c.encode(clip, RATE), bucketed.encode(clip, RATE)) <= REL
        c.close()
    finally:
        srv.close()
    with pytest.raises(ValueError, match="bucket_frames"):
        ServerConfig(bucket_frames=130)


def test_sigterm_exits_non_zero_when_the_grace_period_cuts_requests_off(tiny_bundle: Path, tmp_path: Path) -> None:
    s = Server(tiny_bundle, tmp_path, "--grace-s", "0.5", "--max-batch", "1")
    result: dict[str, Any] = {}

    def slow() -> None:
        try:
            result["r"] = httpx.post(
                s.url + "/v1/reconstruct", content=wav_bytes(tone(120.0, 4000), 4000, "PCM_16"), timeout=60
            )
        except httpx.HTTPError as e:
            result["r"] = e

    t = threading.Thread(target=slow)
    try:
        sigterm_while_in_flight(s, t)
        assert s.proc.wait(30) == 3, s.log.read_text()
        t.join(30)
    finally:
        s.stop()
    assert "cut off 1 request" in s.log.read_text()
    r = result["r"]  # the request that was cut off reads why, as JSON (uvicorn's own answer is a plain-text 500)
    assert isinstance(r, httpx.Response), r
    assert r.status_code == 503 and r.headers["retry-after"] and "shutting down" in r.json()["error"], r.text


def test_the_client_raises_server_errors_with_the_status(server: Server) -> None:
    with server.client() as c:
        with pytest.raises(ServerError) as e:
            c.reconstruct(b"not audio")
        assert e.value.status == 400 and "not a readable audio file" in str(e.value)
    with Client(server.url) as c:
        with pytest.raises(ServerError) as e:
            c.info()
        assert e.value.status == 401


def test_config_from_the_environment_for_hosts_without_the_cli() -> None:
    from recon_runtime.serving.config import ServerConfig

    env = {"RECON_MODEL": "/m", "RECON_MAX_BATCH": "2", "RECON_MAX_WAIT_MS": "5.5", "RECON_THREADS": "3"}
    env |= {"RECON_API_KEY_ENV": "MY_KEY", "MY_KEY": "k1", "RECON_MAX_WINDOWS": "40"}
    c = ServerConfig.from_env(env)
    assert (c.model, c.max_batch, c.max_wait_ms, c.threads, c.api_key) == (Path("/m"), 2, 5.5, 3, "k1")
    assert c.max_windows == 40 and ServerConfig().max_windows is None
    c = ServerConfig.from_env(
        {"RECON_HEADER_TIMEOUT_S": "2.5", "RECON_MIN_UPLOAD_RATE": "0", "RECON_SEND_TIMEOUT_S": "7"}
    )
    assert (c.header_timeout_s, c.min_upload_rate, c.send_timeout_s) == (2.5, 0.0, 7.0)
    with pytest.raises(ValueError, match="header_timeout_s"):
        ServerConfig(header_timeout_s=0)
    with pytest.raises(ValueError, match="min_upload_rate"):
        ServerConfig(min_upload_rate=-1)
    assert ServerConfig.from_env({}) == ServerConfig()
    with pytest.raises(ValueError, match="MY_KEY"):
        ServerConfig.from_env({"RECON_API_KEY_ENV": "MY_KEY"})
    with pytest.raises(ValueError):
        ServerConfig(max_queue=0)
    with pytest.raises(ValueError, match="max_windows"):
        ServerConfig(max_windows=0)


def test_environment_values_are_parsed_strictly_and_refused_by_name(caplog: pytest.LogCaptureFixture) -> None:
    """RECON_CUDA_GRAPH=on and "True " silently became False (only 1/true/yes counted), a bad number
    raised Python's own message without the variable, nothing set a None default back, NaN passed
    every check (`--min-upload-rate nan` made every upload a 408), and RECON_API_KEY did nothing."""
    from recon_runtime.serving.config import ServerConfig

    for raw, want in [("on", True), ("True ", True), ("YES", True), ("1", True), (" off", False), ("No", False)]:
        assert ServerConfig.from_env({"RECON_CUDA_GRAPH": raw}).cuda_graph is want, raw
        assert ServerConfig.from_env({"RECON_COMPILE_CACHE": raw}).compile_cache is want, raw
    for raw in ("2", "enabled", ""):
        with pytest.raises(ValueError, match=f"RECON_CUDA_GRAPH={raw}: not a boolean"):
            ServerConfig.from_env({"RECON_CUDA_GRAPH": raw})
    with pytest.raises(ValueError, match="RECON_MAX_WAIT_MS=abc: not a number"):
        ServerConfig.from_env({"RECON_MAX_WAIT_MS": "abc"})
    with pytest.raises(ValueError, match="RECON_MAX_QUEUE=1.5: not a whole number"):
        ServerConfig.from_env({"RECON_MAX_QUEUE": "1.5"})
    for var in ("RECON_MIN_UPLOAD_RATE", "RECON_MAX_WAIT_MS", "RECON_TIMEOUT_S"):
        for raw in ("nan", "inf", "-inf"):
            with pytest.raises(ValueError, match=f"{var}={raw}: not a finite number"):
                ServerConfig.from_env({var: raw})
    for name in ("min_upload_rate", "max_wait_ms", "timeout_s", "send_timeout_s", "max_response_mb"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            ServerConfig(**{name: float("nan")})
    for raw in ("", "none", "None"):  # back to the default None
        c = ServerConfig.from_env({"RECON_MAX_WINDOWS": raw, "RECON_THREADS": raw, "RECON_MAX_BATCH": raw})
        assert (c.max_windows, c.threads, c.max_batch) == (None, None, None), raw
    with caplog.at_level("WARNING", logger="recon_runtime.serving"):
        assert ServerConfig.from_env({"RECON_API_KEY": "secret"}).api_key is None
    assert any("RECON_API_KEY_ENV" in r.getMessage() for r in caplog.records), caplog.records
    caplog.clear()
    with caplog.at_level("WARNING", logger="recon_runtime.serving"):
        c = ServerConfig.from_env({"RECON_API_KEY": "secret", "RECON_API_KEY_ENV": "RECON_API_KEY"})
    assert c.api_key == "secret" and not caplog.records


def test_serve_refuses_a_missing_bundle_or_key_in_one_line(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("recon-run"))
    r = subprocess.run([exe, "serve", "--model", str(tmp_path / "nope"), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0 and "nope" in r.stderr and "Traceback" not in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "UNSET_KEY_VAR"}
    r = subprocess.run([exe, "serve", "--model", str(tmp_path), "--api-key-env", "UNSET_KEY_VAR"],
                       capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert r.returncode != 0 and "UNSET_KEY_VAR" in r.stderr and "Traceback" not in r.stderr
