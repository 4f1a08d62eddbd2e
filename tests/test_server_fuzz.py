"""Hostile input against a real `recon-run serve` on 127.0.0.1: no answer is a 5xx, every error is JSON.

Seeded and bounded (FUZZ_CASES requests, at most FUZZ_SECONDS): every endpoint (/v1/reconstruct,
/v1/encode, /v1/decode with and without stream=true, /v1/compare, /v1/info, /readyz, /healthz, /metrics, the page), with random
bytes, truncated and corrupted WAV/FLAC/.npy/encoded-audio files, NaN/inf and overflowing values, lying .npy headers,
multipart bodies with and without the `file` field, /v1/compare forms of good, mutated and hostile pairs,
wrong content types, bad query values (also
output rates that multiply the answer past --max-response-mb), no or a wrong API key, and, on raw
sockets, huge and malformed request heads, oversized, chunked and lying Content-Length bodies, bodies
sent after `Expect: 100-continue` (HTTP/1.0 and 1.1), WebSocket handshakes, and clients that never
read their answers. A second server is stopped while requests are in flight. A failure names the
seed's case so it can be replayed.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from recon_runtime.encoded import ENCODED_MEDIA_TYPE, EncodedAudio

from .conftest import tone
from .test_server import (
    KEY,
    MISSING,
    Server,
    metric,
    npy_bytes,
    npy_claiming,
    read_until_closed,
    wav_bytes,
    wav_with_rate,
)

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"server tests need the `serve` extra ({', '.join(MISSING)} missing)"
)

if not MISSING:
    import h11
    import httpx

SEED = 20261201
FUZZ_CASES = 1000
FUZZ_SECONDS = 180.0
MIN_CASES = 100  # a run that got through fewer than this (a very slow machine) proves too little
BODY_LIMIT_MB = 1
RESPONSE_LIMIT_MB = 16  # 30 s (--max-seconds) at 384 kHz is 44 MiB: output_rate can ask past it
HEADER_TIMEOUT_S = 2.0
RAW_TIMEOUT_S = 20.0

PATHS = (
    "/v1/reconstruct", "/v1/encode", "/v1/decode", "/v1/decode?stream=true", "/v1/compare", "/v1/info",
    "/readyz", "/healthz", "/metrics", "/", "/index.html", "/static/app.js", "/docs/assets/swagger-ui.css",
)  # fmt: skip
MOUNTS = {"/static": "/static/app.js", "/docs/assets": "/docs/assets/swagger-ui.css"}  # a file of each
QUERY_VALUES_COLUMNS = ["0", "1", "2048", "8193", "abc", "-3"]
QUERY_VALUES = {
    "output_rate": ["", "abc", "-1", "0", "999", "8000", "48000", "1e9", "nan", "384000", "384001"],
    "subtype": ["float", "pcm16", "mp3", "", "FLOAT"],
    "sample": ["true", "false", "maybe", "1", ""],
    "seed": ["-1", "0", "7", str(2**63), str(2**64), "abc", "1.5"],
    "num_samples": ["0", "-5", "1", "10", "1e3", "abc", str(2**70)],
    "gain": ["nan", "inf", "-inf", "-1", "0", "0.5", "1e6", "1e39", "abc"],
    "stream": ["true", "false", "yes", "2", ""],
    "columns": QUERY_VALUES_COLUMNS,
    "format": ["npy", "encoded", "wav", ""],
}
CONTENT_TYPES = [
    None, "audio/wav", "application/octet-stream", "application/x-npy", "text/plain", "application/json",
    "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=zzz",
    ENCODED_MEDIA_TYPE, ENCODED_MEDIA_TYPE + "; charset=utf-8",
]  # fmt: skip
ACCEPTS = ["*/*", ENCODED_MEDIA_TYPE, f"{ENCODED_MEDIA_TYPE};q=0", f"audio/wav, {ENCODED_MEDIA_TYPE};q=abc", ";;,"]


@pytest.fixture(scope="module")
def target(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(
        tiny_bundle, tmp_path_factory.mktemp("fuzz"),
        "--max-body-mb", str(BODY_LIMIT_MB), "--max-seconds", "30", "--max-decoded-mb", "4", "--timeout-s", "30",
        "--header-timeout-s", str(HEADER_TIMEOUT_S), "--max-response-mb", str(RESPONSE_LIMIT_MB),
        api_key=True,
    )  # fmt: skip
    yield s
    assert s.stop() == 0, s.log.read_text()


# ---------------------------------------------------------------------- inputs
def seeds() -> dict[str, bytes]:
    """Valid uploads of every kind, to be mutated."""
    rng = np.random.default_rng(SEED)
    flac = io.BytesIO()
    sf.write(flac, tone(0.4, 22050, 300.0), 22050, format="FLAC", subtype="PCM_16")
    ogg = io.BytesIO()
    sf.write(ogg, tone(0.4, 16000, 500.0), 16000, format="OGG", subtype="VORBIS")
    return {
        "wav": wav_bytes(tone(0.5, 16000, 440.0)),
        "wav16": wav_bytes(tone(0.3, 8000, 300.0), 8000, "PCM_16"),
        "stereo": wav_bytes(np.stack([tone(0.3), tone(0.3, freq=220.0)], axis=1)),
        "flac": flac.getvalue(),
        "ogg": ogg.getvalue(),
        "npy": npy_bytes(rng.standard_normal((8, 20, 16)).astype(np.float32)),
        "npy16": npy_bytes(rng.standard_normal((8, 9, 16)).astype(np.float16)),
    }


def hostile_values(rng: np.random.Generator) -> bytes:
    """Audio or latents that are finite but extreme, or not finite at all."""
    value = rng.choice([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e30, 1e-45, 0.0, 65504.0, 1e5])
    if rng.random() < 0.5:
        n = int(rng.integers(1, 4000))
        data = np.full(n, value, np.float32)
        if rng.random() < 0.5:
            data = data * np.sign(rng.standard_normal(n)).astype(np.float32)
        return wav_bytes(data, int(rng.choice([8000, 16000, 22050, 44100])))
    frames = int(rng.integers(1, 40))
    z = rng.standard_normal((8, frames, 16)).astype(np.float32)
    z[:, int(rng.integers(0, frames)) :] = value
    dtype = rng.choice([np.float16, np.float32, np.float64])
    with np.errstate(over="ignore", invalid="ignore"):
        z = z.astype(dtype) if dtype != np.float64 else z.astype(np.float64) * (1e300 if value == 3.4e38 else 1)
    return npy_bytes(z)


def lying_npy(rng: np.random.Generator) -> bytes:
    shapes = [
        (8, 10**8, 16),
        (8, 3 * 10**7, 16),
        (8, 100, 16),
        (8, 0, 16),
        (0,),
        (8, 5, 15),
        (2**40, 2**40),
        (8, -1, 16),
    ]
    shape = shapes[int(rng.integers(0, len(shapes)))]
    dtype = str(rng.choice(["<f4", ">f8", "<f2", "<i4", "|O", "<c8", "|V8", "<U4"]))
    if rng.random() < 0.3:  # the header itself cut off, then junk (numpy's parser raised tokenize errors)
        claim = npy_claiming(shape, data=0, dtype=dtype)
        return claim[: int(rng.integers(8, len(claim)))] + rng.bytes(int(rng.integers(0, 300)))
    return npy_claiming(shape, data=int(rng.integers(0, 6000)), dtype=dtype)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    kind = rng.integers(0, 5)
    if kind == 0:  # truncated
        return data[: int(rng.integers(0, len(data)))]
    if kind == 1:  # bytes flipped
        b = bytearray(data)
        for i in rng.integers(0, len(b), size=int(rng.integers(1, 32))):
            b[i] = int(rng.integers(0, 256))
        return bytes(b)
    if kind == 2:  # the header kept, the rest random
        cut = min(len(data), int(rng.integers(4, 128)))
        return data[:cut] + rng.bytes(int(rng.integers(0, 4000)))
    if kind == 3:  # appended junk
        return data + rng.bytes(int(rng.integers(1, 2000)))
    return rng.bytes(int(rng.integers(0, 5000)))  # random bytes


def multipart(body: bytes, rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    """httpx arguments for a multipart upload: the `file` field, another name, two files or a text field."""
    kind = rng.integers(0, 4)
    if kind == 0:
        return {"files": {"file": ("x.bin", body, "application/octet-stream")}}, {}
    if kind == 1:
        return {"files": {"audio": ("x.wav", body, "audio/wav")}}, {}
    if kind == 2:
        return {"files": [("file", ("a", body, "audio/wav")), ("file", ("b", body, "audio/wav"))]}, {}
    return {"data": {"file": body[:200].decode("latin-1")}}, {}


COMPARE_FIELDS = ("original", "reconstruction")
COMPARE_SHARE = 0.7  # of the cases sent to /v1/compare: its form (the rest: the other makers' bodies)


COMPARE_KINDS = 11


def compare_form(
    rng: np.random.Generator, pairs: dict[str, tuple[bytes, bytes]], kind: int | None = None
) -> dict[str, Any]:
    """httpx arguments for /v1/compare: originals and the reconstructions /v1/reconstruct gave for
    them, good, mutated or hostile, in the fields `original` and `reconstruction` (both, one, swapped,
    twice, a text field), at wrong rates, of lengths that do not match, past the body limit. `kind`
    (0..COMPARE_KINDS - 1) picks the form, else a random one."""
    names = list(pairs)
    original, rebuilt = pairs[str(rng.choice(names))]
    other = pairs[str(rng.choice(names))][1]
    kind = int(rng.integers(0, COMPARE_KINDS)) if kind is None else kind
    fields: list[tuple[str, bytes]]
    if kind == 0:  # a good pair: decoded and compared
        fields = [("original", original), ("reconstruction", rebuilt)]
    elif kind == 1:
        fields = [("original", mutate(original, rng)), ("reconstruction", rebuilt)]
    elif kind == 2:
        fields = [("original", original), ("reconstruction", mutate(rebuilt, rng))]
    elif kind == 3:  # one of the two
        name = str(rng.choice(COMPARE_FIELDS))
        fields = [(name, original if name == "original" else rebuilt)]
    elif kind == 4:  # swapped
        fields = [("original", rebuilt), ("reconstruction", original)]
    elif kind == 5:  # finite but extreme values, or not finite, in one or both
        a, b = (hostile_values(rng) if rng.random() < 0.6 else x for x in (original, rebuilt))
        fields = [("original", a), ("reconstruction", b)]
    elif kind == 6:  # a sample rate that makes its length another, or that no reader takes
        rate = int(rng.choice([1, 999, 8000, 22050, 44100, 384001, 2**31 - 1]))
        patched = wav_with_rate(rebuilt, rate) if rebuilt[12:16] == b"fmt " else mutate(rebuilt, rng)
        fields = [("original", original), ("reconstruction", patched)]
    elif kind == 7:  # another original's reconstruction: lengths that do not match
        fields = [("original", original), ("reconstruction", other)]
    elif kind == 8:  # past the limits: the original over --max-body-mb, or a lying .npy
        big = original + rng.bytes(BODY_LIMIT_MB * 2**20 + int(rng.integers(1, 2**16)))
        fields = [("original", big if rng.random() < 0.5 else lying_npy(rng)), ("reconstruction", rebuilt)]
    elif kind == 9:  # a field twice, and one more
        fields = [("original", original), ("original", other), ("reconstruction", rebuilt), ("extra", b"x")]
    else:  # a text field where a file belongs
        return {
            "files": {"original": ("in.wav", original, "audio/wav")},
            "data": {"reconstruction": rebuilt[:200].decode("latin-1")},
        }
    ctypes = ["audio/wav", "application/octet-stream", "audio/flac", "text/plain"]
    return {"files": [(k, (f"{k}.wav", v, str(rng.choice(ctypes)))) for k, v in fields]}


# ---------------------------------------------------------------------- checks
def check_answer(case: str, status: int, headers: dict[str, str], body: bytes) -> None:
    assert status < 500, f"{case}: {status} {body[:300]!r}"
    if status >= 400:
        ctype = headers.get("content-type", "")
        assert ctype.startswith("application/json"), f"{case}: {status} with {ctype!r}: {body[:300]!r}"
        error = json.loads(body)["error"]
        assert error and "Traceback" not in error and "/tmp" not in error, f"{case}: {error}"


def _next_event(conn: h11.Connection) -> Any:
    try:
        return conn.next_event()
    except h11.RemoteProtocolError:  # closed without (the rest of) an answer
        return h11.ConnectionClosed()


def raw_answers(port: int, data: bytes, expect: int, half_close: bool = False) -> list[tuple[int, dict, bytes]]:
    """The responses to `data` sent on one connection, parsed with h11, until `expect` of them came,
    the server closed, or RAW_TIMEOUT_S passed."""
    conn = h11.Connection(h11.CLIENT)

    def sent_a_request() -> None:  # the raw bytes went out as they are; h11 only needs to know one did
        conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
        conn.send(h11.EndOfMessage())

    sent_a_request()
    answers: list[tuple[int, dict, bytes]] = []
    status, headers, body = 0, {}, b""
    with socket.create_connection(("127.0.0.1", port), timeout=RAW_TIMEOUT_S) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed first (it answered what it could read)
        end = time.monotonic() + RAW_TIMEOUT_S
        while len(answers) < expect and time.monotonic() < end:
            try:
                part = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            conn.receive_data(part)
            while (event := _next_event(conn)) not in (h11.NEED_DATA, h11.PAUSED):
                if isinstance(event, h11.Response):
                    status, headers = event.status_code, {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    answers.append((status, headers, body))
                    status, headers, body = 0, {}, b""
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        break  # the server closes after this answer
                    conn.start_next_cycle()
                    sent_a_request()
                elif isinstance(event, h11.ConnectionClosed):
                    break
            if not part:
                break
    return answers


def raw_cases(rng: np.random.Generator, good: dict[str, bytes]) -> list[tuple[str, bytes, bool, int]]:
    """(name, bytes, half-close, answers) for what only a raw socket can send: how many answers must come
    (a half-closed connection may get none: the server sees its client gone)."""
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    post = b"POST /v1/reconstruct HTTP/1.1\r\nHost: x\r\n" + auth
    wav = good["wav"]
    over = b"\0" * (BODY_LIMIT_MB * 2**20 + 2**20)
    expect = b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(over)
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    upgrade += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    long_wav = wav_bytes(tone(29.0, 4000), 4000, "PCM_16")  # 29 s: at 384 kHz float, 42 MiB to answer
    amplified = b"POST /v1/reconstruct?output_rate=384000 HTTP/1.1\r\nHost: x\r\n" + auth
    return [
        ("huge header", post + b"X-Big: " + b"a" * 20_000 + b"\r\nContent-Length: 0\r\n\r\n", False, 1),
        ("many headers", post + b"".join(b"X-%d: v\r\n" % i for i in range(3000)) + b"\r\n", False, 1),
        ("garbage head", rng.bytes(300) + b"\r\n\r\n", False, 1),
        ("bad request line", b"GET\r\n\r\n", False, 1),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False, 1),
        ("NUL in a header", post + b"Content-Type: audio/wav\0x\r\nContent-Length: 4\r\n\r\nRIFF", False, 1),
        ("no Host", b"POST /v1/reconstruct HTTP/1.1\r\n" + auth + b"Content-Length: 4\r\n\r\nRIFF", False, 1),
        ("bad Content-Length", post + b"Content-Length: abc\r\n\r\n", False, 1),
        ("negative Content-Length", post + b"Content-Length: -5\r\n\r\n", False, 1),
        ("two Content-Lengths", post + b"Content-Length: 4\r\nContent-Length: 9\r\n\r\nRIFF", False, 1),
        ("Content-Length over the limit", post + b"Content-Length: %d\r\n\r\n" % (BODY_LIMIT_MB * 2**20 + 1), True, 0),
        ("Content-Length of 2**70", post + b"Content-Length: %d\r\n\r\n" % 2**70 + wav[:100], True, 0),
        ("Content-Length longer than the body", post + b"Content-Length: %d\r\n\r\n" % (len(wav) + 999) + wav, True, 0),
        ("Content-Length longer than the body, then silence",
         post + b"Content-Length: %d\r\n\r\n" % (len(wav) + 999) + wav, False, 1),  # 408 (--min-upload-rate)
        ("Content-Length over the limit, no body", post + b"Content-Length: %d\r\n\r\n" % (2 * 2**20), False, 1),
        ("Content-Length shorter than the body", post + b"Content-Length: 100\r\n\r\n" + wav, False, 2),
        ("chunked over the limit", post + b"Transfer-Encoding: chunked\r\n\r\n"
         + b"".join(b"100000\r\n" + b"\0" * 2**20 + b"\r\n" for _ in range(2)) + b"0\r\n\r\n", False, 1),
        ("bad chunk size", post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nRIFF\r\n0\r\n\r\n", False, 1),
        ("chunked and Content-Length", post + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", False, 1),
        ("Expect with a body over the limit", post + b"Expect: 100-continue\r\nContent-Length: 99999999\r\n\r\n", False, 1),
        ("truncated head", post + b"Content-Le", True, 0),
        ("non-ASCII path", b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", False, 1),
        ("pipelined", (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") * 3, False, 3),
        ("Expect, then the body anyway", post + expect + over, False, 1),
        ("Expect, then the body anyway, HTTP/1.0", post.replace(b"HTTP/1.1", b"HTTP/1.0") + expect + over, False, 1),
        ("Expect on an unknown route, then the body", b"POST /nope HTTP/1.1\r\nHost: x\r\n" + auth + expect + over, False, 1),
        ("WebSocket handshake", b"GET /v1/info HTTP/1.1\r\nHost: x\r\n" + upgrade, False, 1),
        ("WebSocket handshake with the key", b"GET /v1/info HTTP/1.1\r\nHost: x\r\n" + auth + upgrade, False, 1),
        ("WebSocket handshake on no route", b"GET /ws HTTP/1.1\r\nHost: x\r\n" + auth + upgrade, False, 1),
        ("output_rate past --max-response-mb", amplified + b"Content-Length: %d\r\n\r\n" % len(long_wav) + long_wav,
         False, 1),
    ]  # fmt: skip


# ---------------------------------------------------------------------- the test
def test_no_hostile_request_gets_a_5xx_or_an_error_that_is_not_json(target: Server) -> None:
    rng = np.random.default_rng(SEED)
    good = seeds()
    good["latents"] = target.post("/v1/encode", good["wav"]).content  # what an encode really writes
    pairs = {}  # originals and what /v1/reconstruct gave for them
    for name in ("wav", "wav16", "stereo", "flac", "ogg"):
        r = target.post("/v1/reconstruct", good[name])
        assert r.status_code == 200, (name, r.text)
        pairs[name] = (good[name], r.content)
    compared: list[int] = []
    encoded = target.post("/v1/encode", good["stereo"], params={"format": "encoded"}).content
    good["encoded"] = encoded  # the encoded-audio file, and one of two channels (`--channels each`)
    good["encoded2"] = EncodedAudio.stack([EncodedAudio.from_bytes(encoded)] * 2).to_bytes()
    makers: list[Callable[[], bytes]] = [
        lambda: good[str(rng.choice(list(good)))],
        lambda: mutate(good[str(rng.choice(list(good)))], rng),
        lambda: hostile_values(rng),
        lambda: lying_npy(rng),
        lambda: rng.bytes(int(rng.integers(0, 3000))),
        lambda: b"",
        lambda: rng.bytes(BODY_LIMIT_MB * 2**20 + int(rng.integers(1, 2**20))),  # over --max-body-mb
    ]
    before = target.metrics()  # /readyz answered 503 while the model loaded
    started = time.monotonic()
    done = 0
    with httpx.Client(timeout=60) as client:
        for done in range(FUZZ_CASES):
            if time.monotonic() - started > FUZZ_SECONDS:
                break
            path = str(rng.choice(PATHS))
            body = makers[int(rng.integers(0, len(makers)))]()
            params = {k: str(rng.choice(v)) for k, v in QUERY_VALUES.items() if rng.random() < 0.15}
            headers = {"Authorization": f"Bearer {KEY}"}
            if rng.random() < 0.05:
                headers["Authorization"] = str(rng.choice(["", "Bearer", f"Basic {KEY}", "Bearer wrong"]))
            if rng.random() < 0.15:
                headers["Accept"] = str(rng.choice(ACCEPTS))
            kwargs: dict[str, Any] = {"content": body}
            form = path == "/v1/compare" and rng.random() < COMPARE_SHARE
            if form:
                kwargs = compare_form(rng, pairs)
            elif rng.random() < 0.15:
                kwargs, _ = multipart(body, rng)
            else:
                ctype = CONTENT_TYPES[int(rng.integers(0, len(CONTENT_TYPES)))]
                if ctype is not None:
                    headers["Content-Type"] = ctype
            method = "GET" if path in ("/v1/info", "/readyz", "/healthz") and rng.random() < 0.7 else "POST"
            if method == "GET":
                kwargs = {}
            case = f"case {done} (seed {SEED}): {method} {path} {params} {headers.get('Content-Type')} {len(body)} B"
            try:
                with client.stream(method, target.url + path, params=params, headers=headers, **kwargs) as r:
                    data = b"".join(r.iter_raw())
            except httpx.RemoteProtocolError:
                # a stream that failed after its 200 is dropped without its last chunk (the metrics check
                # its status below); anything else must have an answer
                assert "stream=true" in path or params.get("stream") == "true", case
                continue
            check_answer(case, r.status_code, dict(r.headers), data)
            if form and method == "POST" and headers["Authorization"] == f"Bearer {KEY}":
                compared.append(r.status_code)
    assert done + 1 >= MIN_CASES, f"only {done + 1} cases in {FUZZ_SECONDS} s"
    for kind in range(COMPARE_KINDS):  # each form once more, however few cases the time allowed
        r = httpx.post(target.url + "/v1/compare", headers=target.headers, timeout=60, **compare_form(rng, pairs, kind))
        check_answer(f"/v1/compare form {kind}", r.status_code, dict(r.headers), r.content)
        compared.append(r.status_code)
    # the forms reached /v1/compare's decoding (400, 413), its length check (422) and its comparison (200)
    assert {200, 400, 413, 422} <= set(compared), sorted(set(compared))

    for name, data, half_close, expect in raw_cases(rng, good):
        answers = raw_answers(target.port, data, max(expect, 1), half_close=half_close)
        for status, headers, body in answers:
            check_answer(f"raw: {name}", status, headers, body)
        assert len(answers) >= expect, f"raw: {name}: {len(answers)} answers, not {expect}"

    # clients that never read their answers (each asks for a few MB), then go away
    readers_gone = []
    for _ in range(8):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(RAW_TIMEOUT_S)
        sock.connect(("127.0.0.1", target.port))
        body = good["wav"]  # 0.5 s: at 384 kHz, 768 KB to answer
        sock.sendall(
            b"POST /v1/reconstruct?output_rate=384000 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n" % (KEY.encode(), len(body)) + body
        )
        readers_gone.append(sock)
    for sock in readers_gone:
        assert sock.recv(1, socket.MSG_PEEK), "no answer began"
        sock.close()  # with most of its answer unread

    # the server is unharmed and says so: no 5xx recorded, no exception escaped the app
    assert httpx.get(target.url + "/readyz", headers=target.headers, timeout=10).status_code == 200
    r = httpx.post(target.url + "/v1/reconstruct", content=good["wav"], headers=target.headers, timeout=60)
    assert r.status_code == 200
    m = target.metrics()
    for status in map(str, range(500, 600)):
        assert metric(m, "recon_requests_total", status=status) == metric(before, "recon_requests_total", status=status)
    log = target.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-5000:]


def test_a_shutdown_mid_request_answers_what_has_not_begun_and_drops_the_rest_in_one_line(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """SIGTERM with a grace period shorter than what is in flight: a refusal still discarding its
    trickled body gets the shutdown's 503 as JSON, a stream whose client reads nothing is dropped
    with one log line, and no traceback reaches the log."""
    s = Server(tiny_bundle, tmp_path, "--grace-s", "1")
    z = np.zeros((8, 200 * 25, 16), np.float32)  # 200 s of latents: a 12.8 MB stream
    body = npy_bytes(z)
    stream = socket.socket()
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stream.settimeout(RAW_TIMEOUT_S)
    trickled = socket.create_connection(("127.0.0.1", s.port), timeout=RAW_TIMEOUT_S)
    stop = threading.Event()

    def trickle() -> None:  # a byte each 0.4 s: the refusal's drain goes on (it gives up after 1 s without one)
        while not stop.wait(0.4):
            try:
                trickled.sendall(b"x")
            except OSError:
                return

    sender = threading.Thread(target=trickle, daemon=True)
    try:
        stream.connect(("127.0.0.1", s.port))
        stream.sendall(
            b"POST /v1/decode?stream=true HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        assert stream.recv(1, socket.MSG_PEEK), "the stream never began"
        trickled.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx")
        sender.start()
        stop.wait(0.8)  # the client's pace: its next bytes go out meanwhile
        s.proc.send_signal(signal.SIGTERM)
        refusal, _ = read_until_closed(trickled, RAW_TIMEOUT_S)
        assert s.proc.wait(30) == 3, s.log.read_text()  # the grace period cut requests off
        streamed, _ = read_until_closed(stream, RAW_TIMEOUT_S)
    finally:
        stop.set()
        sender.join(10)
        stream.close()
        trickled.close()
        s.stop()
    text = refusal.decode(errors="replace")
    assert text.startswith("HTTP/1.1 503") and "application/json" in text, text
    assert "shutting down" in json.loads(text.split("\r\n\r\n", 1)[1])["error"]
    assert streamed.startswith(b"HTTP/1.1 200") and not streamed.endswith(b"0\r\n\r\n")  # no clean end
    log = s.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    assert log.count("cut off by the shutdown after its answer began") == 1, log
    assert "returned without completing response" not in log, log


def test_the_fuzzed_paths_are_every_route_of_the_app(tiny_bundle: Path) -> None:
    """A route added to the app without a place in PATHS would go unfuzzed."""
    from recon_runtime.serving.app import create_app
    from recon_runtime.serving.config import ServerConfig
    from recon_runtime.serving.edge import flat_routes

    app = create_app(ServerConfig(model=str(tiny_bundle)))
    routes = {getattr(r, "path", "") for r in flat_routes(app.routes)} - {
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
    }
    fuzzed = {p.split("?")[0] for p in PATHS}
    assert {MOUNTS.get(r, r) for r in routes} <= fuzzed, routes - fuzzed
