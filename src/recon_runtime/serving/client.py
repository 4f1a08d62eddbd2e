"""Python client for `recon-run serve` (httpx): numpy in, numpy out.

    from recon_runtime.serving.client import Client
    with Client("http://127.0.0.1:8000", api_key=None) as c:
        out = c.reconstruct(audio, rate)                  # as Reconstructor.reconstruct
        clip = c.encode_file(audio, rate)                 # EncodedAudio: latents, length, gain, fingerprint
        wave = c.decode_file(clip)                        # at the input's length and level
        z, info = c.encode_with_info(audio, rate)         # or the bare latents and their facts
        wave = c.decode(z, num_samples=info.num_samples, gain=info.gain, fingerprint=info.fingerprint)
        for part in c.decode_stream(z):                   # float32 parts as each vocoder chunk finishes
            ...

Needs the `serve` extra (httpx).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import soundfile as sf

from ..errors import ReconError
from ..files.audio import npy_bytes, wav_bytes
from ..files.encoded import ENCODED_MEDIA_TYPE, EncodedAudio, decode_encoded
from .protocol import (
    ENCODE_FILE,
    H_FINGERPRINT,
    H_FORMAT,
    H_GAIN,
    H_INPUT_RATE,
    H_NUM_SAMPLES,
    H_SAMPLE_RATE,
    H_SAMPLED,
    H_SCALING,
    H_SEED,
    WINDOW_BUDGET_OPTION,
)


class ServerError(ReconError):
    """The server refused or failed a request; `status` is the HTTP status, the message the server's."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EncodeInfo:
    """The facts the encode response's headers carry (the CLI's sidecar holds the same)."""

    num_samples: int
    gain: float
    sample_rate: int
    input_sample_rate: int
    fingerprint: str
    scaling_factor: float
    sampled: bool
    seed: int | None


def _audio_body(audio: np.ndarray | bytes, sample_rate: int | None) -> bytes:
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return bytes(audio)  # a file's contents, in any format the server's libsndfile reads
    if sample_rate is None:
        raise ValueError("sample_rate is required with an array")
    return wav_bytes(audio, sample_rate)


