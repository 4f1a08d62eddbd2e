"""`Service`: the loaded model and its batcher, admission, the CPU pool, submit and wait (no routes).

The model is loaded and warmed up on a background thread when the app starts (so `/healthz`
answers while it loads and `/readyz` says 503 until it is ready), never at import. Every request
is cut into the runtime's windows; one worker thread (`batcher.WindowBatcher`) runs windows of one
shape from all waiting requests as one batch, and each request joins its own windows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.concurrency import run_in_threadpool

from ..contract import LATENT_CHANNELS, LATENT_FREQ_BINS, ROLES
from . import inputs
from .batcher import BatchStats, DeadlineExceeded, QueueFull, ShuttingDown, WindowBatcher
from .config import ServerConfig
from .errors import NOT_LOADED, ClientGone, HTTPError, busy, load_failure_message, retry_after, shutting_down
from .protocol import (
    WINDOW_BUDGET_OPTION,
)

_LOGGER = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1
STATUS_OVERRIDE = "recon.status"
"""Scope key: the status to record when it is not the one sent (a stream that failed after its start)."""
ADMISSION = "recon.release"
"""Scope key: gives the request's admission slot back (called by the middleware once the answer is sent)."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
AUDIO_TOO_LONG = "send shorter audio"
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
WARMUP_SECONDS = 1.0
"""The warm-up's reconstruction: a tone this long, at WARMUP_TONE_HZ and peak WARMUP_LEVEL (one window)."""
WARMUP_TONE_HZ = 440.0
WARMUP_LEVEL = 0.1
WARMUP_LATENT_FRAMES = 16
"""The warm-up's decode: zero latents this many frames long (0.64 s)."""


