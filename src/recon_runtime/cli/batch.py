"""How a `recon-run` command runs: one line per error (`guard`), the file-job loop and its summary.

`JobRunner` runs a file command's jobs (plan outputs, skip, fail one file and go on, count); the
commands in `files` and the `--server` jobs in `remote` hand it one function per file.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click

from ..errors import AudioInputError, OutputError, ReconError, describe, failure_message
from ..files.audio import discover

OUT_OF_MEMORY: Final = "out of memory; try --threads 1, fewer files at once, or a machine with more memory"


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)


def guard(ctx: click.Context, fn: Callable[[], int]) -> None:
    """Turn any error into one line and a non-zero exit (a traceback only with --debug)."""
    try:
        code = fn()
    except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - the user gets one line, the developer --debug
        if ctx.obj.get("debug"):
            raise
        ours = isinstance(e, (ReconError, MemoryError))
        fail(describe(e) + ("" if ours else " (run with --debug for the traceback)"))
        code = 1
    ctx.exit(code)


@dataclass
class Summary:
    """Counts for the closing line of a batch."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    audio_seconds: float = 0.0
    retries: int = 0
    """Requests sent again after a busy server's 503 or 429 (`--server` jobs)."""
    started: float = field(default_factory=time.perf_counter)

    def line(self, what: str) -> str:
        """Files, audio and wall seconds, and the speed: audio seconds per wall second ("2.50x real
        time" is 2.5 s of audio done each second; below 1x is slower than the audio plays)."""
        wall = time.perf_counter() - self.started
        speed = f", {self.audio_seconds / wall:.2f}x real time" if self.audio_seconds and wall > 0 else ""
        skipped = f", {self.skipped} skipped (output exists)" if self.skipped else ""
        retried = (
            f"; {self.retries} request{'s' if self.retries != 1 else ''} sent again (server busy)"
            if self.retries
            else ""
        )
        return (
            f"{what}: {self.ok} ok, {self.failed} failed{skipped}; {self.audio_seconds:.1f} s of audio in "
            f"{wall:.1f} s wall{speed}{retried}"
        )

    @property
    def exit_code(self) -> int:
        """1 if any file failed, or if nothing was done nor skipped."""
        return 1 if self.failed or not (self.ok or self.skipped) else 0


@dataclass
class Job:
    """One input file and where its output goes; `error` fails it before it runs."""

    src: Path
    dst: Path
    error: Exception | None = None
    companions: tuple[str, ...] = ()
    """Suffixes of files written beside `dst` (encode's sidecar): outputs too."""

    @property
    def outputs(self) -> list[Path]:
        return [self.dst, *(self.dst.with_suffix(s) for s in self.companions)]


def path_key(path: Path) -> str:
    """One spelling per file: symlinks and `..` resolved, so two names of one file compare equal."""
    return os.path.normcase(str(path.resolve()))


def plan_jobs(
    inputs: Iterable[Path], out: Path, suffix: str, accept: Callable[[Path], bool], companions: tuple[str, ...] = ()
) -> list[Job]:
    """One job per input file; folders are mirrored under `out`.

    A folder that cannot be read becomes one failed job, so the other inputs still run. Outputs
    are planned before anything runs, and none is ever silently overwritten: inputs whose outputs
    would land on the same path (a/x.wav and b/x.wav, or x.wav and x.flac in one folder) all fail
    with a line naming the others, and so does a job whose output would replace one of the inputs.
    """
    inputs = list(inputs)
    if len(inputs) == 1 and not inputs[0].is_dir() and out.suffix.lower() == suffix:
        jobs = [Job(inputs[0], out, companions=companions)]
    else:
        jobs = []
        for root in inputs:
            try:
                found = list(discover([root], accept))
            except ReconError as e:
                jobs.append(Job(root, out, e))
                continue
            if not found:
                jobs.append(Job(root, out, AudioInputError(f"{root}: no input files found in this folder")))
            jobs += [Job(path, out / rel.with_suffix(suffix), companions=companions) for path, rel in found]
    sources = {path_key(job.src) for job in jobs if job.src.is_file()}
    by_output: dict[str, list[Job]] = {}
    for job in jobs:
        if job.error is None:
            for path in job.outputs:
                by_output.setdefault(path_key(path), []).append(job)
    for key, group in by_output.items():
        for job in group:
            if job.error is not None:
                continue
            if key in sources:
                job.error = OutputError(f"{job.src}: its output {job.dst} would replace an input; choose another -o")
            elif len(group) > 1:
                others = ", ".join(str(o.src) for o in group if o is not job)
                job.error = OutputError(
                    f"{job.src}: its output {job.dst} would also be written from {others}; "
                    "rename one or run them separately"
                )
    return jobs