class Client:
    """A connection pool to one server. Thread-safe (httpx.Client is)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0, **httpx_kwargs: Any):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, **httpx_kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _post(
        self, path: str, body: bytes, params: dict[str, Any], headers: dict[str, str] | None = None
    ) -> httpx.Response:
        params = {k: _param(v) for k, v in params.items() if v is not None}
        try:
            r = self._http.post(path, content=body, params=params, headers=headers)
        except httpx.HTTPError as e:
            raise ServerError(0, f"{self.url}{path}: {type(e).__name__}: {e}") from None
        _check(r, self.url + path)
        return r

    def info(self) -> dict[str, Any]:
        """The server's model (source, weights, provider, precision, fingerprint) and limits."""
        try:
            r = self._http.get("/v1/info")
        except httpx.HTTPError as e:
            raise ServerError(0, f"{self.url}/v1/info: {type(e).__name__}: {e}") from None
        _check(r, self.url + "/v1/info")
        return r.json()

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    # ------------------------------------------------------------------ jobs
    def reconstruct(
        self,
        audio: np.ndarray | bytes,
        sample_rate: int | None = None,
        output_rate: int | None = None,
        subtype: str = "float",
    ) -> np.ndarray:
        """Audio (an array with its rate, or a file's bytes) -> float32 reconstruction at `output_rate`."""
        return self.reconstruct_wav(audio, sample_rate, output_rate, subtype)[0]

    def reconstruct_wav(
        self,
        audio: np.ndarray | bytes,
        sample_rate: int | None = None,
        output_rate: int | None = None,
        subtype: str = "float",
    ) -> tuple[np.ndarray, bytes]:
        """As `reconstruct`, also returning the WAV bytes the server sent."""
        r = self._post(
            "/v1/reconstruct", _audio_body(audio, sample_rate), {"output_rate": output_rate, "subtype": subtype}
        )
        wave, _ = sf.read(io.BytesIO(r.content), dtype="float32")
        return wave, r.content

    def encode(
        self, audio: np.ndarray | bytes, sample_rate: int | None = None, sample: bool = False, seed: int | None = None
    ) -> np.ndarray:
        """Audio -> scaled latents float32 [8, ceil(T/4), 16] (as Reconstructor.encode)."""
        return self.encode_with_info(audio, sample_rate, sample, seed)[0]

    def encode_with_info(
        self, audio: np.ndarray | bytes, sample_rate: int | None = None, sample: bool = False, seed: int | None = None
    ) -> tuple[np.ndarray, EncodeInfo]:
        r = self._post("/v1/encode", _audio_body(audio, sample_rate), {"sample": sample, "seed": seed})
        z = np.load(io.BytesIO(r.content), allow_pickle=False)
        h = r.headers
        info = EncodeInfo(
            num_samples=int(h[H_NUM_SAMPLES]),
            gain=float(h[H_GAIN]),
            sample_rate=int(h[H_SAMPLE_RATE]),
            input_sample_rate=int(h[H_INPUT_RATE]),
            fingerprint=h[H_FINGERPRINT],
            scaling_factor=float(h[H_SCALING]),
            sampled=h.get(H_SAMPLED) == "true",
            seed=int(h[H_SEED]) if h.get(H_SEED) else None,
        )
        return z, info

    def encode_file(
        self, audio: np.ndarray | bytes, sample_rate: int | None = None, sample: bool = False, seed: int | None = None
    ) -> EncodedAudio:
        """Audio -> one encoded clip (the server's encoded-audio answer, read and checked): the latents
        and everything `decode_file` needs, as `recon-run encode` writes it (without a source path)."""
        r = self._post(
            "/v1/encode",
            _audio_body(audio, sample_rate),
            {"sample": sample, "seed": seed, "format": ENCODE_FILE},
            {"Accept": ENCODED_MEDIA_TYPE},
        )
        kind = r.headers.get("content-type", "").split(";")[0].strip()
        if kind != ENCODED_MEDIA_TYPE:
            raise ServerError(
                r.status_code, f"{self.url}/v1/encode: answered {kind or 'no content type'}, not {ENCODED_MEDIA_TYPE}"
            )
        return EncodedAudio.from_bytes(r.content, f"{self.url}/v1/encode's answer")

    def decode_file(self, encoded: EncodedAudio, subtype: str = "float") -> np.ndarray:
        """An encoded clip -> float32 audio at its recorded length and level: [samples] for one channel,
        [samples, channels] for several (as `channels.decode_audio` in-process).

        A clip longer than the server's window budget (`--max-windows`, 413) is decoded as a stream
        instead, channel by channel (float32 whatever `subtype`). The server refuses a clip of
        another bundle (422).
        """
        try:
            r = self._post("/v1/decode", encoded.to_bytes(), {"subtype": subtype}, {"Content-Type": ENCODED_MEDIA_TYPE})
        except ServerError as e:
            if e.status != 413 or WINDOW_BUDGET_OPTION not in str(e):
                raise
            fingerprint = encoded.bundle_fingerprint

            def stream(z: np.ndarray, n: int) -> np.ndarray:
                parts = list(self.decode_stream(z, n, None, fingerprint))
                return np.concatenate(parts) if parts else np.zeros(0, np.float32)

            return decode_encoded(encoded, stream)
        wave, _ = sf.read(io.BytesIO(r.content), dtype="float32")
        return wave

    def decode(
        self,
        latents: np.ndarray,
        num_samples: int | None = None,
        gain: float | None = None,
        fingerprint: str | None = None,
        subtype: str = "float",
    ) -> np.ndarray:
        """Scaled latents [8, L, 16] -> 16 kHz float32 audio (as Reconstructor.decode, times `gain`).

        Latents longer than the server's window budget (`--max-windows`, 413) are decoded as a
        stream instead, one window at a time (float32 whatever `subtype`).

        Args:
            fingerprint: the bundle fingerprint the latents were made with; the server refuses
                them (422) if it runs another.
        """
        try:
            r = self._post(
                "/v1/decode",
                npy_bytes(latents),
                {"num_samples": num_samples, "gain": gain, "subtype": subtype},
                {H_FINGERPRINT: fingerprint} if fingerprint else None,
            )
        except ServerError as e:
            if e.status != 413 or WINDOW_BUDGET_OPTION not in str(e):
                raise
            parts = list(self.decode_stream(latents, num_samples, gain, fingerprint))
            return np.concatenate(parts) if parts else np.zeros(0, np.float32)
        wave, _ = sf.read(io.BytesIO(r.content), dtype="float32")
        return wave

    def decode_stream(
        self,
        latents: np.ndarray,
        num_samples: int | None = None,
        gain: float | None = None,
        fingerprint: str | None = None,
    ) -> Iterator[np.ndarray]:
        """As `decode`, yielding float32 parts as the server finishes each window.

        Raises ServerError if the stream ends before the announced number of samples.
        """
        params = {k: _param(v) for k, v in {"num_samples": num_samples, "gain": gain}.items() if v is not None}
        params["stream"] = "true"
        headers = {H_FINGERPRINT: fingerprint} if fingerprint else None
        try:
            with self._http.stream(
                "POST", "/v1/decode", content=npy_bytes(latents), params=params, headers=headers
            ) as r:
                if r.status_code != 200:
                    r.read()
                    _check(r, self.url + "/v1/decode")
                if r.headers.get(H_FORMAT) != "f32le":
                    raise ServerError(r.status_code, f"unexpected stream format {r.headers.get(H_FORMAT)!r}")
                expected = int(r.headers[H_NUM_SAMPLES])
                got = 0
                rest = b""
                for data in r.iter_raw():
                    data = rest + data
                    usable = len(data) - len(data) % 4
                    rest = data[usable:]
                    if usable:
                        part = np.frombuffer(data[:usable], dtype="<f4").astype(np.float32)
                        got += part.size
                        yield part
                if got != expected or rest:
                    raise ServerError(200, f"stream ended after {got} of {expected} samples")
        except httpx.HTTPError as e:
            raise ServerError(0, f"{self.url}/v1/decode: {type(e).__name__}: {e}") from None


def _param(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _check(r: httpx.Response, where: str) -> None:
    if r.status_code < 400:
        return
    try:
        message = r.json().get("error")
    except ValueError:
        message = None
    raise ServerError(r.status_code, f"{where}: HTTP {r.status_code}: {message or r.reason_phrase}")
