"""The file jobs of `recon-run reconstruct|encode|decode --server URL`: each file sent to a `recon-run serve`.

`--concurrency N` files are in flight at once (`serving.retry.run_bounded`), so that a bulk run
fills the server's batches; a busy server's 503 (or a proxy's 429) is sent again after its
Retry-After, within the bounds of `serving.retry.RetryPolicy` (`retrying_client`), so only a file
that exhausts them fails. Which files run, and the overwrite rules, are decided in the calling
thread as slots free up; each file's end is booked there too (the progress bar and the summary,
which says how many requests were sent again, need no lock).

httpx (the `serve` extra) is imported only when a command runs with --server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import SAMPLE_RATE
from ..errors import AudioInputError, BundleError, install_hint
from ..files.audio import atomic_path
from ..files.encoded import read_latents
from ..files.outputs import write_audio_file
from ..serving.protocol import SUBTYPE_OF
from .batch import Job, JobRunner, progress
from .options import CommandError, api_key_from_env, draw_seed


def need_serve_extra(what: str) -> None:
    missing = [m for m in ("fastapi", "uvicorn", "httpx", "prometheus_client", "multipart") if not _importable(m)]
    if what == "client":
        missing = [m for m in missing if m == "httpx"]
    if missing:
        raise CommandError(f"{', '.join(missing)} not installed: {install_hint('serve')}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@dataclass
class Remote:
    """A server's client for one command, its retrying transport, and how many files go at once."""

    client: Any
    transport: Any
    concurrency: int

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def run(self, runner: JobRunner, jobs: list[Job], work: Callable[[Path, Path], float]) -> int:
        """`work(src, dst)` for each job `runner.prepare` let through, at most `concurrency` at once;
        returns the exit code.

        `runner.ready` (the overwrite rules once more) runs in this thread, for each job only once a
        slot is free; each outcome is booked here as it ends, a failure as the one line of its file.
        """
        bar = progress(jobs, runner.what)

        def ready() -> Iterator[Job]:
            for job in jobs:
                if runner.ready(job):
                    yield job
                else:
                    bar.update(1)

        from ..serving.retry import run_bounded

        try:
            for outcome in run_bounded(ready(), lambda job: work(job.src, job.dst), self.concurrency):
                runner.book(outcome.item, outcome.result, outcome.error)
                bar.update(1)
        finally:
            bar.close()
            runner.summary.retries = self.transport.retries
        return runner.close()


def remote_client(
    server: str, api_key_env: str | None, expect_digest: str | None = None, concurrency: int | None = None
) -> Remote:
    """A retrying client of `server` that keeps `concurrency` connections (default DEFAULT_CONCURRENCY);
    with `expect_digest`, refused before any file runs unless the server's bundle (its /v1/info digest)
    is the pinned one."""
    need_serve_extra("client")
    from ..serving.protocol import DEFAULT_CONCURRENCY
    from ..serving.retry import retrying_client

    concurrency = concurrency or DEFAULT_CONCURRENCY
    client, transport = retrying_client(server, api_key_from_env(api_key_env), concurrency)
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
    return Remote(client, transport, concurrency)


def remote_reconstruct(client: Any, output_rate: int | None, sample_format: str) -> Callable[[Path, Path], float]:
    subtype = SUBTYPE_OF[sample_format]

    def one(src: Path, dst: Path) -> float:
        wave, wav = client.reconstruct_wav(_read_bytes(src), output_rate=output_rate, subtype=subtype)
        rate = output_rate or SAMPLE_RATE
        if dst.suffix.lower() == ".wav":
            with atomic_path(dst) as tmp:  # the server's WAV as it came: no second conversion
                tmp.write_bytes(wav)
        else:  # another container (-o out.flac): written from the samples
            write_audio_file(dst, wave, rate, sample_format=sample_format)
        return wave.shape[0] / rate

    return one


def remote_encode(client: Any, sample: bool, seed: int) -> Callable[[Path, Path], float]:
    """Encode on the server (its encoded-audio answer) and write it as the job's `.safetensors` file."""

    def one(src: Path, dst: Path) -> float:
        draw = draw_seed(seed, src) if sample else None
        clip = client.encode_file(_read_bytes(src), sample=sample, seed=draw)
        replace(clip, source=str(src)).save(dst)
        return clip.seconds

    return one


def remote_decode(
    client: Any, sample_format: str, seconds: float | None = None, num_samples: int | None = None
) -> Callable[[Path, Path], float]:
    """Decode on the server: a latents file as `read_latents` reads it (checked against the server's
    fingerprint first, with the same messages as a local decode), at its recorded length (or, bare
    latents, the one --seconds/--num-samples give), level and channels."""
    info = client.info()
    fingerprint = info["fingerprint"]
    rate = int(info["sample_rate"])
    subtype = SUBTYPE_OF[sample_format]

    def one(src: Path, dst: Path) -> float:
        clips = read_latents(src, fingerprint, seconds=seconds, num_samples=num_samples, sample_rate=rate)
        if len(clips) > 1:
            raise AudioInputError(
                f"{src}: a batch of {len(clips)} bare latents [batch, 8, frames, 16]; decode it without --server, "
                "or save one [8, frames, 16] clip per file"
            )
        (clip,) = clips
        wave = client.decode_file(clip, subtype=subtype)
        write_audio_file(dst, np.asarray(wave, np.float32), rate, sample_format=sample_format)
        return clip.seconds

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
