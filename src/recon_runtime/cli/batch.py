"""How a `recon-run` command runs: one line per error (`guard`), the file-job loop and its summary.

`plan_jobs` names every output before anything runs (`files.outputs`' rules), `JobRunner.prepare`
refuses what cannot be done before the model loads (a missing input, an existing output, a folder
that cannot be written), and `JobRunner.attempt` runs one file (fail one file and go on, count).
The commands in `files` and the `--server` jobs in `remote` hand it one function per file.
`guard_files` runs a file command so that Ctrl-C stops it at once, keeping only complete files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click

from ..errors import AudioInputError, OutputError, ReconError, describe, failure_message
from ..files.audio import check_writable, discover, recording_writes, skipped_note, stop_writes
from ..files.outputs import FILE, STDIO, STDOUT, Target, check_output, output_path
from ..jobs.job import INTERRUPTED_EXIT

OUT_OF_MEMORY: Final = "out of memory; try --threads 1, fewer files at once, or a machine with more memory"
STDIN: Final = Path(STDIO)
"""A job's source when the input is stdin."""
KEPT_NAMED: Final = 3
"""Files the interrupted line names; more are counted."""


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)


def _call(ctx: click.Context, fn: Callable[[], int]) -> int:
    """`fn()`'s exit code; any error but click's own becomes one line and 1 (a traceback only with --debug)."""
    try:
        return fn()
    except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - the user gets one line, the developer --debug
        if ctx.obj.get("debug"):
            raise
        ours = isinstance(e, (ReconError, MemoryError))
        fail(describe(e) + ("" if ours else " (run with --debug for the traceback)"))
        return 1


def guard(ctx: click.Context, fn: Callable[[], int]) -> None:
    """Turn any error into one line and a non-zero exit (a traceback only with --debug)."""
    ctx.exit(_call(ctx, fn))


TERMINATED_EXIT: Final = 128 + signal.SIGTERM  # the status a shell reports for a process SIGTERM ended


class _Terminated(Exception):
    """SIGTERM (`timeout`, `kill`, a container stopping), raised in the main thread like Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While a file command runs, SIGTERM stops it as Ctrl-C does (no partial file, one line), with
    status 143; outside the main thread (a test's runner) the handler stays as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def guard_files(ctx: click.Context, fn: Callable[[], int], what: str) -> None:
    """`guard` for a file command, which Ctrl-C (or SIGTERM) stops at once.

    The work runs in a thread of its own, so that the main thread takes SIGINT while an engine call
    (seconds long, and deaf to signals) is in progress. On Ctrl-C every write in progress is
    dropped (`stop_writes`: no partial file), one line says which complete files this run kept,
    and the process exits with status 130 without waiting for the engine.
    """
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["code"] = _call(ctx, fn)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            outcome["error"] = e

    with recording_writes(), _terminate_as_interrupt():
        worker = threading.Thread(target=work, name=f"recon-run {what}", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.1)
        except (KeyboardInterrupt, _Terminated) as e:
            fail(interrupted_line(what, stop_writes()))
            sys.stderr.flush()
            # the engine call in progress cannot be stopped; its thread goes with the process
            os._exit(TERMINATED_EXIT if isinstance(e, _Terminated) else INTERRUPTED_EXIT)
    if "error" in outcome:
        raise outcome["error"]
    ctx.exit(outcome["code"])


def interrupted_line(what: str, kept: Sequence[Path]) -> str:
    """What an interrupted command says it kept (complete files only: partial ones were removed)."""
    if not kept:
        return f"interrupted: {what} stopped before any file was finished; nothing was written"
    names = ", ".join(map(str, kept[:KEPT_NAMED])) + (
        f" and {len(kept) - KEPT_NAMED} more" if len(kept) > KEPT_NAMED else ""
    )
    return f"interrupted: {what} stopped; kept the {len(kept)} file(s) it finished ({names}), nothing partial"


@dataclass
class Summary:
    """Counts for the closing line of a batch."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    mixed: int = 0
    """Multi-channel inputs mixed to mono (`--channels mix`)."""
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
        mixed = f", {self.mixed} mixed to mono (--channels each keeps every channel)" if self.mixed else ""
        retried = (
            f"; {self.retries} request{'s' if self.retries != 1 else ''} sent again (server busy)"
            if self.retries
            else ""
        )
        return (
            f"{what}: {self.ok} ok, {self.failed} failed{skipped}{mixed}; {self.audio_seconds:.1f} s of audio in "
            f"{wall:.1f} s wall{speed}{retried}"
        )

    @property
    def exit_code(self) -> int:
        """1 if any file failed, or if nothing was done nor skipped."""
        return 1 if self.failed or not (self.ok or self.skipped) else 0


@dataclass
class Job:
    """One input (a file, or stdin) and where its outputs go; `error` fails it before it runs."""

    src: Path
    """The input file; STDIN for stdin."""
    outputs: list[Path]
    """The files it writes: one, or one per clip of a bare latents batch; none for stdout."""
    error: Exception | None = None

    @property
    def dst(self) -> Path | None:
        """Its (first) output file; None for stdout."""
        return self.outputs[0] if self.outputs else None

    @property
    def stdin(self) -> bool:
        return self.src == STDIN


