"""`ServerConfig`: everything `recon-run serve` takes (the model options of `LoadOptions` and the
service's limits), also read from `RECON_*` variables for hosts that build the app without the CLI."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..contract import LATENT_DOWNSAMPLE
from ..options import LoadOptions

_LOGGER = logging.getLogger(__name__)

SERVER_BUCKET_FRAMES = LATENT_DOWNSAMPLE
"""The server's default `bucket_frames`: the Reconstructor's default, so outputs equal the runtime's.
A larger multiple of 4 (e.g. 128, `--bucket-frames`) lets short clips of different lengths share batches."""


TIMEOUT_PER_AUDIO_S = 2.0
"""Deadline seconds per second of audio: a full-size chain on a 2-core CPU took 0.5 s per audio
second on a quiet machine (the default serve, 1.94-2.00 audio-s/s), 0.7-0.9 s with other jobs on the
cores (1.14-1.43 audio-s/s) and 1.8 s on the AVX2-only CPU (10.24 s in 18.2 s); 2 s covers the slowest,
so a default server (600 s of audio at most, 120 s + 1200 s) never admits what it would surely 504.
docs/serving.md has the measurements."""


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
    """A request's deadline (504 beyond), plus `timeout_per_audio_s` for each second of its audio."""
    timeout_per_audio_s: float = TIMEOUT_PER_AUDIO_S
    """Seconds the deadline grows per second of audio a request declares (its audio header, or its
    latents' .npy header), so that what `max_seconds` admits has the time it needs; 0: `timeout_s` alone."""
    api_key: str | None = None
    """The key itself (`recon-run serve --api-key-env VAR` reads it from the environment)."""
    bucket_frames: int = SERVER_BUCKET_FRAMES
    """Outputs equal `Reconstructor.load(model, bucket_frames=N)`; the default is the runtime's."""
    body_timeout_s: float = 30.0
    """The whole upload must arrive within this (408 beyond); /v1/compare, whose body limit is larger,
    gets this scaled by its limit over max_body_mb (as long per byte)."""
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
        for name in ("max_wait_ms", "min_upload_rate", "timeout_per_audio_s"):
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
        RECON_TIMEOUT_PER_AUDIO_S, RECON_BUCKET_FRAMES, RECON_BODY_TIMEOUT_S, RECON_MAX_UPLOADS, RECON_MAX_DECODED_MB,
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
            kwargs["api_key"] = api_key_from(key_var, env, "RECON_API_KEY_ENV names")
        elif env.get("RECON_API_KEY"):
            _LOGGER.warning(
                "RECON_API_KEY is set but not read: the server reads its key from the variable that "
                "RECON_API_KEY_ENV names (RECON_API_KEY_ENV=RECON_API_KEY to use this one); no key is required"
            )
        return cls(**kwargs)


def api_key_from(var: str, environ: Mapping[str, str] | None = None, named_by: str = "--api-key-env") -> str:
    """The API key held in the environment variable `var` (a key is never a flag or a setting of its own,
    so it stays out of `ps` and of the logs); ValueError, naming `var` as `named_by` names it, when it
    is not set or empty. The server (`ServerConfig.from_env`, `recon-run serve --api-key-env`) and the
    client (`--server URL --api-key-env`) read it here."""
    key = (os.environ if environ is None else environ).get(var)
    if not key:
        raise ValueError(f"{named_by} {var}: the environment variable {var} is not set or empty")
    return key


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


def bind_is_loopback(host: str) -> bool:
    """True for the loopback addresses (the default bind); anything else is reachable from the network."""
    return host in ("127.0.0.1", "::1", "localhost")