class Metrics:
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
        self.metrics = Metrics()
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
        t = np.arange(int(WARMUP_SECONDS * rate), dtype=np.float32) / rate
        feats = rec.features(WARMUP_LEVEL * np.sin(2 * np.pi * WARMUP_TONE_HZ * t), rate)
        rec.run_jobs([rec.reconstruction_job(feats)])
        latents = np.zeros((LATENT_CHANNELS, WARMUP_LATENT_FRAMES, LATENT_FREQ_BINS), np.float32)
        rec.run_jobs([rec.decoding_job(latents)])

    def stop(self, timeout: float | None = 30.0) -> None:
        if self.batcher is not None:
            self.batcher.close(drain=True, timeout=timeout)

    # ------------------------------------------------------------------ admission
    def check_capacity(self) -> None:
        """503 at once, before any body is read, when the model is not ready or --max-queue requests
        are already admitted."""
        if not self.ready.is_set():
            raise HTTPError(503, NOT_LOADED, retry_after())
        if self.in_flight >= self.config.max_queue:
            raise busy(f"{self.in_flight} requests in progress (limit {self.config.max_queue})")

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

    async def accept(
        self, request: Request, *, limit: int | None = None, raw: bool = False, audio: str | None = None
    ) -> tuple[bytes, Any, float]:
        """A request's way in: 503 at once when the server is full (before any body), the body read
        (`read_body`, with `limit` and `raw`), the request admitted (`admit`) and its deadline from now:
        `deadline_for` the audio the body declares, read as `audio` (`inputs.AUDIO` or
        `inputs.LATENTS`), else `timeout_s` alone.

        Returns:
            (body, the Reconstructor, the deadline).
        """
        self.check_capacity()
        body = await self.read_body(request, limit=limit, raw=raw)
        rec = self.admit(request)
        return body, rec, await self.deadline_for(body, audio) if audio else self.deadline()

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

        The whole body must arrive within `body_timeout_s` of now (408; scaled by `limit` / `max_body_mb`
        where `limit` is larger), and keep up with
        `min_upload_rate` after UPLOAD_GRACE_S (408). Its first part is awaited before an upload slot
        (a request that sends nothing holds none); at most `max_uploads` bodies are then read at once:
        a free slot is taken however late the body began, and one that finds them all taken waits for
        a slot until UPLOAD_GRACE_S from now at most (503). `limit` (bytes) replaces `max_body_mb`;
        `raw` keeps a multipart body whole (/v1/compare's two files)."""
        start = time.monotonic()
        max_body = int(self.config.max_body_mb * 2**20)
        limit = limit or max_body
        # a larger limit gets as long per byte: /v1/compare's two files may be 1.6x what reconstruct takes
        timeout = max(self.config.body_timeout_s, round(self.config.body_timeout_s * limit / max_body, 1))
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
        reader = inputs.BodyReader(request, limit, self.config.min_upload_rate, start, timeout)
        self.receiving += 1
        try:
            await reader.read_first()
            if self._upload_slots.locked():  # all taken: wait for one until the grace ends
                wait = start + inputs.UPLOAD_GRACE_S - time.monotonic()
                try:
                    await asyncio.wait_for(self._upload_slots.acquire(), max(0.0, wait))
                except asyncio.TimeoutError:
                    raise busy(f"{self.config.max_uploads} uploads in progress") from None
            else:  # a free slot is taken at once, however late the body began (wait_for(..., 0) never runs it)
                await self._upload_slots.acquire()
            try:
                body = await reader.read_rest()
            finally:
                self._upload_slots.release()
        finally:
            self.receiving -= 1
        if not raw and request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            body = await self.cpu(inputs.multipart_file, request.scope, body)
        if not body:
            raise HTTPError(400, "empty body: send the file as the body or as the multipart field `file`")
        return body

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
            raise busy(str(e)) from None
        except ShuttingDown:
            raise shutting_down() from None

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
                    raise shutting_down() from None
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
        per_audio = self.config.timeout_per_audio_s
        extra = f" plus {per_audio:g} s per second of its audio" if per_audio else ""
        return f"the request took longer than the server's limit of {self.config.timeout_s:g} s{extra}"

    async def run_job(
        self,
        job: Any,
        deadline: float,
        request: Request | None = None,
        too_long: str = AUDIO_TOO_LONG,
        budgeted: bool = True,
    ) -> list[Any]:
        """Run all of a job's windows; `budgeted=False` for the rest of work admitted earlier (`submit`)."""
        indices = range(len(job.windows))
        return await self.wait(self.submit(job, indices, deadline, too_long, budgeted=budgeted), deadline, request)

    async def run_chain(
        self, job: Any, deadline: float, request: Request | None = None, too_long: str = AUDIO_TOO_LONG
    ) -> list[Any]:
        """Run a job's windows and join them (`Reconstructor.join`, on the CPU slots); where the job
        asks for a vocoder pass over its joined log-mel (`Reconstructor.vocoder_pass`), run that
        pass's chunks too (they batch with other requests' chunks of one shape) and join them.
        Returns what `Reconstructor.run_jobs` returns for the job."""
        rec = self.rec
        joined = await self.cpu(rec.join, job, await self.run_job(job, deadline, request, too_long))
        vocoding = rec.vocoder_pass(job, joined)
        if vocoding is None:
            return joined
        # the vocoder pass is the rest of a request admitted with its windows: never refused (503)
        # after its VAE work ran because other requests filled the queue meanwhile
        chunks = await self.run_job(vocoding, deadline, request, too_long, budgeted=False)
        return await self.cpu(rec.join, vocoding, chunks)

    def deadline(self) -> float:
        return time.monotonic() + self.config.timeout_s

    async def deadline_for(self, body: bytes, kind: str) -> float:
        """The deadline of a request for graphs: `timeout_s` from now plus `timeout_per_audio_s` per
        second of the audio its body declares (`inputs.declared_seconds`; at most `max_seconds`, past
        which the request is refused anyway). The header is read off the event loop but outside the
        CPU slots: it is no decoding, and queueing it there spread concurrent requests' windows apart."""
        start = time.monotonic()
        per_audio = self.config.timeout_per_audio_s
        seconds = await run_in_threadpool(inputs.declared_seconds, body, kind, self.rate) if per_audio else 0.0
        return start + self.config.timeout_s + per_audio * min(seconds, self.config.max_seconds)

    async def within(self, deadline: float, work: Any) -> Any:
        """Run a coroutine under the request's deadline (504 past it)."""
        try:
            return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise HTTPError(504, self._late()) from None


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected (polls: the body is read, so this only sees a disconnect)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