def check_exclusive(force: bool, skip_existing: bool) -> None:
    """Checked before a model loads, so the usage error comes first."""
    if force and skip_existing:
        raise click.UsageError("--force and --skip-existing exclude each other")


def _check_overwrite(target: Path, force: bool) -> None:
    if target.is_dir():
        raise OutputError(f"{target}: is a folder")
    if target.exists() and not force:
        raise OutputError(f"{target}: exists; pass --force to overwrite or --skip-existing to keep it")


def _report(src: Path, e: BaseException, summary: Summary, debug: bool) -> None:
    """One line per failed file, naming it; the batch goes on. A traceback only with --debug."""
    if debug and not isinstance(e, ReconError):
        traceback.print_exception(e, file=sys.stderr)
    fail(failure_message(str(src), e, OUT_OF_MEMORY))
    summary.failed += 1


class JobRunner:
    """Runs a command's jobs with its overwrite policy: skips, failures and the closing summary."""

    def __init__(self, what: str, force: bool, skip_existing: bool, debug: bool):
        self.what = what
        self.force = force
        self.skip_existing = skip_existing
        self.debug = debug
        self.summary = Summary()
        self._written: set[str] = set()
        self.skipped: set[Path] = set()  # inputs skipped because their outputs exist

    def ready(self, job: Job) -> bool:
        """False when the job fails (reported) or is skipped before it runs."""
        try:
            if job.error is not None:
                raise job.error
            if self.skip_existing and all(p.is_file() for p in job.outputs):
                self.summary.skipped += 1
                self.skipped.add(job.src)
                return False
            for path in job.outputs:
                if path_key(path) in self._written:
                    raise OutputError(f"{path}: already written by this run; not overwriting it")
                _check_overwrite(path, self.force)
        except Exception as e:  # noqa: BLE001 - every per-file failure becomes one line
            self.fail(job, e)
            return False
        return True

    def attempt(self, job: Job, work: Callable[[], float]) -> bool:
        """Run `work() -> audio seconds` for one ready job; a failure is one line and the batch goes on."""
        try:
            seconds = work()
        except Exception as e:  # noqa: BLE001 - every per-file failure becomes one line
            return self.book(job, None, e)
        return self.book(job, seconds)

    def book(self, job: Job, seconds: float | None, error: BaseException | None = None) -> bool:
        """Count one job's end: its outputs written and its audio seconds, or the error that failed
        it (one line). For work that ran elsewhere (another thread: `--server` jobs)."""
        if error is not None:
            self.fail(job, error)
            return False
        self._written.update(path_key(p) for p in job.outputs)
        self.summary.ok += 1
        self.summary.audio_seconds += seconds or 0.0
        return True

    def fail(self, job: Job, e: BaseException) -> None:
        _report(job.src, e, self.summary, self.debug)

    def run(self, jobs: list[Job], work: Callable[[Path, Path], float]) -> int:
        """`work(src, dst)` per job, with a progress bar; returns the exit code."""
        for job in progress(jobs, self.what):
            if self.ready(job):
                self.attempt(job, lambda job=job: work(job.src, job.dst))
        return self.close()

    def close(self) -> int:
        click.echo(self.summary.line(self.what), err=True)
        return self.summary.exit_code


def progress(items: list[Any], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file", disable=len(items) < 2 or None, file=sys.stderr, leave=False)


def batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for i in range(0, len(jobs), size):
        yield jobs[i : i + size]
