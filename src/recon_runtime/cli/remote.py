"""The file jobs of `recon-run reconstruct|encode|decode --server URL`: each file sent to a `recon-run serve`.

httpx (the `serve` extra) is imported only when a command runs with --server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from ..errors import AudioInputError, BundleError, install_hint
from ..files.audio import atomic_path
from ..files.encoded import EncodedAudio, decode_encoded, read_latents
from ..files.outputs import write_audio_file
from .options import api_key_from_env


def need_serve_extra(what: str) -> None:
    missing = [m for m in ("fastapi", "uvicorn", "httpx", "prometheus_client", "multipart") if not _importable(m)]
    if what == "client":
        missing = [m for m in missing if m == "httpx"]
    if missing:
        raise click.ClickException(f"{', '.join(missing)} not installed: {install_hint('serve')}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def remote_client(server: str, api_key_env: str | None, expect_digest: str | None = None) -> Any:
    """A client of `server`; with `expect_digest`, refused before any file runs unless the server's
    bundle (its /v1/info digest) is the pinned one."""
    need_serve_extra("client")
    from ..serving.client import Client

    client = Client(server, api_key=api_key_from_env(api_key_env))
    if expect_digest is not None:
        try:
            digest = client.info().get("digest")
        except BaseException:
            client.close()
            raise
        if digest != expect_digest:
            client.close()
            raise BundleError(
                f"{server}: the server's bundle digest is {digest}, expected {expect_digest} (--expect-digest); "
                "this is not the bundle you pinned"
            )
    return client


def remote_reconstruct(client: Any, output_rate: int | None, sample_format: str) -> Callable[[Path, Path], float]:
    subtype = "pcm16" if sample_format == "pcm16" else "float"

    def one(src: Path, dst: Path) -> float:
        wave, wav = client.reconstruct_wav(_read_bytes(src), output_rate=output_rate, subtype=subtype)
        rate = output_rate or 16000
        if dst.suffix.lower() == ".wav":
            with atomic_path(dst) as tmp:  # the server's WAV as it came: no second conversion
                tmp.write_bytes(wav)
        else:  # flac, ogg: the server answers WAV
            write_audio_file(dst, np.asarray(wave, np.float32), rate, sample_format=sample_format)
        return wave.shape[0] / rate

    return one


def remote_encode(client: Any, sample: bool, seed: int) -> Callable[[Path, Path], float]:
    def one(src: Path, dst: Path) -> float:
        latents, info = client.encode_with_info(_read_bytes(src), sample=sample, seed=seed if sample else None)
        EncodedAudio(
            latents[None],
            info.num_samples,
            (info.gain,),
            info.fingerprint,
            sample_rate=info.sample_rate,
            sampled=info.sampled,
            seed=info.seed,
            input_sample_rate=info.input_sample_rate,
            scaling_factor=info.scaling_factor,
            source=str(src),
        ).save(dst)
        return info.num_samples / info.sample_rate

    return one


def remote_decode(
    client: Any, sample_format: str, seconds: float | None, num_samples: int | None
) -> Callable[[Path, list[Path]], float]:
    info = client.info()
    fingerprint = info["fingerprint"]
    rate = int(info["sample_rate"])

    def one(src: Path, outputs: list[Path]) -> float:
        # the same reader, checks and messages as a local decode; the server decodes channel by channel
        clips = read_latents(src, fingerprint, seconds=seconds, num_samples=num_samples, sample_rate=rate)
        if len(clips) != len(outputs):
            raise AudioInputError(f"{src}: holds {len(clips)} clips now, {len(outputs)} when the run began")
        for clip, dst in zip(clips, outputs):

            def decode(z: np.ndarray, n: int, clip: EncodedAudio = clip) -> np.ndarray:
                return client.decode(z, num_samples=n, fingerprint=clip.bundle_fingerprint, subtype="float")

            write_audio_file(dst, decode_encoded(clip, decode), rate, sample_format=sample_format)
        return sum(clip.seconds for clip in clips)

    return one


def _read_bytes(src: Path) -> bytes:
    if not src.exists():
        raise AudioInputError(f"{src}: no such file")
    if src.is_dir():
        raise AudioInputError(f"{src}: is a folder, not an audio file")
    try:
        data = src.read_bytes()
    except OSError as e:
        raise AudioInputError(f"{src}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise AudioInputError(f"{src}: empty file (0 bytes)")
    return data
