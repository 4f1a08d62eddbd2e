"""The HTTP routes, one `APIRouter` per family: probes (`/healthz`, `/readyz`, `/v1/info`, `/metrics`)
and inference (`/v1/reconstruct`, `/v1/encode`, `/v1/decode`, streamed or not).

Each route reads the `Service` from `request.app.state.service`, parses its input with `inputs`,
runs its windows through the service, and answers; the page's routes are in `page`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..channels import encoded_clip
from ..contract import LATENT_CHANNELS, LATENT_FREQ_BINS, SAMPLE_RATE
from ..errors import ReconError
from ..files.audio import BYTES_PER_SAMPLE, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, npy_bytes, wav_bytes
from ..files.encoded import ENCODED_MEDIA_TYPE, EncodedAudio
from ..reconstructor import StreamedJob, posterior_draw
from . import inputs
from .errors import (
    CLIENT_GONE,
    LOAD_FAILED,
    NOT_LOADED,
    HTTPError,
    StreamAborted,
    error_message,
    error_status,
    retry_after,
)
from .protocol import (
    ENCODE_FILE,
    H_CHANNELS,
    H_FINGERPRINT,
    H_FORMAT,
    H_LATENT_SHAPE,
    H_NUM_SAMPLES,
    H_SAMPLE_RATE,
    H_WINDOWS,
    NPY_MEDIA_TYPE,
    STREAM_FORMATS,
    SUBTYPES,
)
from .service import ADMISSION, STATUS_OVERRIDE, Service

_LOGGER = logging.getLogger(__name__)

MAX_GAIN = 1e6
"""Largest `gain` /v1/decode accepts (an encode's gain is the input's peak / 0.5)."""
RESPONSE_PART_BYTES = 2**20
"""A response body is handed to the connection in parts of this size: once the connection's buffer
is full (the client is not reading), the next part waits, so an answer is never buffered twice and
the request (with its admission slot) lasts until its last part is sent."""
STREAM_MEDIA_TYPE = "application/octet-stream"
AUDIO_BODY = {"content": {"audio/wav": {}, "application/octet-stream": {}, "multipart/form-data": {}}}
"""What the audio routes accept (the OpenAPI schema's request body)."""
DECODE_TOO_LONG = "send shorter latents, or decode with stream=true (one window at a time)"


def service_of(request: Request) -> Service:
    """The app's `Service` (`create_app` puts it in `app.state`)."""
    return request.app.state.service


probes = APIRouter()
"""/healthz, /readyz, /v1/info and /metrics."""
inference = APIRouter()
"""/v1/reconstruct, /v1/encode and /v1/decode."""


@probes.get("/healthz", summary="Alive (no API key needed)")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@probes.get("/readyz", summary="503 until the model is loaded and the warm-up ran")
async def readyz(request: Request) -> JSONResponse:
    service = service_of(request)
    if service.worker_stopped:
        return JSONResponse({"status": "failed", "error": "the inference worker stopped"}, 503)
    if service.ready.is_set():
        return JSONResponse({"status": "ready"})
    if service.load_error is not None:
        return JSONResponse({"status": "failed", "error": LOAD_FAILED}, 503)
    return JSONResponse({"status": "loading"}, 503, headers=retry_after())


@probes.get("/v1/info", summary="Model, provider, precision, fingerprint and limits")
async def info(request: Request) -> dict[str, Any]:
    service, config = service_of(request), service_of(request).config
    if not service.ready.is_set():
        raise HTTPError(503, NOT_LOADED, retry_after())
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


@probes.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    service = service_of(request)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@inference.post(
    "/v1/reconstruct",
    summary="Audio (any format libsndfile reads) -> VAE -> vocoder -> WAV at the input's length and level",
    response_class=Response,
    responses={200: {"content": {"audio/wav": {}}}},
    openapi_extra={"requestBody": AUDIO_BODY},
)
async def reconstruct(
    request: Request,
    output_rate: int | None = Query(
        None, ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE, description=f"Resample the output (default {SAMPLE_RATE})"
    ),
    subtype: Literal["float", "pcm16"] = Query("float", description="WAV sample format"),
) -> Response:
    service = service_of(request)
    body, rec, deadline = await service.accept(request, audio=inputs.AUDIO)
    rate = output_rate or service.rate

    def answer(seconds: float) -> None:
        what = f"{seconds:.1f} s at {rate} Hz, {subtype}"
        inputs.check_response(service.config, seconds * rate, BYTES_PER_SAMPLE[SUBTYPES[subtype]], what)

    async def work() -> tuple[bytes, Any]:
        feats, _ = await service.cpu(inputs.features, rec, service.config, body, answer)
        (wave,) = await service.run_chain(rec.reconstruction_job(feats), deadline, request)

        def finish() -> bytes:
            out = rec.finish(feats, rec.crop(feats, wave), output_rate)
            return wav_bytes(out, rate, SUBTYPES[subtype])

        return await service.cpu(finish), feats

    data, feats = await service.within(deadline, work())
    service.metrics.audio_seconds.labels("/v1/reconstruct").inc(feats.num_samples / service.rate)
    return PacedResponse(data, media_type="audio/wav", headers={H_NUM_SAMPLES: str(feats.num_samples)})


@inference.post(
    "/v1/encode",
    summary="Audio -> scaled latents [8, ceil(T/4), 16] as .npy with the facts in headers, or as one "
    "encoded-audio file (format=encoded or Accept: " + ENCODED_MEDIA_TYPE + ")",
    response_class=Response,
    responses={200: {"content": {NPY_MEDIA_TYPE: {}, ENCODED_MEDIA_TYPE: {}}}},
    openapi_extra={"requestBody": AUDIO_BODY},
)
async def encode(
    request: Request,
    sample: bool = Query(False, description="Draw mean + std * noise instead of the mean"),
    seed: int | None = Query(None, ge=0, lt=2**63, description="Seed for the draw (default: a random one, reported)"),
    format: Literal["npy", "encoded"] | None = Query(
        None,
        description=f"npy (the default): the latents, their facts in X-Recon-* headers; encoded: one "
        f"encoded-audio file ({ENCODED_MEDIA_TYPE}) that /v1/decode and recon-run decode take as it is",
    ),
) -> Response:
    service = service_of(request)
    as_file = _wants_encoded(format, request.headers.get("accept"))
    body, rec, deadline = await service.accept(request, audio=inputs.AUDIO)
    used_seed = seed if seed is not None else secrets.randbits(63)

    def answer(seconds: float) -> None:  # float32 latents: 8 x 16 values per 640 samples
        frames = seconds * service.rate / service.samples_per_latent
        inputs.check_response(
            service.config, frames, LATENT_CHANNELS * LATENT_FREQ_BINS * 4, f"latents of {seconds:.1f} s"
        )

    async def work() -> tuple[bytes, EncodedAudio]:
        up = await service.cpu(inputs.upload, rec, service.config, body, answer)
        feats = up.features
        job = rec.encoding_job(feats)
        outputs = await service.run_job(job, deadline, request)

        def finish() -> tuple[bytes, EncodedAudio]:
            mean, std = (rec.crop_latents(feats, z) for z in rec.join(job, outputs))
            if sample:  # as Reconstructor.encode_features
                mean = posterior_draw(mean, std, used_seed)
            clip = encoded_clip(
                rec.contract, feats, mean, up.sample_rate, sampled=sample, seed=used_seed, input_channels=up.channels
            )  # no source: a server's path means nothing to its client
            return (clip.to_bytes() if as_file else npy_bytes(mean)), clip

        return await service.cpu(finish)

    data, clip = await service.within(deadline, work())
    service.metrics.audio_seconds.labels("/v1/encode").inc(clip.seconds)
    headers = clip.headers()  # the file's facts, in the headers of either answer
    headers[H_LATENT_SHAPE] = ",".join(map(str, clip.latents.shape[1:]))
    return PacedResponse(data, media_type=ENCODED_MEDIA_TYPE if as_file else NPY_MEDIA_TYPE, headers=headers)


def _wants_encoded(format: str | None, accept: str | None) -> bool:
    """/v1/encode's answer: the `format` asked, else the encoded file when `Accept` names its type
    (with a q above 0), else the .npy (`*/*`, or no Accept, keeps today's answer)."""
    if format is not None:
        return format == ENCODE_FILE
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() != ENCODED_MEDIA_TYPE:
            continue
        q = next((p.partition("=")[2] for p in params if p.lower().startswith("q=")), "1")
        try:
            return float(q) > 0
        except ValueError:
            return True
    return False


@inference.post(
    "/v1/decode",
    summary="Scaled latents (.npy [8, frames, 16]) or an encoded-audio file (its length, level and channels "
    "with it) -> 16 kHz audio; stream=true sends raw PCM as each vocoder chunk finishes",
    response_class=Response,
    responses={200: {"content": {"audio/wav": {}, STREAM_MEDIA_TYPE: {}}}},
    openapi_extra={"requestBody": {"content": {NPY_MEDIA_TYPE: {}, ENCODED_MEDIA_TYPE: {}, "multipart/form-data": {}}}},
)
async def decode(
    request: Request,
    num_samples: int | None = Query(
        None, ge=1, description="Crop the output to this many samples (.npy; an encoded file records its own)"
    ),
    gain: float | None = Query(
        None,
        ge=0,
        le=MAX_GAIN,
        description="Multiply the output by this (the encode response's gain; an encoded file records its own)",
    ),
    stream: bool = Query(False, description="Send raw PCM (see the X-Recon-* headers) as each vocoder chunk finishes"),
    subtype: Literal["float", "pcm16"] = Query("float", description="float: f32le / FLOAT WAV; pcm16: s16le"),
) -> Response:
    service = service_of(request)
    fingerprint = request.headers.get(H_FINGERPRINT)
    if stream:
        return await _decode_stream(service, request, fingerprint, num_samples, gain, subtype)
    body, rec, deadline = await service.accept(request, audio=inputs.LATENTS)
    content_type = request.headers.get("content-type")

    async def work() -> tuple[bytes, int, int]:
        todo = await service.cpu(
            _decode_input,
            rec,
            service.config,
            content_type,
            body,
            fingerprint,
            num_samples,
            gain,
            BYTES_PER_SAMPLE[SUBTYPES[subtype]],
        )
        decoded = []
        for z in todo.latents:  # channel by channel: each is a request's windows, within the window budget
            (wave,) = await service.run_chain(rec.decoding_job(z, todo.num_samples), deadline, request, DECODE_TOO_LONG)
            decoded.append(wave)

        def finish() -> tuple[bytes, int, int]:  # as Reconstructor.decode, then the recorded gain per channel
            waves = []
            for wave, factor in zip(decoded, todo.gains):
                wave = wave[: todo.num_samples] if todo.num_samples is not None else wave
                waves.append(wave * np.float32(factor) if factor is not None else wave)
            wave = waves[0] if len(waves) == 1 else np.stack(waves, axis=1)  # [samples, channels], as soundfile
            _check_finite(wave)
            return wav_bytes(wave, service.rate, SUBTYPES[subtype]), wave.shape[0], len(waves)

        return await service.cpu(finish)

    data, size, channels = await service.within(deadline, work())
    service.metrics.audio_seconds.labels("/v1/decode").inc(size / service.rate)
    return PacedResponse(data, media_type="audio/wav", headers={H_NUM_SAMPLES: str(size), H_CHANNELS: str(channels)})


@dataclass(frozen=True)
class DecodeInput:
    """What /v1/decode decodes: one latent [8, frames, 16] per channel, the length and the gain of each."""

    latents: list[np.ndarray]
    num_samples: int | None
    gains: list[float | None]


def _decode_input(
    rec: Any,
    config: Any,
    content_type: str | None,
    body: bytes,
    fingerprint: str | None,
    num_samples: int | None,
    gain: float | None,
    bytes_per_sample: int,
) -> DecodeInput:
    """The upload as latents per channel: a .npy (one channel, length and gain from the query) or an
    encoded-audio file (its own length, gains and channels; the query may not give them again)."""
    if not inputs.is_encoded(content_type, body):
        z = inputs.latents(rec, config, body, fingerprint, num_samples, bytes_per_sample)
        return DecodeInput([z], num_samples, [gain])
    given = [name for name, value in (("num_samples", num_samples), ("gain", gain)) if value is not None]
    if given:
        raise HTTPError(
            400, f"an encoded-audio file records its length and gain; drop {' and '.join(given)} from the query"
        )
    clip = inputs.encoded(rec, config, body, fingerprint, bytes_per_sample)
    return DecodeInput(list(clip.latents), clip.num_samples, list(clip.gain))


async def _decode_stream(
    service: Service,
    request: Request,
    fingerprint: str | None,
    num_samples: int | None,
    gain: float | None,
    subtype: str,
) -> StreamingResponse:
    """Decode one graph run at a time and send each part of the output as soon as it is final.

    The runs come in `StreamedJob`'s order: decoder windows, and each vocoder chunk as soon as the
    log-mel join covers it (one window of latents: the chain in one run). The runs up to the first
    audio (the windows under the first vocoder chunk, and that chunk) are done before the response
    starts, so errors there, the vocoder's included, still get a status; each later one is queued
    when the one before is done, so the time to first audio is those runs (20.48 s of audio),
    whatever the length. The parts laid end to end are exactly
    what the decode without stream=true gives. The
    whole stream shares one deadline (`timeout_s` plus `timeout_per_audio_s` per second of its
    latents, as a request that is not streamed); a failure after the status was sent drops the
    connection without the final chunk (the client sees a truncated body, never a clean end) and is
    recorded in the metrics with its status. An encoded file streams its one channel at its recorded
    length and gain (several channels: 422).
    """
    body, rec, deadline = await service.accept(request, audio=inputs.LATENTS)
    release = request.scope[ADMISSION]  # the middleware calls it too: whichever comes first
    parsed = service.cpu(
        _decode_input,
        rec,
        service.config,
        request.headers.get("content-type"),
        body,
        fingerprint,
        num_samples,
        gain,
        BYTES_PER_SAMPLE[SUBTYPES[subtype]],
    )
    todo = await service.within(deadline, parsed)
    if len(todo.latents) > 1:
        raise HTTPError(
            422, f"stream=true sends one channel; this file has {len(todo.latents)}: decode it without stream=true"
        )
    (z,), num_samples, (gain,) = todo.latents, todo.num_samples, todo.gains
    job = rec.decoding_job(z, num_samples)
    streamed = StreamedJob(job)
    steps = streamed.steps
    n = len(steps)
    total = streamed.length if num_samples is None else min(num_samples, streamed.length)
    fmt = STREAM_FORMATS[subtype]
    factor = np.float32(gain) if gain is not None else None

    def submit(step: int, budgeted: bool = True) -> list[Future]:
        step_job, index = steps[step]
        return service.submit(step_job, [index], deadline, DECODE_TOO_LONG, budgeted=budgeted)

    first = (await service.wait(submit(0), deadline, request))[0]
    headers = {
        H_SAMPLE_RATE: str(service.rate),
        H_CHANNELS: "1",
        H_FORMAT: fmt,
        H_NUM_SAMPLES: str(total),
        H_WINDOWS: str(len(job.windows)),
        "Cache-Control": "no-store",
    }
    sent = 0

    def part_bytes(step: int, output: list[np.ndarray]) -> bytes:
        """Add the next run's output and return the samples that are final now, as PCM."""
        nonlocal sent
        chunk = streamed.add(step, output)
        part = chunk[: max(0, total - sent)]
        sent += chunk.size
        if factor is not None:
            part = part * factor
        _check_finite(part)
        return _pcm_bytes(part, fmt) if part.size else b""

    # Run up to the first step that gives audio (the first vocoder chunk) before the status is
    # sent: no byte could leave earlier anyway, and a failure there (an input-caused 422 from the
    # vocoder, a 504) still gets its status instead of a cut-off 200.
    async def final_part(step: int, output: list[np.ndarray]) -> bytes:
        return await service.within(deadline, service.cpu(part_bytes, step, output))

    step = 0
    data = await final_part(step, first)
    while not data and step + 1 < n:
        output = (await service.wait(submit(step + 1, budgeted=False), deadline, request))[0]
        step += 1
        data = await final_part(step, output)

    async def parts() -> AsyncIterator[bytes]:
        nonlocal step, data
        pending: list[Future] = []
        try:
            while True:
                if step + 1 < n:  # queue the next run (its input is final now) before sending this part
                    pending = submit(step + 1, budgeted=False)
                if data:
                    yield data
                if step + 1 >= n:
                    break
                output = (await service.wait(pending, deadline))[0]
                pending = []
                step += 1
                data = await final_part(step, output)
            service.metrics.audio_seconds.labels("/v1/decode").inc(total / service.rate)
        except HTTPError as e:
            _LOGGER.warning("streaming decode aborted: %s", e.message)
            request.scope[STATUS_OVERRIDE] = e.status
            raise StreamAborted(e.status, e.message) from None
        except ReconError as e:
            _LOGGER.warning("streaming decode aborted: %s", error_message(e))
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


def _check_finite(wave: np.ndarray) -> None:
    if not np.isfinite(wave).all():
        raise HTTPError(422, "the decoded audio is not finite (latents or gain out of range)")


def _pcm_bytes(chunk: np.ndarray, fmt: str) -> bytes:
    if fmt == "s16le":
        return (np.rint(np.clip(chunk, -1.0, 1.0) * 32767.0)).astype("<i2").tobytes()
    return np.asarray(chunk, dtype="<f4").tobytes()