def path_key(path: Path) -> str:
    """One spelling per file: symlinks and `..` resolved, so two names of one file compare equal."""
    return os.path.normcase(str(path.resolve()))


def plan_jobs(
    inputs: Sequence[str], target: Target, accept: Callable[[Path], bool], count: Callable[[Path], int] | None = None
) -> list[Job]:
    """One job per input file (`-`: stdin); folders are mirrored under a folder target.

    Args:
        target: where outputs go (`files.outputs.audio_target` / `encoded_target`).
        count: clips an input holds (a bare latents batch writes one file each, `output_path`).

    A folder that cannot be read becomes one failed job, so the other inputs still run. Outputs
    are planned before anything runs, and none is ever silently overwritten: inputs whose outputs
    would land on the same path (a/x.wav and b/x.wav, or x.wav and x.flac in one folder) all fail
    with a line naming the others, and so does a job whose output would replace one of the inputs.
    """
    if target.kind in (FILE, STDOUT):  # one input (the target's rules checked that)
        src = STDIN if inputs[0] == STDIO else Path(inputs[0])
        jobs = [_job(src, Path(src.name), target, count)]
    else:
        jobs = []
        for root in map(Path, inputs):
            try:
                found = list(discover([root], accept))
            except ReconError as e:
                jobs.append(Job(root, [], e))
                continue
            if not found:
                note = skipped_note(root, accept)
                jobs.append(Job(root, [], AudioInputError(f"{root}: no input files found in this folder{note}")))
            jobs += [_job(path, rel, target, count) for path, rel in found]
    sources = {path_key(job.src) for job in jobs if not job.stdin and job.src.is_file()}
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


def _job(src: Path, rel: Path, target: Target, count: Callable[[Path], int] | None) -> Job:
    if src != STDIN and _is_empty_file(src):  # refused while planning, before a model loads for it
        return Job(src, [], AudioInputError(f"{src}: empty file (0 bytes)"))
    n = count(src) if count is not None and src != STDIN else 1
    if target.kind == STDOUT:
        error = None if n == 1 else OutputError(f"{src}: holds {n} clips; -o - writes one, so name a file or folder")
        return Job(src, [], error)
    return Job(src, [p for i in range(n) if (p := output_path(target, rel, i, n)) is not None])


def _is_empty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size == 0
    except OSError:
        return False  # unreadable: the read says why


def check_exclusive(force: bool, skip_existing: bool) -> None:
    """Checked before a model loads, so the usage error comes first."""
    if force and skip_existing:
        raise click.UsageError("--force and --skip-existing exclude each other")


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

    def prepare(self, jobs: Iterable[Job]) -> list[Job]:
        """The jobs to run, checked before the model loads; the others fail (one line each) or are
        skipped (--skip-existing). Refused here: a planning error, a missing input, an output that
        exists (without --force) or is a folder, and an output folder that cannot be created or
        written (probed once per folder with a temporary file of our own)."""
        ready = []
        writable: set[str] = set()  # folders probed and found writable
        for job in jobs:
            try:
                if job.error is not None:
                    raise job.error
                if not job.stdin and not os.path.lexists(job.src):
                    raise AudioInputError(f"{job.src}: no such file")
                if self.skip_existing and job.outputs and all(p.is_file() for p in job.outputs):
                    self.summary.skipped += 1
                    self.skipped.add(job.src)
                    continue
                for path in job.outputs:
                    check_output(path, self.force, self._written)
                    if path_key(path.parent) not in writable:
                        check_writable(path)
                        writable.add(path_key(path.parent))
            except Exception as e:  # noqa: BLE001 - every per-file failure becomes one line
                self.fail(job, e)
                continue
            ready.append(job)
        return ready

    def check(self, path: Path) -> None:
        """Before a write: refuse what this run wrote already, and (without --force) any file that
        appeared since `prepare`."""
        check_output(path, self.force, self._written)

    def ready(self, job: Job) -> bool:
        """A prepared job's outputs checked once more just before it runs (`check`); False when it
        fails (its one line)."""
        try:
            for path in job.outputs:
                self.check(path)
        except Exception as e:  # noqa: BLE001 - every per-file failure becomes one line
            self.fail(job, e)
            return False
        return True

    def attempt(self, job: Job, work: Callable[[], float]) -> bool:
        """Run `work() -> audio seconds` for one prepared job; a failure is one line and the batch goes on."""
        if not self.ready(job):
            return False
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
        self.booked(job.outputs)
        self.summary.ok += 1
        self.summary.audio_seconds += seconds or 0.0
        return True

    def booked(self, paths: Iterable[Path]) -> None:
        """Record files this run wrote: none of them is written twice."""
        self._written.update(path_key(p) for p in paths)

    def fail(self, job: Job, e: BaseException) -> None:
        _report(job.src, e, self.summary, self.debug)

    def run(self, jobs: list[Job], work: Callable[[Job], float]) -> int:
        """`work(job)` per prepared job, with a progress bar; returns the exit code."""
        for job in progress(jobs, self.what):
            self.attempt(job, lambda job=job: work(job))
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
