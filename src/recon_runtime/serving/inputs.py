"""Requests in: the body (bounded in size, time and rate), its multipart form, and the audio or
latents it holds, parsed and checked before any work (413 past the limits, from the headers first).

Everything here runs on the service's CPU pool or reads the request; nothing touches the batcher.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import soundfile as sf
from fastapi import Request
from numpy.lib.format import MAGIC_PREFIX
from starlette.requests import ClientDisconnect

from ..contract import latent_shape_problem
from ..errors import AudioInputError
from ..files.audio import AudioTooLarge, read_array_bytes, read_audio_bytes, read_npy_header
from ..files.encoded import ENCODED_MEDIA_TYPE, LATENTS_TENSOR, MAX_HEADER_BYTES, EncodedAudio, check_fingerprint
from ..reconstructor import SAMPLES_PER_LATENT_FRAME, Reconstructor
from ..windows import Features
from .config import ServerConfig
from .errors import ClientGone, HTTPError, PayloadTooLarge

_LOGGER = logging.getLogger(__name__)

UPLOADED_ENCODED = "uploaded encoded audio"
"""Names an encoded-file upload in its errors (never a server path)."""

UPLOAD_GRACE_S = 5.0
"""An upload may lag for this long after its request head before --min-upload-rate applies (a lost
first packet is resent after 1 s, then 3 s): from then on the bytes received must keep up with
rate x (seconds since the head - this), as Apache's mod_reqtimeout counts `body=20,MinRate=500`.
Waiting for an upload slot counts against it, and a body waits for a slot at most this long (503
beyond): a request that sends nothing holds nothing for longer."""


class BodyReader:
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


def multipart_file(scope: dict[str, Any], body: bytes) -> bytes:
    """The `file` field of a multipart body that was already read (and size-checked)."""
    data = form_files(scope, body, ("file",))["file"]
    if data is None:
        raise HTTPError(400, "multipart body needs a file field named `file`")
    return data


def form_files(scope: dict[str, Any], body: bytes, names: Sequence[str]) -> dict[str, bytes | None]:
    """The files `names` of a multipart body that was already read (and size-checked), None for a name
    the form lacks (or holds as text); a body that does not parse is a 400. Parsed on a worker thread
    (in an event loop of its own) so a large form never stalls the server's loop."""
    return asyncio.run(_form_files(scope, body, names))


async def _form_files(scope: dict[str, Any], body: bytes, names: Sequence[str]) -> dict[str, bytes | None]:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, replay).form(max_files=len(names), max_fields=16)
    except Exception as e:  # noqa: BLE001 - any parser complaint is the client's malformed form
        raise HTTPError(400, f"malformed multipart body ({' '.join(str(e).split()) or type(e).__name__})") from None
    try:
        files: dict[str, bytes | None] = {}
        for name in names:
            item = form.get(name)
            files[name] = None if item is None or isinstance(item, str) else await item.read()
        return files
    finally:
        await form.close()


def check_response(config: ServerConfig, samples: float, bytes_per_sample: int, what: str) -> None:
    """413 when an answer of `samples` samples (at `bytes_per_sample`) is over `max_response_mb`."""
    budget = config.max_response_mb * 2**20
    size = samples * bytes_per_sample
    if size > budget:
        raise PayloadTooLarge(
            f"the answer would be {size / 2**20:.0f} MiB ({what}), over the limit of {budget / 2**20:g} MiB "
            "(--max-response-mb)"
        )


AUDIO: Final = "audio"
LATENTS: Final = "latents"


def declared_seconds(body: bytes, kind: str, rate: int) -> float:
    """Seconds of audio a body declares in its header, without decoding it: an audio file's frames
    over its rate (AUDIO); for LATENTS, at the model's `rate`, the frames of a .npy or those of every
    channel of an encoded file (its safetensors header); 0 for a body whose header says none or does
    not parse (the request is refused later, with its reason)."""
    try:
        if kind == LATENTS and is_encoded(None, body):
            size = int.from_bytes(body[:8], "little")
            if size > MAX_HEADER_BYTES:
                return 0.0
            channels, _, frames, _ = json.loads(body[8 : 8 + size])[LATENTS_TENSOR]["shape"]
            return channels * frames * SAMPLES_PER_LATENT_FRAME / rate
        if kind == LATENTS:
            shape = read_npy_header(io.BytesIO(body))[0]  # the header only, as read_array_bytes reads it
            return shape[1] * SAMPLES_PER_LATENT_FRAME / rate if len(shape) == 3 else 0.0
        info = sf.info(io.BytesIO(body))
        return info.frames / info.samplerate if info.samplerate > 0 and 0 < info.frames < 2**62 else 0.0
    except Exception:  # noqa: BLE001 - not this function's to refuse: features()/latents() say what is wrong
        return 0.0


def features(
    rec: Reconstructor, config: ServerConfig, body: bytes, answer: Callable[[float], None] | None = None
) -> tuple[Features, int]:
    """Decode the uploaded audio (refusing it past `max_seconds` or `max_decoded_mb` from its
    header, before decoding) and prepare it. `answer(seconds)` refuses what the audio's answer
    would be (past `max_response_mb`), also from the header.

    Returns:
        (Features, the upload's sample rate).
    """
    prepared = upload(rec, config, body, answer)
    return prepared.features, prepared.sample_rate


@dataclass(frozen=True)
class Upload:
    """Uploaded audio, prepared: its features (the channels mixed, as the front end does) and what the
    upload was (the encoded file records both)."""

    features: Features
    sample_rate: int
    channels: int


