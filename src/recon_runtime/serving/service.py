"""HTTP service: reconstruct, encode and decode over HTTP, with window-level dynamic batching.

`create_app(config)` builds the one FastAPI app that `recon-run serve`, tests, gunicorn
(`gunicorn -k uvicorn.workers.UvicornWorker 'recon_runtime.serving.app:create_app()'`, configured from
`RECON_*` environment variables, see `ServerConfig.from_env`) and other hosts run. The model is
loaded and warmed up when the app starts (in its lifespan, on a background thread, so `/healthz`
answers while the model loads and `/readyz` says 503 until it is ready), never at import.

Every request is cut into the runtime's windows (`Reconstructor.reconstruction_job` and friends);
one worker thread per model (`batcher.WindowBatcher`) runs windows of one shape from all waiting
requests as one batch, and each request joins its own windows with the runtime's cross-fade. A
request's output therefore equals `Reconstructor.reconstruct` / `encode` / `decode` of a
Reconstructor loaded with the same settings (by default the runtime's own, `Reconstructor.load(model)`;
with `bucket_frames=N`, `Reconstructor.load(model, bucket_frames=N)`), within batch rounding.

Needs the `serve` extra (fastapi, uvicorn, prometheus-client, python-multipart); nothing imports
this module unless it serves.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import io
import json
import logging
import math
import os
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import soundfile as sf
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..contract import LATENT_CHANNELS, LATENT_DOWNSAMPLE, LATENT_FREQ_BINS, ROLES
from ..errors import AudioInputError, BundleError, NumericalError, ReconError
from ..files.audio import AudioTooLarge, read_array_bytes, read_audio_bytes
from ..options import LoadOptions
from ..windows import window_weights
from .batcher import BatchStats, DeadlineExceeded, QueueFull, ShuttingDown, WindowBatcher
from .page import is_public, mount_page
from .protocol import (
    H_CHANNELS,
    H_FINGERPRINT,
    H_FORMAT,
    H_GAIN,
    H_INPUT_RATE,
    H_LATENT_SHAPE,
    H_NUM_SAMPLES,
    H_SAMPLE_RATE,
    H_SAMPLED,
    H_SCALING,
    H_SEED,
    H_WINDOWS,
    WINDOW_BUDGET_OPTION,
)

_LOGGER = logging.getLogger(__name__)

SERVER_BUCKET_FRAMES = LATENT_DOWNSAMPLE
"""The server's default `bucket_frames`: the Reconstructor's default, so outputs equal the runtime's.
A larger multiple of 4 (e.g. 128, `--bucket-frames`) lets short clips of different lengths share batches."""
MAX_GAIN = 1e6
"""Largest `gain` /v1/decode accepts (an encode's gain is the input's peak / 0.5)."""
CLIENT_GONE = 499
"""Status recorded in the metrics for a request whose client disconnected before the answer (nginx's 499)."""
DISCONNECT_POLL_S = 0.1
STATUS_OVERRIDE = "recon.status"
"""Scope key: the status to record when it is not the one sent (a stream that failed after its start)."""
SHUTTING_DOWN = "the server is shutting down; retry shortly"
SHUTDOWN_RETRY_AFTER = {"Retry-After": "5"}
"""A stopping server's answer: another instance (or this one restarted) takes the retry."""

UPLOAD_GRACE_S = 5.0
"""An upload may lag for this long after its request head before --min-upload-rate applies (a lost
first packet is resent after 1 s, then 3 s): from then on the bytes received must keep up with
rate x (seconds since the head - this), as Apache's mod_reqtimeout counts `body=20,MinRate=500`.
Waiting for an upload slot counts against it, and a body waits for a slot at most this long (503
beyond): a request that sends nothing holds nothing for longer."""
REFUSED_BODY_DRAIN_BYTES = 64 * 2**20
"""How much of a refused request's body is read and discarded before the refusal is sent, so a client
that sends its whole body before it reads (urllib, http.client) reads the refusal instead of a reset
(closing with unread data resets the connection). 64 MiB: the default --max-body-mb, so a drain costs
no more than one accepted upload; a body that declares more is not drained (the connection closes)."""
REFUSED_BODY_DRAIN_S = 5.0
"""The longest a drain may take (nginx's lingering_timeout); past it the connection closes."""
REFUSED_BODY_IDLE_S = 1.0
"""A drain ends when nothing arrives for this long (Apache lingers 2 s per read): the client is not
sending its body but waiting for the answer, which then comes at once, closing the connection."""

RESPONSE_PART_BYTES = 2**20
"""A response body is handed to the connection in parts of this size: once the connection's buffer
is full (the client is not reading), the next part waits, so an answer is never buffered twice and
the request (with its admission slot) lasts until its last part is sent."""
ADMISSION = "recon.release"
"""Scope key: gives the request's admission slot back (called by the middleware once the answer is sent)."""
FP16_OVERFLOW = (
    "the server's fp16 graphs overflowed on this finite input: a limit of the precision the server runs, "
    "not a fault of the input; its operator can serve it with --precision fp32"
)

STREAM_MEDIA_TYPE = "application/octet-stream"
STREAM_FORMATS = {"float": "f32le", "pcm16": "s16le"}
WAV_SUBTYPES = {"float": "FLOAT", "pcm16": "PCM_16"}
WAV_BYTES = {"float": 4, "pcm16": 2}
"""Bytes per sample of each `subtype`, in a WAV and in a stream."""
NPY_MEDIA_TYPE = "application/x-npy"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
AUDIO_TOO_LONG = "send shorter audio"
DECODE_TOO_LONG = "send shorter latents, or decode with stream=true (one window at a time)"
LOAD_FAILED = "the model did not load"
"""Begins the load-failure line (log, /readyz, a Ray replica's start-up error, found there again by the CLI)."""
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass(frozen=True)
class ServerConfig(LoadOptions):
    """Everything `recon-run serve` takes; defaults as documented in docs/serving.md.

    The model options (model, backend, provider, precision, threads, max_batch, ...) are `LoadOptions`'
    fields, with the runtime's defaults: `max_batch` None is the runtime's per-device batch (8 on
    CUDA, 1 on the CPU), and the batcher runs at most the loaded Reconstructor's `max_batch`.
    """

    max_wait_ms: float = 10.0
    max_queue: int = 64
    """Requests admitted at once (their body arrived; waiting, running or sending their answer); a
    request that finds them all taken gets 503 with Retry-After, before its body if it arrives then."""
    max_windows: int | None = None
    """Windows waiting for the inference worker, all requests together: a request whose windows do not
    fit gets 503 with Retry-After, one that needs more than this on its own gets 413. None: no limit
    beyond max_queue requests of at most max_seconds each."""
    max_body_mb: float = 64.0
    max_seconds: float = 600.0
    timeout_s: float = 120.0
    api_key: str | None = None
    """The key itself (`recon-run serve --api-key-env VAR` reads it from the environment)."""
    bucket_frames: int = SERVER_BUCKET_FRAMES
    """Outputs equal `Reconstructor.load(model, bucket_frames=N)`; the default is the runtime's."""
    body_timeout_s: float = 30.0
    """The whole upload must arrive within this (408 beyond)."""
    max_uploads: int = 16
    """Uploads read at once; more wait for a slot (at most UPLOAD_GRACE_S, then 503)."""
    max_decoded_mb: float = 1024.0
    """Decoded samples (frames x channels x 4 bytes, from the header, before decoding) of one upload (413 beyond)."""
    max_response_mb: float = 128.0
    """The answer of one request (WAV, .npy or stream, from the upload's header and the query, before
    any work; 413 beyond). 128 MiB holds the longest audio accepted (max_seconds, 600 s) at 48 kHz
    float32 (110 MiB); docs/serving.md says why a bound of its own."""
    header_timeout_s: float = 10.0
    """A connection's request head (request line and headers) must arrive within this, else the
    connection is closed (408 if part of it came). Applied by `recon-run serve`'s HTTP protocol
    (`http_protocol.TimeoutsH11Protocol`); docs/serving.md says why 10 s."""
    send_timeout_s: float = 30.0
    """A connection whose client reads nothing of its answer for this long is dropped (what it held is
    freed). Applied by the same HTTP protocol; docs/serving.md says why 30 s."""
    min_upload_rate: float = 4096.0
    """Bytes per second an upload must keep up after its first UPLOAD_GRACE_S seconds (408 below,
    freeing its upload slot); 0: no minimum. docs/serving.md says why 4 KiB/s."""
    warmup: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        for name in ("max_queue", "max_uploads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError("max_windows must be at least 1")
        for name in ("max_wait_ms", "min_upload_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0")
        positive = ("max_body_mb", "max_seconds", "timeout_s", "body_timeout_s", "max_decoded_mb", "max_response_mb")
        for name in (*positive, "header_timeout_s", "send_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")
        if self.bucket_frames < LATENT_DOWNSAMPLE or self.bucket_frames % LATENT_DOWNSAMPLE:
            raise ValueError(f"bucket_frames must be a positive multiple of {LATENT_DOWNSAMPLE}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """Settings from RECON_<FIELD> for every field but api_key and warmup (RECON_MODEL,
        RECON_BACKEND, RECON_PROVIDER, RECON_PRECISION, RECON_THREADS, RECON_MAX_BATCH, RECON_MAX_WAIT_MS,
        RECON_MAX_QUEUE, RECON_MAX_WINDOWS, RECON_MAX_BODY_MB, RECON_MAX_SECONDS, RECON_TIMEOUT_S,
        RECON_BUCKET_FRAMES, RECON_BODY_TIMEOUT_S, RECON_MAX_UPLOADS, RECON_MAX_DECODED_MB,
        RECON_MAX_RESPONSE_MB, RECON_HEADER_TIMEOUT_S, RECON_SEND_TIMEOUT_S, RECON_MIN_UPLOAD_RATE,
        RECON_EXPECT_DIGEST, RECON_PERFORMANCE_HINT, RECON_COMPILE_CACHE, RECON_CUDA_GRAPH) and
        RECON_API_KEY_ENV (the name of the variable that holds the key), for hosts that build the app
        without the CLI (gunicorn).

        Booleans are 1/0, true/false, yes/no or on/off (any case); "" or "none" sets a setting whose
        default is None back to it; anything else that does not parse is refused, naming the variable.
        """
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            var = f"RECON_{f.name.upper()}"
            raw = env.get(var)
            if raw is None or f.name in ("api_key", "warmup"):
                continue
            kwargs[f.name] = _env_value(var, raw, str(f.type))
        key_var = env.get("RECON_API_KEY_ENV")
        if key_var:
            key = env.get(key_var)
            if not key:
                raise ValueError(f"RECON_API_KEY_ENV names {key_var}, which is not set or empty")
            kwargs["api_key"] = key
        elif env.get("RECON_API_KEY"):
            _LOGGER.warning(
                "RECON_API_KEY is set but not read: the server reads its key from the variable that "
                "RECON_API_KEY_ENV names (RECON_API_KEY_ENV=RECON_API_KEY to use this one); no key is required"
            )
        return cls(**kwargs)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_value(var: str, raw: str, kind: str) -> Any:
    """RECON_* variable `var`'s value `raw` as a field of type `kind` (the annotation, as written)."""
    text = raw.strip()
    if kind.endswith("| None") and text.lower() in ("", "none"):
        return None
    kind = kind.removesuffix("| None").strip()
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{var}={raw}: not a boolean (use 1/0, true/false, yes/no or on/off)")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{var}={raw}: not a whole number") from None
    if kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{var}={raw}: not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{var}={raw}: not a finite number")
        return value
    return raw


def load_failure_message(e: BaseException) -> str:
    """The one line that says why the model did not load (the user's message, or the exception's repr)."""
    return f"{LOAD_FAILED}: {e if isinstance(e, ReconError) else repr(e)}"


def error_status(e: ReconError) -> int:
    """The status of a runtime error: the client's input (400, 413, 422) or the server's fault (500).

    A non-finite result from finite input is the client's 422 only where the input's values must be
    what overflowed (`input_caused`: the graphs have float32's range, or the input is past fp16's
    own). Otherwise the server's fp16 graphs could not carry a valid input: 500, the server's fault.
    Not 503: that promises a retry may succeed, and the same server answers the same input the same
    way until its operator serves it at fp32 (the message and the server's log say so)."""
    if isinstance(e, AudioInputError):
        return 400
    if isinstance(e, PayloadTooLarge):
        return 413
    if isinstance(e, NumericalError):
        return 422 if e.input_caused else 500
    if isinstance(e, BundleError):
        return 422
    return 500


def error_message(e: ReconError) -> str:
    """What the client reads of a runtime error (an fp16 overflow says whose limit it is)."""
    if isinstance(e, NumericalError) and not e.input_caused:
        return f"{FP16_OVERFLOW} ({e})"
    return str(e)


class HTTPError(Exception):
    """A client-facing error: status, one-line message, optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class PayloadTooLarge(ReconError):
    """Body or audio over the server's limits (413)."""


class ClientGone(Exception):
    """The client disconnected while its request waited: its windows left the queue (recorded as 499)."""


class StreamAborted(Exception):
    """A streamed response failed after its status was sent: the connection is dropped without the
    final chunk, so the client sees a truncated (invalid) body, and the metrics record `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("recon_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "recon_request_seconds",
            "Request latency (to the last byte)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("recon_queue_depth", "Windows waiting for the inference worker", registry=r)
        self.in_flight = Gauge(
            "recon_requests_in_flight",
            "Requests admitted with their body and not finished (their answer not all sent)",
            registry=r,
        )
        self.receiving = Gauge("recon_requests_receiving", "Requests whose body is still arriving", registry=r)
        self.batch_size = Histogram(
            "recon_batch_size", "Windows per graph run", ["stages"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "recon_batch_seconds", "Seconds per graph run", ["stages"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.windows = Counter("recon_windows", "Windows processed", ["stages"], registry=r)
        self.audio_seconds = Counter("recon_audio_seconds", "Seconds of audio processed", ["route"], registry=r)
        self.ready = Gauge("recon_ready", "1 when the model is loaded and the warm-up ran", registry=r)

    def on_batch(self, stats: BatchStats) -> None:
        roles = stats.key[0] if isinstance(stats.key, tuple) and stats.key else ()
        stages = "+".join(roles) if isinstance(roles, tuple) else str(roles)
        if not stats.retried:  # its windows are counted again, one run each
            self.batch_size.labels(stages).observe(stats.size)
        self.batch_seconds.labels(stages).observe(stats.seconds)
        if not stats.failed:
            self.windows.labels(stages).inc(stats.size)


ReconstructorSource = Any  # a Reconstructor, a callable returning one, or None (load from the config)


class Service:
    """The loaded model, its batcher, admission and the request logic, without routes."""

    def __init__(
        self,
        config: ServerConfig,
        reconstructor: ReconstructorSource = None,
        on_load_error: Callable[[BaseException], None] | None = None,
    ):
        self.config = config
        self.metrics = _Metrics()
        self._source = reconstructor
        self._on_load_error = on_load_error
        self.rec: Any = None
        self.batcher: WindowBatcher | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.in_flight = 0
        self.receiving = 0
        self._loader: threading.Thread | None = None
        self._cpu_slots: asyncio.Semaphore | None = None
        self._upload_slots: asyncio.Semaphore | None = None
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth if self.batcher else 0)
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.metrics.receiving.set_function(lambda: self.receiving)

    # ------------------------------------------------------------------ life cycle
    @property
    def worker_stopped(self) -> bool:
        """Loaded, but the inference worker is gone (/readyz fails; Ray replaces such a replica)."""
        return self.ready.is_set() and (self.batcher is None or not self.batcher.alive)

    def start(self) -> None:
        """Load and warm up on a background thread (the server answers /healthz meanwhile)."""
        self._loader = threading.Thread(target=self._load, name="recon-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            rec = self._source() if callable(self._source) else self._source
            if rec is None:
                # the runtime's defaults unless set, the hint too: latency, measured faster than throughput
                # for the one batcher thread at 1 and 16 clients (docs/serving.md)
                rec = self.config.load(ROLES, bucket_frames=self.config.bucket_frames)
            self.rec = rec
            if self.config.max_batch not in (None, rec.max_batch):
                _LOGGER.warning(
                    "max_batch %d asked for, but the Reconstructor served runs %d: batching %d",
                    self.config.max_batch,
                    rec.max_batch,
                    rec.max_batch,
                )
            self.batcher = WindowBatcher(
                rec.run_windows,
                max_batch=rec.max_batch,  # what the served Reconstructor runs (its per-device default unless set)
                max_wait_s=self.config.max_wait_ms / 1000,
                max_windows=self.config.max_windows,
                on_batch=self.metrics.on_batch,
            )
            if self.config.warmup:
                self._warm_up(rec)
            _LOGGER.info(
                "ready in %.1f s: %s with %s graphs%s",
                time.perf_counter() - t0,
                rec.provider.upper(),
                rec.precision,
                " (RANDOM weights: output is not meaningful audio)" if rec.contract.random_weights else "",
            )
            self.metrics.ready.set(1)
            self.ready.set()
        except BaseException as e:  # noqa: BLE001 - reported to the host, which decides to exit
            self.load_error = e
            _LOGGER.error("%s", load_failure_message(e))
            if self._on_load_error is not None:
                self._on_load_error(e)

    @staticmethod
    def _warm_up(rec: Any) -> None:
        """One short reconstruction and one decode: loads every graph and runs each once."""
        rate = rec.contract.mel.sample_rate
        t = np.arange(rate, dtype=np.float32) / rate
        feats = rec.features(0.1 * np.sin(2 * np.pi * 440 * t), rate)
        rec.run_jobs([rec.reconstruction_job(feats)])
        rec.run_jobs([rec.decoding_job(np.zeros((LATENT_CHANNELS, 16, LATENT_FREQ_BINS), np.float32))])

    def stop(self, timeout: float | None = 30.0) -> None:
        if self.batcher is not None:
            self.batcher.close(drain=True, timeout=timeout)

    # ------------------------------------------------------------------ admission
    def check_capacity(self) -> None:
        """503 at once, before any body is read, when the model is not ready or --max-queue requests
        are already admitted."""
        if not self.ready.is_set():
            raise HTTPError(503, "the model is not loaded yet; retry shortly", {"Retry-After": "1"})
        if self.in_flight >= self.config.max_queue:
            raise HTTPError(
                503, f"server busy: {self.in_flight} requests in progress (limit {self.config.max_queue})",
                {"Retry-After": "1"},
            )  # fmt: skip

    def admit(self, request: Request) -> Any:
        """Count a request whose body has arrived against --max-queue (503 when they are all taken) and
        return the Reconstructor. The slot is given back when the request ends, its answer sent
        (the middleware calls the scope's ADMISSION), or by `release` on a stream's end."""
        self.check_capacity()
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        request.scope[ADMISSION] = release
        return self.rec

    # ------------------------------------------------------------------ CPU work off the event loop
    async def cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run decoding, front end, joining or encoding on the thread pool, at most one job per core at
        once: a burst of uploads must not crowd the inference worker off the cores."""
        if self._cpu_slots is None:
            self._cpu_slots = asyncio.Semaphore(max(1, os.cpu_count() or 1))
        async with self._cpu_slots:
            return await run_in_threadpool(fn, *args)

    # ------------------------------------------------------------------ input
    async def read_body(self, request: Request, *, limit: int | None = None, raw: bool = False) -> bytes:
        """The upload (raw body, or the `file` field of a multipart form), refused past `max_body_mb`
        without reading the rest. Call it after `check_capacity` (a full server answers 503 before
        any body) and before `admit` (only requests whose body arrived count against --max-queue).

        The whole body must arrive within `body_timeout_s` of now (408), and keep up with
        `min_upload_rate` after UPLOAD_GRACE_S (408). Its first part is awaited before an upload slot
        (a request that sends nothing holds none); at most `max_uploads` bodies are then read at once,
        and a body waits for its slot at most UPLOAD_GRACE_S from now (503). `limit` (bytes) replaces
        `max_body_mb`; `raw` keeps a multipart body whole (/v1/compare's two files)."""
        start = time.monotonic()
        limit = limit or int(self.config.max_body_mb * 2**20)
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise HTTPError(400, "Content-Length is not a number") from None
            if size > limit:
                raise HTTPError(
                    413, f"body of {size} bytes is over the limit of {limit} bytes", {"Connection": "close"}
                )
        if self._upload_slots is None:
            self._upload_slots = asyncio.Semaphore(self.config.max_uploads)
        reader = _BodyReader(request, limit, self.config.min_upload_rate, start, self.config.body_timeout_s)
        self.receiving += 1
        try:
            await reader.read_first()
            wait = start + UPLOAD_GRACE_S - time.monotonic()
            try:
                await asyncio.wait_for(self._upload_slots.acquire(), max(0.0, wait))
            except asyncio.TimeoutError:
                raise HTTPError(
                    503, f"server busy: {self.config.max_uploads} uploads in progress", {"Retry-After": "1"}
                ) from None
            try:
                body = await reader.read_rest()
            finally:
                self._upload_slots.release()
        finally:
            self.receiving -= 1
        if not raw and request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            body = await self.cpu(_multipart_file, request.scope, body)
        if not body:
            raise HTTPError(400, "empty body: send the file as the body or as the multipart field `file`")
        return body

    def check_response(self, samples: float, bytes_per_sample: int, what: str) -> None:
        """413 when an answer of `samples` samples (at `bytes_per_sample`) is over `max_response_mb`."""
        budget = self.config.max_response_mb * 2**20
        size = samples * bytes_per_sample
        if size > budget:
            raise PayloadTooLarge(
                f"the answer would be {size / 2**20:.0f} MiB ({what}), over the limit of {budget / 2**20:g} MiB "
                "(--max-response-mb)"
            )

    def features(self, body: bytes, answer: Callable[[float], None] | None = None) -> tuple[Any, int]:
        """Decode the uploaded audio (refusing it past `max_seconds` or `max_decoded_mb` from its
        header, before decoding) and prepare it. `answer(seconds)` refuses what the audio's answer
        would be (past `max_response_mb`), also from the header.

        Returns:
            (Features, the upload's sample rate).
        """
        limit = self.config.max_seconds

        def check(frames: int, rate: int) -> None:
            if rate > 0 and 0 < frames < 2**62 and frames / rate > limit:
                raise PayloadTooLarge(f"audio of {frames / rate:.1f} s is over the limit of {limit:g} s")
            if answer is not None and rate > 0 and 0 < frames < 2**62:
                answer(frames / rate)

        budget = int(self.config.max_decoded_mb * 2**20)
        try:
            audio, rate = read_audio_bytes(body, "uploaded audio", check, max_decoded_bytes=budget)
        except AudioTooLarge as e:
            raise PayloadTooLarge(str(e)) from None
        check(audio.shape[0], rate)  # some formats do not state their length up front
        if audio.shape[0] * self.rate < rate:  # under one sample at the model's rate
            raise AudioInputError(f"uploaded audio: {audio.shape[0]} samples at {rate} Hz is shorter than one sample")
        return self.rec.features(audio, rate), rate

    def latents(
        self, body: bytes, fingerprint: str | None, num_samples: int | None = None, bytes_per_sample: int = 4
    ) -> np.ndarray:
        """The uploaded latents, checked (run it on the CPU pool: it parses and scans the whole body),
        and their answer (at most `num_samples` samples of `bytes_per_sample`) against `max_response_mb`."""
        if fingerprint is not None and fingerprint != self.rec.contract.fingerprint:
            raise HTTPError(
                422,
                f"latents come from another model (bundle {fingerprint}, this server {self.rec.contract.fingerprint}); "
                "decode them with the bundle that encoded them",
            )

        def check(shape: tuple[int, ...], dtype: np.dtype) -> None:
            self._check_latents(shape, dtype)
            samples = shape[1] * self.samples_per_latent
            samples = min(samples, num_samples) if num_samples is not None else samples
            self.check_response(samples, bytes_per_sample, f"{samples / self.rate:.1f} s of audio")

        z = read_array_bytes(body, "uploaded latents", check)
        z = np.array(z, np.float32)  # a writable copy (the upload's bytes are read-only)
        if not np.isfinite(z).all():
            raise HTTPError(400, "latents contain NaN or inf (or values past float32's range)")
        return z

    def _check_latents(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Refuse latents from their .npy header, before their data is touched or anything allocated."""
        if len(shape) != 3 or shape[0] != LATENT_CHANNELS or shape[2] != LATENT_FREQ_BINS or shape[1] < 1:
            raise HTTPError(
                422, f"latents must be one [{LATENT_CHANNELS}, frames, {LATENT_FREQ_BINS}] array, got {list(shape)}"
            )
        if dtype.kind != "f":
            raise HTTPError(422, f"latents must be float16, float32 or float64, got {dtype}")
        seconds = shape[1] * self.samples_per_latent / self.rate
        if seconds > self.config.max_seconds:
            raise PayloadTooLarge(f"latents of {seconds:.1f} s are over the limit of {self.config.max_seconds:g} s")
        size = shape[0] * shape[1] * shape[2] * max(dtype.itemsize, 4)  # as sent, or as the float32 copy
        budget = int(self.config.max_decoded_mb * 2**20)
        if size > budget:
            raise PayloadTooLarge(
                f"latents of {size / 2**20:.0f} MiB are over the limit of {budget / 2**20:.0f} MiB (--max-decoded-mb)"
            )

    @property
    def rate(self) -> int:
        return int(self.rec.contract.mel.sample_rate)

    @property
    def samples_per_latent(self) -> int:
        from ..reconstructor import SAMPLES_PER_LATENT_FRAME

        return SAMPLES_PER_LATENT_FRAME

    # ------------------------------------------------------------------ windows
    def submit(
        self,
        job: Any,
        indices: Sequence[int],
        deadline: float,
        too_long: str = AUDIO_TOO_LONG,
        budgeted: bool = True,
    ) -> list[Future]:
        """Queue these windows of `job`: 503 when they do not fit the window budget beside those waiting,
        413 (with the advice `too_long`) when they alone exceed it. `budgeted=False`: the next window of a
        stream already admitted, queued whatever the budget (a stream is never cut off by it)."""
        assert self.batcher is not None
        budget = self.config.max_windows
        if budgeted and budget is not None and len(indices) > budget:
            raise HTTPError(
                413,
                f"this needs {len(indices)} windows at once and the server queues at most {budget} "
                f"({WINDOW_BUDGET_OPTION}): {too_long}",
            )
        try:
            return self.batcher.submit_many(
                [(job.key(i), job.roles, job.windows[i]) for i in indices], deadline, budgeted=budgeted
            )
        except QueueFull as e:
            raise HTTPError(503, f"server busy: {e}", {"Retry-After": "1"}) from None
        except ShuttingDown:
            raise HTTPError(503, SHUTTING_DOWN, SHUTDOWN_RETRY_AFTER) from None

    async def wait(self, futures: list[Future], deadline: float, request: Request | None = None) -> list[Any]:
        """Await the windows' outputs. Past the deadline their windows leave the queue and this gives 504;
        if `request`'s client disconnects meanwhile, they leave the queue and this raises ClientGone."""
        assert self.batcher is not None
        gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        watcher = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        try:
            done, _ = await asyncio.wait(
                [gathered] if watcher is None else [gathered, watcher],
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if gathered in done:
                try:
                    return gathered.result()
                except DeadlineExceeded:
                    raise HTTPError(504, self._late()) from None
                except asyncio.CancelledError:  # a window was cancelled: only at shutdown or a 504 elsewhere
                    if self.batcher.alive:
                        raise HTTPError(504, self._late()) from None
                    raise HTTPError(503, SHUTTING_DOWN, SHUTDOWN_RETRY_AFTER) from None
            if watcher is not None and watcher in done:
                raise ClientGone("the client disconnected")
            raise HTTPError(504, self._late())
        finally:
            if watcher is not None:
                watcher.cancel()
            if any(not f.done() for f in futures):  # a failure, timeout or disconnect: the rest leave the queue
                self.batcher.cancel(futures)
            gathered.cancel()
            # retrieve the outcome (no "exception was never retrieved" in the log)
            gathered.add_done_callback(lambda g: g.cancelled() or g.exception())

    def _late(self) -> str:
        return f"the request took longer than the server's limit of {self.config.timeout_s:g} s"

    async def run_job(
        self, job: Any, deadline: float, request: Request | None = None, too_long: str = AUDIO_TOO_LONG
    ) -> list[Any]:
        return await self.wait(self.submit(job, range(len(job.windows)), deadline, too_long), deadline, request)

    def deadline(self) -> float:
        return time.monotonic() + self.config.timeout_s

    async def within(self, deadline: float, work: Any) -> Any:
        """Run a coroutine under the request's deadline (504 past it)."""
        try:
            return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise HTTPError(504, self._late()) from None


class _BodyReader:
    """A request's body, refused past `limit` bytes (413), when it has not all arrived within `timeout`
    of `start` (408), or when it falls behind `min_rate` bytes/s after UPLOAD_GRACE_S from `start`
    (408: a trickling client gives its upload slot back)."""

    def __init__(self, request: Request, limit: int, min_rate: float, start: float, timeout: float):
        self._parts = request.stream().__aiter__()
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._limit = limit
        self._min_rate = min_rate
        self._start = start
        self._timeout = timeout

    async def read_first(self) -> None:
        """Wait for the body's first part (or its end)."""
        await self._next()

    async def read_rest(self) -> bytes:
        while not self._done:
            await self._next()
        return b"".join(self._chunks)

    async def _next(self) -> None:
        now = time.monotonic()
        wait = self._start + self._timeout - now
        slow = False  # whether the minimum rate, not the body timeout, is what ends the wait
        if self._min_rate:
            rate_wait = self._start + UPLOAD_GRACE_S + self._size / self._min_rate - now
            slow, wait = rate_wait < wait, min(wait, rate_wait)
        try:
            chunk = await asyncio.wait_for(self._parts.__anext__(), max(0.0, wait))
        except StopAsyncIteration:
            self._done = True
            return
        except ClientDisconnect:  # gone mid-upload: nobody to answer (recorded as 499, not an app error)
            raise ClientGone("the client disconnected during its upload") from None
        except asyncio.TimeoutError:
            if slow:
                raise HTTPError(
                    408, f"the upload fell below the server's minimum rate of {self._min_rate:g} bytes/s",
                    {"Connection": "close"},
                ) from None  # fmt: skip
            raise HTTPError(
                408, f"the body did not arrive within {self._timeout:g} s", {"Connection": "close"}
            ) from None
        self._size += len(chunk)
        if self._size > self._limit:
            raise HTTPError(413, f"body is over the limit of {self._limit} bytes", {"Connection": "close"})
        self._chunks.append(chunk)


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected (polls: the body is read, so this only sees a disconnect)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def _multipart_file(scope: dict[str, Any], body: bytes) -> bytes:
    """The `file` field of a multipart body that was already read (and size-checked); parsed on a
    worker thread (in an event loop of its own) so a large form never stalls the server's loop."""
    return asyncio.run(_multipart_file_async(scope, body))


async def _multipart_file_async(scope: dict[str, Any], body: bytes) -> bytes:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, replay).form(max_files=1, max_fields=16)
    except Exception as e:  # noqa: BLE001 - any parser complaint is the client's malformed form
        raise HTTPError(400, f"malformed multipart body ({' '.join(str(e).split()) or type(e).__name__})") from None
    try:
        item = form.get("file")
        if item is None or isinstance(item, str):
            raise HTTPError(400, "multipart body needs a file field named `file`")
        return await item.read()
    finally:
        await form.close()


def _check_finite(wave: np.ndarray) -> None:
    if not np.isfinite(wave).all():
        raise HTTPError(422, "the decoded audio is not finite (latents or gain out of range)")


def _wav_bytes(audio: np.ndarray, rate: int, subtype: str) -> bytes:
    data = np.asarray(audio, dtype=np.float32)
    if subtype == "pcm16":
        data = np.clip(data, -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, data, rate, subtype=WAV_SUBTYPES[subtype], format="WAV")
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _pcm_bytes(chunk: np.ndarray, fmt: str) -> bytes:
    if fmt == "s16le":
        return (np.rint(np.clip(chunk, -1.0, 1.0) * 32767.0)).astype("<i2").tobytes()
    return np.asarray(chunk, dtype="<f4").tobytes()


class _Edge:
    """ASGI middleware: API key on every route but /healthz and the page, and request metrics by route and status."""

    def __init__(self, app: Any, service: Service, routes: Sequence[Any] = ()):
        self.app = app
        self.service = service
        self.routes = routes
        key = service.config.api_key
        self._key = key.encode() if key else None
        self._draining = 0
        self._protocol_checked = False

    async def _refuse_websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The service has no WebSocket route: a WebSocket handshake gets 401 (without the API key) or
        404, as JSON where the host can send an HTTP answer to a handshake, else it is closed."""
        await receive()  # websocket.connect
        if self._key is not None and not self._authorised(scope):
            status, error = 401, "missing or wrong API key: send the header Authorization: Bearer <key>"
        else:
            status, error = 404, "no WebSocket endpoint here: the service speaks plain HTTP (POST /v1/...)"
        if "websocket.http.response" in scope.get("extensions", {}):
            body = json.dumps({"error": error}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        else:
            await send({"type": "websocket.close", "code": 1008})
        label = self._route_of({**scope, "type": "http", "method": "GET"})
        self.service.metrics.requests.labels(label, str(status)).inc()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope, receive, send)
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        if not self._protocol_checked:
            self._protocol_checked = True
            _warn_without_protocol()
        started = time.perf_counter()
        status = 500
        responded = False  # the response's start line went out
        body = _Body(scope, receive)
        receive = body.receive

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                if not body.done:
                    message = await self._before_answering_early(message, body)
                status = message["status"]
                await send(message)
                responded = True
                return
            await send(message)

        try:
            if self._key is not None and not self._public(scope["path"]) and not self._authorised(scope):
                response = JSONResponse(
                    {"error": "missing or wrong API key: send the header Authorization: Bearer <key>"},
                    401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        except StreamAborted as e:
            # the status went out with the first part: returning without the final chunk makes the
            # server drop the connection, so the client cannot take the truncated body as complete
            _LOGGER.warning("%s %s: stream aborted (%d): %s", scope.get("method"), scope["path"], e.status, e)
            _CUT_SHORT.set(True)
        except asyncio.CancelledError:
            # the host cut the request off (uvicorn, when --grace-s runs out on SIGTERM): answer what a
            # stopping server answers instead of letting the host send its plain-text 500
            scope[STATUS_OVERRIDE] = 503
            if responded:  # an answer under way: the connection drops without its end, said in one line
                _LOGGER.warning(
                    "%s %s: cut off by the shutdown after its answer began", scope.get("method"), scope["path"]
                )
                _CUT_SHORT.set(True)
                return
            _LOGGER.warning("%s %s: cut off by the shutdown (503)", scope.get("method"), scope["path"])
            body.done = True  # no drain: the server is going away, and says so at once
            headers = {**SHUTDOWN_RETRY_AFTER, "Connection": "close"}
            await JSONResponse({"error": SHUTTING_DOWN}, 503, headers=headers)(scope, receive, send_status)
        finally:
            release = scope.pop(ADMISSION, None)
            if release is not None:  # the answer is sent (or the request ended without one)
                release()
            status = scope.get(STATUS_OVERRIDE, status)
            route = scope.get("route")
            label = getattr(route, "path", None) or self._route_of(scope)
            m = self.service.metrics
            m.requests.labels(label, str(status)).inc()
            m.latency.labels(label).observe(time.perf_counter() - started)

    async def _before_answering_early(self, start: dict[str, Any], body: _Body) -> dict[str, Any]:
        """A response is about to start before the request's body was read (a refusal): read and
        discard the rest first, within REFUSED_BODY_DRAIN_BYTES / _S / IDLE_S, so that a client still
        sending reads the answer instead of a reset, as common HTTP servers do. Not drained (the
        connection then closes after the answer): a client that sent `Expect: 100-continue` and was
        not told to continue (it has not sent the body), a 408 (the client is too slow), a body that
        declares more than the bound, or more than --max-uploads drains at once."""
        drain = (
            start["status"] != 408
            and not (body.expects_continue and not body.asked)
            and body.declared_left <= REFUSED_BODY_DRAIN_BYTES
            and self._draining < self.service.config.max_uploads
        )
        if drain:
            self._draining += 1
            try:
                drain = await body.drain(REFUSED_BODY_DRAIN_BYTES, REFUSED_BODY_DRAIN_S, REFUSED_BODY_IDLE_S)
            finally:
                self._draining -= 1
        headers = list(start.get("headers", ()))
        if not drain and not any(k.lower() == b"connection" for k, _ in headers):
            start = {**start, "headers": [*headers, (b"connection", b"close")]}
        return start

    def _route_of(self, scope: dict[str, Any]) -> str:
        """The route a request would have reached (e.g. one refused with 401 before routing)."""
        from starlette.routing import Match

        for route in self.routes:
            try:
                match, _ = route.matches(scope)
            except Exception:  # noqa: BLE001 - a label, never an error
                continue
            if match != Match.NONE:
                return getattr(route, "path", None) or "unmatched"
        return "unmatched"

    @staticmethod
    def _public(path: str) -> bool:
        """Paths that need no key: /healthz, and the page at / with its assets (they hold no data)."""
        return path == "/healthz" or is_public(path)

    def _authorised(self, scope: dict[str, Any]) -> bool:
        assert self._key is not None
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.strip().partition(b" ")
        ok_scheme = scheme.lower() == b"bearer"  # the scheme is case-insensitive (RFC 9110)
        return hmac.compare_digest(token.strip(), self._key) and ok_scheme


class _Body:
    """Wraps an ASGI `receive`: how much of the request body has arrived, and whether all of it."""

    def __init__(self, scope: dict[str, Any], receive: Any):
        self._receive = receive
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        # only HTTP/1.1 clients wait for `100 Continue` (h11 never sends one to an HTTP/1.0 client)
        expect = headers.get(b"expect", b"").strip().lower() == b"100-continue"
        self.expects_continue = expect and scope.get("http_version") == "1.1"
        try:
            self.declared: int | None = int(headers[b"content-length"])
        except (KeyError, ValueError):
            self.declared = None
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self.done = not chunked and not self.declared  # no body to read
        self.asked = False
        self.received = 0

    @property
    def declared_left(self) -> int:
        """Bytes of a Content-Length body not read yet (0 for a chunked one: its length is unknown)."""
        return max(0, (self.declared or 0) - self.received)

    async def receive(self) -> dict[str, Any]:
        self.asked = True
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = self.done or not message.get("more_body", False)
        elif message["type"] == "http.disconnect":
            self.done = True
        return message

    async def drain(self, max_bytes: int, max_s: float, idle_s: float) -> bool:
        """Read and discard the rest of the body; True if it all arrived within the bounds (at most
        `max_bytes` in `max_s`, and no pause of `idle_s`)."""

        async def rest() -> None:
            start = self.received
            while not self.done and self.received - start <= max_bytes:
                await asyncio.wait_for(self.receive(), idle_s)

        try:
            await asyncio.wait_for(rest(), max_s)
        except asyncio.TimeoutError:
            return False
        return self.done


def create_app(
    config: ServerConfig | None = None,
    *,
    reconstructor: ReconstructorSource = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The service as a FastAPI app.

    Args:
        config: settings (default: `ServerConfig.from_env()`).
        reconstructor: a loaded `Reconstructor` (or a callable that returns one, called on the
            loading thread) to serve instead of loading `config.model`. Its settings (e.g.
            `bucket_frames`) then define the outputs.
        on_load_error: called (on the loading thread) if the model fails to load; `recon-run serve`
            stops the server with it.
    """
    config = config or ServerConfig.from_env()
    service = Service(config, reconstructor, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="audioldm2-recon",
        version=__version__,
        summary="AudioLDM2's VAE + HiFi-GAN vocoder: reconstruct, encode and decode audio.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_Edge, service=service, routes=app.router.routes)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _QUIET_CUT_SHORT not in uvicorn_log.filters:
        uvicorn_log.addFilter(_QUIET_CUT_SHORT)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=CLIENT_GONE)  # nobody reads it; the metrics record 499

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(request: Request, e: PayloadTooLarge) -> JSONResponse:
        return JSONResponse({"error": str(e)}, 413)

    @app.exception_handler(ReconError)
    async def _recon_error(request: Request, e: ReconError) -> JSONResponse:
        status = error_status(e)
        if status >= 500:
            _LOGGER.error("request failed: %s", e)
        return JSONResponse({"error": error_message(e)}, status)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return JSONResponse({"error": problems or "invalid request"}, 422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        _LOGGER.exception("unexpected error")
        return JSONResponse({"error": "internal error"}, 500)

    # ------------------------------------------------------------------ probes
    @app.get("/healthz", summary="Alive (no API key needed)")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="503 until the model is loaded and the warm-up ran")
    async def readyz() -> JSONResponse:
        if service.worker_stopped:
            return JSONResponse({"status": "failed", "error": "the inference worker stopped"}, 503)
        if service.ready.is_set():
            return JSONResponse({"status": "ready"})
        if service.load_error is not None:
            return JSONResponse({"status": "failed", "error": LOAD_FAILED}, 503)
        return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "1"})

    @app.get("/v1/info", summary="Model, provider, precision, fingerprint and limits")
    async def info() -> dict[str, Any]:
        if not service.ready.is_set():
            raise HTTPError(503, "the model is not loaded yet; retry shortly", {"Retry-After": "1"})
        rec = service.rec
        c = rec.contract
        limits = {k: v for k, v in asdict(config).items() if k not in ("model", "api_key", "warmup")}
        limits["max_batch"] = rec.max_batch  # the batch it runs (the runtime's per-device default unless set)
        return {
            "version": __version__,
            "source": dict(c.source),
            "weights": "random" if c.random_weights else "trained",
            "backend": rec.backend,
            "provider": rec.provider,
            "precision": rec.precision,
            "fingerprint": c.fingerprint,
            "digest": c.digest,
            "sample_rate": int(c.mel.sample_rate),
            "scaling_factor": c.scaling_factor,
            "window_frames": rec.window_frames,
            "overlap_frames": rec.overlap_frames,
            "bucket_frames": rec.bucket_frames,
            "limits": limits,
            "api_key_required": config.api_key is not None,
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ inference
    audio_body = {"content": {"audio/wav": {}, "application/octet-stream": {}, "multipart/form-data": {}}}

    @app.post(
        "/v1/reconstruct",
        summary="Audio (any format libsndfile reads) -> VAE -> vocoder -> WAV at the input's length and level",
        response_class=Response,
        responses={200: {"content": {"audio/wav": {}}}},
        openapi_extra={"requestBody": audio_body},
    )
    async def reconstruct(
        request: Request,
        output_rate: int | None = Query(None, ge=1000, le=384000, description="Resample the output (default 16000)"),
        subtype: Literal["float", "pcm16"] = Query("float", description="WAV sample format"),
    ) -> Response:
        service.check_capacity()
        body = await service.read_body(request)
        rec = service.admit(request)
        deadline = service.deadline()
        rate = output_rate or service.rate

        def answer(seconds: float) -> None:
            what = f"{seconds:.1f} s at {rate} Hz, {subtype}"
            service.check_response(seconds * rate, WAV_BYTES[subtype], what)

        async def work() -> tuple[bytes, Any]:
            feats, _ = await service.cpu(service.features, body, answer)
            job = rec.reconstruction_job(feats)
            outputs = await service.run_job(job, deadline, request)

            def finish() -> bytes:
                (wave,) = rec.join(job, outputs)
                out = rec.finish(feats, rec.crop(feats, wave), output_rate)
                return _wav_bytes(out, rate, subtype)

            return await service.cpu(finish), feats

        data, feats = await service.within(deadline, work())
        service.metrics.audio_seconds.labels("/v1/reconstruct").inc(feats.num_samples / service.rate)
        return PacedResponse(data, media_type="audio/wav", headers={H_NUM_SAMPLES: str(feats.num_samples)})

    @app.post(
        "/v1/encode",
        summary="Audio -> scaled latents [8, ceil(T/4), 16] as .npy (posterior mean, or a draw)",
        response_class=Response,
        responses={200: {"content": {NPY_MEDIA_TYPE: {}}}},
        openapi_extra={"requestBody": audio_body},
    )
    async def encode(
        request: Request,
        sample: bool = Query(False, description="Draw mean + std * noise instead of the mean"),
        seed: int | None = Query(
            None, ge=0, lt=2**63, description="Seed for the draw (default: a random one, reported)"
        ),
    ) -> Response:
        service.check_capacity()
        body = await service.read_body(request)
        rec = service.admit(request)
        deadline = service.deadline()
        used_seed = seed if seed is not None else secrets.randbits(63)

        def answer(seconds: float) -> None:  # float32 latents: 8 x 16 values per 640 samples
            frames = seconds * service.rate / service.samples_per_latent
            service.check_response(frames, LATENT_CHANNELS * LATENT_FREQ_BINS * 4, f"latents of {seconds:.1f} s")

        async def work() -> tuple[tuple[bytes, tuple[int, ...]], Any, int]:
            feats, input_rate = await service.cpu(service.features, body, answer)
            job = rec.encoding_job(feats)
            outputs = await service.run_job(job, deadline, request)

            def finish() -> tuple[bytes, tuple[int, ...]]:
                mean, std = (rec.crop_latents(feats, z) for z in rec.join(job, outputs))
                if sample:  # as Reconstructor.encode_features
                    noise = np.random.default_rng(used_seed).standard_normal(mean.shape).astype(np.float32)
                    mean = mean + std * noise
                return _npy_bytes(mean), mean.shape

            return await service.cpu(finish), feats, input_rate

        (data, shape), feats, input_rate = await service.within(deadline, work())
        service.metrics.audio_seconds.labels("/v1/encode").inc(feats.num_samples / service.rate)
        c = rec.contract
        headers = {
            H_NUM_SAMPLES: str(feats.num_samples),
            H_GAIN: repr(float(feats.gain)),
            H_SAMPLE_RATE: str(service.rate),
            H_INPUT_RATE: str(input_rate),
            H_LATENT_SHAPE: ",".join(map(str, shape)),
            H_SAMPLED: "true" if sample else "false",
            H_FINGERPRINT: c.fingerprint,
            H_SCALING: repr(float(c.scaling_factor)),
        }
        if sample:
            headers[H_SEED] = str(used_seed)
        return PacedResponse(data, media_type=NPY_MEDIA_TYPE, headers=headers)

    @app.post(
        "/v1/decode",
        summary="Scaled latents (.npy [8, frames, 16]) -> 16 kHz audio; stream=true sends raw PCM as each window finishes",
        response_class=Response,
        responses={200: {"content": {"audio/wav": {}, STREAM_MEDIA_TYPE: {}}}},
        openapi_extra={"requestBody": {"content": {NPY_MEDIA_TYPE: {}, "multipart/form-data": {}}}},
    )
    async def decode(
        request: Request,
        num_samples: int | None = Query(None, ge=1, description="Crop the output to this many samples"),
        gain: float | None = Query(
            None, ge=0, le=MAX_GAIN, description="Multiply the output by this (the encode response's gain)"
        ),
        stream: bool = Query(False, description="Send raw PCM (see the X-Recon-* headers) as each window finishes"),
        subtype: Literal["float", "pcm16"] = Query("float", description="float: f32le / FLOAT WAV; pcm16: s16le"),
    ) -> Response:
        fingerprint = request.headers.get(H_FINGERPRINT)
        if stream:
            return await _decode_stream(service, request, fingerprint, num_samples, gain, subtype)
        service.check_capacity()
        body = await service.read_body(request)
        rec = service.admit(request)
        deadline = service.deadline()

        async def work() -> tuple[bytes, int]:
            z = await service.cpu(service.latents, body, fingerprint, num_samples, WAV_BYTES[subtype])
            job = rec.decoding_job(z, num_samples)
            outputs = await service.run_job(job, deadline, request, DECODE_TOO_LONG)

            def finish() -> tuple[bytes, int]:  # as Reconstructor.decode, then the sidecar's gain
                (wave,) = rec.join(job, outputs)
                wave = wave[:num_samples] if num_samples is not None else wave
                wave = wave * np.float32(gain) if gain is not None else wave
                _check_finite(wave)
                return _wav_bytes(wave, service.rate, subtype), wave.size

            return await service.cpu(finish)

        data, size = await service.within(deadline, work())
        service.metrics.audio_seconds.labels("/v1/decode").inc(size / service.rate)
        return PacedResponse(data, media_type="audio/wav", headers={H_NUM_SAMPLES: str(size)})

    mount_page(app, service)  # the listening page at /, its assets, and /v1/compare for it
    return app


async def _decode_stream(
    service: Service,
    request: Request,
    fingerprint: str | None,
    num_samples: int | None,
    gain: float | None,
    subtype: str,
) -> StreamingResponse:
    """Decode window by window and send each part of the output as soon as no later window touches it.

    The first window is computed before the response starts (so errors still get a status); each
    later window is queued when the previous one is done, so the time to first audio is one
    window's compute whatever the length. Every part is the exact cross-fade `join` computes. The
    whole stream shares one deadline (`timeout_s`, as a request that is not streamed); a failure
    after the status was sent drops the connection without the final chunk (the client sees a
    truncated body, never a clean end) and is recorded in the metrics with its status.
    """
    service.check_capacity()
    body = await service.read_body(request)
    rec = service.admit(request)
    release = request.scope[ADMISSION]  # the middleware calls it too: whichever comes first
    deadline = service.deadline()
    latents = service.cpu(service.latents, body, fingerprint, num_samples, WAV_BYTES[subtype])
    z = await service.within(deadline, latents)
    job = rec.decoding_job(z, num_samples)
    n = len(job.windows)
    length = int(round(job.total * job.scale))
    total = length if num_samples is None else min(num_samples, length + job.tail)
    fmt = STREAM_FORMATS[subtype]
    factor = np.float32(gain) if gain is not None else None
    first = (await service.wait(service.submit(job, [0], deadline), deadline, request))[0]
    headers = {
        H_SAMPLE_RATE: str(service.rate),
        H_CHANNELS: "1",
        H_FORMAT: fmt,
        H_NUM_SAMPLES: str(total),
        H_WINDOWS: str(n),
        "Cache-Control": "no-store",
    }
    weights = window_weights(list(job.spans), job.scale) if n > 1 else None
    out = np.zeros(length, np.float32) if n > 1 else None
    wsum = np.zeros(length, np.float32) if n > 1 else None
    sent = 0

    def part_bytes(i: int, piece: np.ndarray) -> bytes:
        """Add window i to the cross-fade and return the samples no later window touches, as PCM."""
        nonlocal sent
        if n == 1:
            chunk = piece
        else:
            assert weights is not None and out is not None and wsum is not None
            w = weights[i]
            o0 = int(round(job.spans[i][0] * job.scale))
            out[o0 : o0 + w.size] += piece[: w.size] * w
            wsum[o0 : o0 + w.size] += w
            done = int(round(job.spans[i + 1][0] * job.scale)) if i + 1 < n else length
            chunk = out[sent:done] / wsum[sent:done] if done > sent else out[:0]
            if i + 1 == n and job.tail:  # the vocoder's samples past the last frame (Reconstructor.join)
                chunk = np.concatenate([chunk, piece[w.size : w.size + job.tail]])
        part = chunk[: max(0, total - sent)]
        sent += chunk.size
        if factor is not None:
            part = part * factor
        _check_finite(part)
        return _pcm_bytes(part, fmt) if part.size else b""

    async def parts() -> AsyncIterator[bytes]:
        pending: list[Future] = []
        try:
            output = first
            for i in range(n):
                if i + 1 < n:  # queue the next window before sending this part
                    pending = service.submit(job, [i + 1], deadline, budgeted=False)
                (piece,) = output
                data = await service.within(deadline, service.cpu(part_bytes, i, piece))
                if data:
                    yield data
                if i + 1 < n:
                    output = (await service.wait(pending, deadline))[0]
                    pending = []
            service.metrics.audio_seconds.labels("/v1/decode").inc(total / service.rate)
        except HTTPError as e:
            _LOGGER.warning("streaming decode aborted: %s", e.message)
            request.scope[STATUS_OVERRIDE] = e.status
            raise StreamAborted(e.status, e.message) from None
        except ReconError as e:
            _LOGGER.warning("streaming decode aborted: %s", e)
            request.scope[STATUS_OVERRIDE] = status = error_status(e)
            raise StreamAborted(status, error_message(e)) from None
        except Exception:
            _LOGGER.exception("streaming decode aborted")
            request.scope[STATUS_OVERRIDE] = 500
            raise StreamAborted(500, "internal error") from None
        except BaseException:  # cancelled: the client went away (or the server is stopping)
            request.scope[STATUS_OVERRIDE] = CLIENT_GONE
            raise
        finally:
            if pending and service.batcher is not None:  # the client went away: its next window leaves the queue
                service.batcher.cancel(pending)
            release()

    return ReleasingStream(parts(), release, media_type=STREAM_MEDIA_TYPE, headers=headers)


class PacedResponse(Response):
    """A Response whose body goes out in RESPONSE_PART_BYTES parts: the host waits for the client to
    read before it takes the next part once the connection's buffer is full (uvicorn does), so the
    answer is not copied into that buffer whole, and the request (with its admission slot) lasts
    until its last part is handed over. A client that reads nothing is dropped by the HTTP protocol's
    send timeout."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body = self.body
        for at in range(0, max(len(body), 1), RESPONSE_PART_BYTES):
            end = at + RESPONSE_PART_BYTES
            await send({"type": "http.response.body", "body": body[at:end], "more_body": end < len(body)})
        if self.background is not None:
            await self.background()


class ReleasingStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends, also when its body never starts
    (Starlette cancels the body if the client disconnects before it, and a generator that never
    started never runs its `finally`): a stream's admission slot is always given back."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


_CUT_SHORT: contextvars.ContextVar[bool] = contextvars.ContextVar("recon_cut_short", default=False)
"""Set in a request's task when the app ends an answer that has begun without its end, on purpose
(an aborted stream, a shutdown): the host's own line about it is then not logged (ours was)."""
INCOMPLETE_RESPONSE = "ASGI callable returned without completing response."


class _QuietCutShort(logging.Filter):
    """Drops uvicorn's "returned without completing response" line for answers the app cut short on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == INCOMPLETE_RESPONSE and _CUT_SHORT.get())


_QUIET_CUT_SHORT = _QuietCutShort()


def _warn_without_protocol() -> None:
    """Warn once when this process serves the app without `recon-run serve`'s HTTP protocol: its
    request-head and send timeouts and its lingering close then do not apply (docs/serving.md)."""
    module = sys.modules.get("recon_runtime.serving.http_protocol")
    if module is None or not getattr(module, "connections_served", 0):
        _LOGGER.warning(
            "this host does not serve the app with recon_runtime.serving.http_protocol: the header and send timeouts "
            "do not apply (uvicorn: --http recon_runtime.serving.http_protocol:HeadTimeoutH11Protocol; docs/serving.md)"
        )


def bind_is_loopback(host: str) -> bool:
    """True for the loopback addresses (the default bind); anything else is reachable from the network."""
    return host in ("127.0.0.1", "::1", "localhost")
