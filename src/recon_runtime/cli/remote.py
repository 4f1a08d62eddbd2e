"""The file jobs of `recon-run reconstruct|encode|decode --server URL`: each file sent to a `recon-run serve`.

httpx (the `serve` extra) is imported only when a command runs with --server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from ..contract import SAMPLE_RATE
from ..errors import AudioInputError, BundleError, install_hint
from ..files.audio import atomic_path, write_audio
from ..files.latents import read_latents, save_latents
from ..serving.protocol import SUBTYPE_OF
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
    subtype = SUBTYPE_OF[sample_format]

    def one(src: Path, dst: Path) -> float:
        wave, wav = client.reconstruct_wav(_read_bytes(src), output_rate=output_rate, subtype=subtype)
        with atomic_path(dst) as tmp:  # the server's WAV as it came: no second conversion
            tmp.write_bytes(wav)
        return wave.shape[0] / (output_rate or SAMPLE_RATE)

    return one


def remote_encode(client: Any, sample: bool, seed: int) -> Callable[[Path, Path], float]:
    def one(src: Path, dst: Path) -> float:
        latents, info = client.encode_with_info(_read_bytes(src), sample=sample, seed=seed if sample else None)
        save_latents(
            dst,
            latents,
            src,
            sample_rate=info.sample_rate,
            num_samples=info.num_samples,
            input_sample_rate=info.input_sample_rate,
            gain=info.gain,
            sample=sample,
            seed=seed,
            fingerprint=info.fingerprint,
            scaling_factor=info.scaling_factor,
        )
        return info.num_samples / info.sample_rate

    return one


def remote_decode(client: Any, sample_format: str) -> Callable[[Path, Path], float]:
    info = client.info()
    fingerprint = info["fingerprint"]
    rate = int(info["sample_rate"])
    subtype = SUBTYPE_OF[sample_format]

    def one(src: Path, dst: Path) -> float:
        z, side = read_latents(src, fingerprint)  # the same checks (and messages) as a local decode
        wave = client.decode(
            z,
            num_samples=side.get("num_samples"),
            gain=side.get("gain"),
            fingerprint=side.get("bundle_fingerprint"),
            subtype=subtype,
        )
        write_audio(dst, np.asarray(wave, np.float32), rate, sample_format)
        return wave.shape[0] / rate

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