def upload(
    rec: Reconstructor, config: ServerConfig, body: bytes, answer: Callable[[float], None] | None = None
) -> Upload:
    """As `features`, also giving the upload's channel count."""
    limit = config.max_seconds

    def check(frames: int, rate: int) -> None:
        if rate > 0 and 0 < frames < 2**62 and frames / rate > limit:
            raise PayloadTooLarge(f"audio of {frames / rate:.1f} s is over the limit of {limit:g} s")
        if answer is not None and rate > 0 and 0 < frames < 2**62:
            answer(frames / rate)

    budget = int(config.max_decoded_mb * 2**20)
    try:
        audio, rate = read_audio_bytes(body, "uploaded audio", check, max_decoded_bytes=budget)
    except AudioTooLarge as e:
        raise PayloadTooLarge(str(e)) from None
    check(audio.shape[0], rate)  # some formats do not state their length up front
    if audio.shape[0] * rec.contract.mel.sample_rate < rate:  # under one sample at the model's rate
        raise AudioInputError(f"uploaded audio: {audio.shape[0]} samples at {rate} Hz is shorter than one sample")
    channels = sf.info(io.BytesIO(body)).channels  # the header again (read_audio_bytes mixed while it decoded)
    return Upload(rec.features(audio, rate), rate, int(channels))


def latents(
    rec: Reconstructor,
    config: ServerConfig,
    body: bytes,
    fingerprint: str | None,
    num_samples: int | None = None,
    bytes_per_sample: int = 4,
) -> np.ndarray:
    """The uploaded latents, checked (run it on the CPU pool: it parses and scans the whole body),
    and their answer (at most `num_samples` samples of `bytes_per_sample`) against `max_response_mb`."""
    _check_fingerprint(rec, fingerprint)

    def check(shape: tuple[int, ...], dtype: np.dtype) -> None:
        _check_latents(config, shape, dtype, rec.contract.mel.sample_rate)
        samples = shape[1] * SAMPLES_PER_LATENT_FRAME
        samples = min(samples, num_samples) if num_samples is not None else samples
        check_response(config, samples, bytes_per_sample, f"{samples / rec.contract.mel.sample_rate:.1f} s of audio")

    z = read_array_bytes(body, "uploaded latents", check)
    z = np.array(z, np.float32)  # a writable copy (the upload's bytes are read-only)
    if not np.isfinite(z).all():
        raise HTTPError(400, "latents contain NaN or inf (or values past float32's range)")
    return z


def is_encoded(content_type: str | None, body: bytes) -> bool:
    """Whether a /v1/decode body is an encoded-audio file rather than a .npy: its content type says so,
    or (curl --data-binary sends none of ours) it does not begin as a .npy does and begins as a
    safetensors file does (an 8-byte header length, then the JSON header)."""
    if (content_type or "").split(";")[0].strip().lower() == ENCODED_MEDIA_TYPE:
        return True
    return not body.startswith(MAGIC_PREFIX) and body[8:9] == b"{"


def encoded(
    rec: Reconstructor, config: ServerConfig, body: bytes, fingerprint: str | None, bytes_per_sample: int = 4
) -> EncodedAudio:
    """An uploaded encoded-audio file, checked (run it on the CPU pool), and its answer (every channel at
    its recorded length, `bytes_per_sample`) against `max_response_mb`.

    Refused: not an encoded file, damaged, or of a format version this build does not read (400, naming
    the versions it reads); of another bundle (422, by the file's fingerprint or the header's); of
    another sample rate (422); past `max_seconds` or `max_decoded_mb` (413).
    """
    _check_fingerprint(rec, fingerprint)
    clip = EncodedAudio.from_bytes(body, UPLOADED_ENCODED)
    contract = rec.contract
    check_fingerprint(clip, contract.fingerprint, UPLOADED_ENCODED)
    rate = contract.mel.sample_rate
    if clip.sample_rate != rate:
        raise HTTPError(422, f"{UPLOADED_ENCODED}: decodes at {clip.sample_rate} Hz, this server's bundle at {rate} Hz")
    z = clip.latents
    _check_latents(config, z.shape[1:], z.dtype, rate, channels=clip.channels)
    check_response(
        config,
        clip.num_samples * clip.channels,
        bytes_per_sample,
        f"{clip.num_samples / rate:.1f} s of audio, {clip.channels} channel(s)",
    )
    return clip


def _check_fingerprint(rec: Reconstructor, fingerprint: str | None) -> None:
    """422 when the request's fingerprint header names other decoding weights than the server's."""
    if fingerprint is not None and fingerprint != rec.contract.fingerprint:
        raise HTTPError(
            422,
            f"latents come from another model (bundle {fingerprint}, this server {rec.contract.fingerprint}); "
            "decode them with the bundle that encoded them",
        )


def _check_latents(config: ServerConfig, shape: tuple[int, ...], dtype: np.dtype, rate: int, channels: int = 1) -> None:
    """Refuse latents from their .npy header (or an encoded file's one channel), before their data is
    touched or anything allocated; `channels` of them count against `max_decoded_mb`."""
    problem = latent_shape_problem(shape)
    if problem:
        raise HTTPError(422, problem)
    if dtype.kind != "f":
        raise HTTPError(422, f"latents must be float16, float32 or float64, got {dtype}")
    seconds = shape[1] * SAMPLES_PER_LATENT_FRAME / rate
    if seconds > config.max_seconds:
        raise PayloadTooLarge(f"latents of {seconds:.1f} s are over the limit of {config.max_seconds:g} s")
    size = channels * shape[0] * shape[1] * shape[2] * max(dtype.itemsize, 4)  # as sent, or as the float32 copy
    budget = int(config.max_decoded_mb * 2**20)
    if size > budget:
        raise PayloadTooLarge(
            f"latents of {size / 2**20:.0f} MiB are over the limit of {budget / 2**20:.0f} MiB (--max-decoded-mb)"
        )
