"""The listening page at `/` (static files in `static/`) and `/v1/compare`, which it calls for the
spectrograms and metrics of an input and its reconstruction.

`/v1/compare` takes the original and the reconstruction `/v1/reconstruct` gave for it (a multipart
form: one model run serves both the listening and the comparison) and returns both AudioLDM2
log-mels on one colour scale, reduced to a bounded number of time columns, with the metrics
`recon-run reconstruct --metrics` writes: the same prepared input, the same reconstruction at the
prepared level, the same `metrics.compare`. It runs no graph; it is admitted, bounded and refused
like the inference routes (`Service.accept`, the CPU pool, the request deadline).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import soxr
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..errors import AudioInputError
from ..files.audio import AudioTooLarge, read_audio_bytes
from ..files.metrics import compare
from ..frontend import log_mel
from . import inputs
from .errors import HTTPError

if TYPE_CHECKING:
    from ..contract import MelSpec
    from ..windows import Features

STATIC_DIR: Final = Path(__file__).with_name("static")
PAGE_PATHS: Final = ("/", "/index.html")
STATIC_PREFIX: Final = "/static/"
DEFAULT_COLUMNS: Final = 2048
"""Time columns per mel by default: 20 s of 10 ms frames unreduced, as wide as a desktop screen's pixels."""
MAX_COLUMNS: Final = 8192
"""The most time columns `/v1/compare` returns: bounds its answer (two mels of 64 bands, one byte a
value, base64) to 1.4 MB whatever the input's length."""
FIELDS: Final = ("original", "reconstruction")
LENGTH_TOLERANCE_S: Final = 0.01
"""How much the reconstruction's length may differ from the original's (one mel hop; resampling
rounds a sample or two)."""
LEVELS: Final = 255
MEL_ENCODING: Final = (
    "base64 of uint8 [columns, n_mels], time first, band 0 the lowest; value = min + byte / 255 * (max - min)"
)
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page loads nothing from another origin (it works offline), and says so to the browser."""
PAGE_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_public(path: str) -> bool:
    """The page and its assets load without the API key (they hold no data; every API call the page
    makes sends the key the user typed in)."""
    return path in PAGE_PATHS or path.startswith(STATIC_PREFIX)


def compare_limit_bytes(max_body_mb: float, max_seconds: float, sample_rate: int) -> int:
    """The largest `/v1/compare` body: an original within --max-body-mb plus its reconstruction as
    `/v1/reconstruct` sends it (a float32 WAV at `sample_rate`, at most --max-seconds long)."""
    return int(max_body_mb * 2**20) + int(max_seconds * sample_rate) * 4 + 4096


def mel_columns(mel: np.ndarray, columns: int) -> np.ndarray:
    """A log-mel [T, n_mels] reduced to at most `columns` time columns, each the mean of its frames.

    Returns:
        float32 [min(T, columns), n_mels]; column j averages frames [floor(j T / C), floor((j + 1) T / C)).
    """
    frames = mel.shape[0]
    if frames <= columns:
        return mel.astype(np.float32, copy=False)
    edges = (np.arange(columns + 1, dtype=np.int64) * frames) // columns
    sums = np.add.reduceat(mel.astype(np.float64), edges[:-1], axis=0)
    return (sums / np.diff(edges)[:, None]).astype(np.float32)


def quantise(mel: np.ndarray, lo: float, hi: float) -> str:
    """base64 of `mel` mapped linearly from [lo, hi] to bytes 0..255 (MEL_ENCODING)."""
    q = np.rint((mel.astype(np.float64) - lo) * (LEVELS / (hi - lo)))
    return base64.b64encode(np.clip(q, 0, LEVELS).astype(np.uint8).tobytes()).decode("ascii")


def comparison(feats: Features, wave: np.ndarray, mel: MelSpec, columns: int) -> dict[str, Any]:
    """The two log-mels on one scale and the metrics, for the page.

    Args:
        feats: the prepared original (`Reconstructor.features`).
        wave: the reconstruction, float32 [feats.num_samples] at the front end's rate and the prepared
            level (what `Reconstructor.finish` takes), as `recon-run reconstruct --metrics` compares it.
        mel: the bundle's front end.
        columns: at most this many time columns per mel.
    Returns:
        JSON-ready: shapes, the shared scale in nats, both mels (MEL_ENCODING) and
        `metrics.compare(feats.waveform, wave)`.
    """
    sample_rate = int(mel.sample_rate)
    original = feats.log_mel
    rebuilt = log_mel(wave, mel)
    metrics = compare(feats.waveform, wave, mel)
    a, b = mel_columns(original, columns), mel_columns(rebuilt, columns)
    lo = float(min(a.min(), b.min()))
    hi = float(max(a.max(), b.max()))
    hi = hi if hi > lo else lo + 1.0  # silence: one value everywhere
    frames = int(original.shape[0])
    return {
        "sample_rate": sample_rate,
        "num_samples": int(feats.num_samples),
        "seconds": feats.num_samples / sample_rate,
        "frames": frames,
        "n_mels": int(original.shape[1]),
        "columns": int(a.shape[0]),
        "frames_per_column": frames / a.shape[0],
        "scale": {"min": lo, "max": hi, "unit": "nats (natural log of the mel magnitude)"},
        "encoding": MEL_ENCODING,
        "mels": {"original": quantise(a, lo, hi), "reconstruction": quantise(b, lo, hi)},
        "metrics": metrics,
    }


def _form_files(scope: dict[str, Any], body: bytes) -> dict[str, bytes]:
    """The FIELDS files of a multipart body already read and size-checked (run on a worker thread)."""
    files = inputs.form_files(scope, body, FIELDS)
    for name in FIELDS:
        data = files[name]
        if data is None:
            raise HTTPError(400, f"the form needs the files `{FIELDS[0]}` and `{FIELDS[1]}` (no `{name}`)")
        if not data:
            raise HTTPError(400, f"`{name}` is empty (0 bytes)")
    return files  # type: ignore[return-value]


def _reconstruction(service: Any, data: bytes, feats: Features) -> np.ndarray:
    """The uploaded reconstruction (at the original's level) as float32 [feats.num_samples] at the
    model's rate and the prepared level, refused (from its header, before decoding) when its length
    is not the original's."""
    rate = service.rate
    want = feats.num_samples / rate

    def check(frames: int, file_rate: int) -> None:
        if file_rate > 0 and 0 < frames < 2**62 and abs(frames / file_rate - want) > LENGTH_TOLERANCE_S:
            raise HTTPError(
                422,
                f"the reconstruction lasts {frames / file_rate:.3f} s and the original {want:.3f} s: "
                "send the reconstruction /v1/reconstruct gave for this original",
            )

    budget = int(service.config.max_decoded_mb * 2**20)
    try:
        audio, file_rate = read_audio_bytes(data, "uploaded reconstruction", check, max_decoded_bytes=budget)
    except AudioTooLarge as e:
        raise HTTPError(413, str(e)) from None
    check(audio.shape[0], file_rate)  # formats that do not state their length up front
    if file_rate != rate:
        audio = soxr.resample(audio, file_rate, rate, quality="HQ").astype(np.float32, copy=False)
    audio = audio[: feats.num_samples]
    if audio.size < feats.num_samples:
        audio = np.pad(audio, (0, feats.num_samples - audio.size))
    with np.errstate(over="ignore", invalid="ignore"):
        wave = audio / np.float32(feats.gain)
    if not np.isfinite(wave).all():
        raise AudioInputError("uploaded reconstruction: past float32's range at the original's prepared level")
    return wave


router = APIRouter()
"""The page at `/` (and `/index.html`) and `/v1/compare`; `mount_page` adds its assets at `/static/`."""


@router.get("/", include_in_schema=False)
@router.get("/index.html", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.post(
    "/v1/compare",
    summary="An original and its reconstruction -> both AudioLDM2 log-mels on one scale, and the --metrics metrics",
    openapi_extra={"requestBody": {"content": {"multipart/form-data": {}}}},
)
async def compare_route(
    request: Request,
    columns: int = Query(
        DEFAULT_COLUMNS,
        ge=1,
        le=MAX_COLUMNS,
        description="At most this many time columns per mel (means of frames)",
    ),
) -> dict[str, Any]:
    service = request.app.state.service
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPError(400, f"send a multipart form with the files `{FIELDS[0]}` and `{FIELDS[1]}`")
    service.check_capacity()  # its limit needs the loaded model's rate; a full server refuses before the body
    config = service.config
    limit = compare_limit_bytes(config.max_body_mb, config.max_seconds, service.rate)
    body, _, deadline = await service.accept(request, limit=limit, raw=True)
    files = await service.within(deadline, service.cpu(_form_files, request.scope, body))
    del body  # each step lets go of what it no longer needs: a 10-minute pair is 77 MB as sent
    original_limit = int(config.max_body_mb * 2**20)
    if len(files["original"]) > original_limit:
        raise HTTPError(
            413, f"`original` of {len(files['original'])} bytes is over the limit of {original_limit} bytes"
        )
    feats, _ = await service.within(deadline, service.cpu(inputs.features, service.rec, config, files.pop("original")))
    wave = await service.within(deadline, service.cpu(_reconstruction, service, files.pop("reconstruction"), feats))
    return await service.within(deadline, service.cpu(comparison, feats, wave, service.rec.contract.mel, columns))


def mount_page(app: FastAPI) -> None:
    """Serve the page's routes and its assets at `/static/` (the app's `Service` admits, reads and bounds
    /v1/compare; the API key middleware lets `is_public` paths through)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
