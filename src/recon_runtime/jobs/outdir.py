"""The output folder OUT of a dataset job: its lock (`OutLock`), its job record (job.json), the
refusal of a folder no job wrote, and --no-resume (`start_over`), which deletes only what the job wrote."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any, Final

from ..errors import OutputError
from ..files.audio import atomic_path
from .config import (
    ATTEMPTS_DIR,
    AUDIO_DIR,
    ERRORS_DIR,
    EVALUATE,
    JOB_FILE,
    LOCK_FILE,
    METRICS_SUMMARY_FILE,
    MODES,
    OUTPUTS_DIR,
    RECONSTRUCT,
    RESULT_DIRS,
    SUMMARY_FILE,
    JobConfig,
)
from .shards import read_table

_LOGGER = logging.getLogger(__name__)

LOCK_RECORD_MAX: Final = 4096  # bytes: a lock record is far smaller; a larger job.lock is not one
LOCK_KEYS: Final = frozenset({"pid", "host", "mode", "started"})
JOB_FORMAT: Final = "recon-run dataset job"  # job.json's marker: a job.json without it is the user's
JOB_FORMAT_VERSION: Final = 2
"""2: the rows' columns are the encoded-audio fields (`encoded.FIELDS`: `input_sample_rate` where 1 had
source_sample_rate; encode rows carry every field). Only a job of this version resumes."""
JOB_FORMAT_VERSIONS_READ: Final = (1, 2)
"""job.json versions still known as a job's: --no-resume deletes what such a job wrote (the same names
in every version), and a resume of an older one is refused in one line saying so."""
JOB_RECORD_MAX: Final = 1 << 20  # bytes: a job record is about 400; a larger job.json is not one


class OutLock:
    """An exclusive lock on OUT for one job: OUT/job.lock, locked with flock, holding pid and host.

    Why flock and not a file created with O_EXCL: the kernel releases a flock when its holder dies
    however it dies (Ctrl-C, SIGKILL, out of memory), so a lock is never left held by a dead job,
    and a pid reused by another process after a crash or a reboot cannot keep it held; an O_EXCL
    file outlives its job and must be judged by its pid, and taking over a stale one races a
    second taker. The file's record (pid, host, start time, mode) names the holder in the refusal.

    A record left behind (its job was killed, so it could not remove the file) is stale when
    nobody holds the flock: on this host the lock is then taken over with a line. A record from
    another host is refused, as this host cannot see that host's processes: flock spans hosts
    on NFSv4 and on NFSv3 with lockd, but a `nolock` mount keeps locks per host.
    """

    ATTEMPTS: Final = 10  # the holder may remove the file between our open and our flock: open the new one

    def __init__(self, out: Path, mode: str, echo: Callable[[str], None]):
        self.path = out / LOCK_FILE
        self.mode = mode
        self.echo = echo
        self.fd: int | None = None

    def _read(self, fd: int) -> dict[str, Any]:
        try:
            data = os.pread(fd, LOCK_RECORD_MAX + 1, 0)
        except OSError:
            return {}
        return json.loads(data) if data.strip() and _is_lock_record(data) else {}

    @staticmethod
    def describe(record: dict[str, Any]) -> str:
        if not record.get("pid"):
            return "a job that has not written its pid yet"
        return f"pid {record['pid']} on {record.get('host', '?')}, {record.get('mode', '?')} since {record.get('started', '?')}"

    def __enter__(self) -> OutLock:
        import fcntl

        for _ in range(self.ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o666)
            except OSError as e:
                raise OutputError(f"{self.path}: cannot create the job's lock file ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.describe(self._read(fd))
                os.close(fd)
                raise OutputError(
                    f"{self.path.parent}: another dataset job runs on this folder ({holder}); "
                    "wait for it to end or use another output folder"
                ) from None
            except OSError as e:
                os.close(fd)
                raise OutputError(
                    f"{self.path}: cannot lock the output folder ({e.strerror or e}); use a local folder or a "
                    "file system with locks"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise OutputError(f"{self.path}: the lock file keeps changing; is another job starting on this folder?")
        try:
            ours = _is_lock_record(os.pread(fd, LOCK_RECORD_MAX + 1, 0))
        except OSError:
            ours = False
        if not ours:  # a file of the user's that refuse_foreign did not see (written since): never truncated
            os.close(fd)
            raise OutputError(_foreign_lock_message(self.path.parent))
        stale = self._read(fd)
        host = socket.gethostname()
        if stale.get("pid"):
            if stale.get("host") != host:
                os.close(fd)
                raise OutputError(
                    f"{self.path}: left by {self.describe(stale)}, which this host cannot check; "
                    f"if no job runs there, delete {self.path}"
                )
            self.echo(
                f"{self.path}: taking over the lock of {self.describe(stale)}: that job is gone (killed or crashed)"
            )
        record = {"pid": os.getpid(), "host": host, "mode": self.mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as e:
            self.__exit__()
            raise OutputError(f"{self.path}: cannot write the job's lock file ({e.strerror or e})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        """Remove the file while holding the lock (a job that opened it meanwhile sees another inode and retries)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            os.ftruncate(self.fd, 0)  # cannot remove it: an empty record is no stale lock
        os.close(self.fd)
        self.fd = None


def _is_lock_record(data: bytes) -> bool:
    """What OUT/job.lock holds when a job wrote it: nothing (a job starting or ending) or OutLock's record."""
    if len(data) > LOCK_RECORD_MAX:
        return False
    if not data.strip():
        return True
    try:
        record = json.loads(data)
    except ValueError:
        return False
    return (
        isinstance(record, dict)
        and set(record) <= LOCK_KEYS
        and type(record.get("pid")) is int
        and isinstance(record.get("host"), str)
    )


def _foreign_lock_message(out: Path) -> str:
    return f"{out}: holds a {LOCK_FILE} that no dataset job wrote (not a lock record); choose another -o/--out"


def _foreign_job(out: Path, why: str) -> OutputError:
    return OutputError(f"{out}: holds a {JOB_FILE} that no dataset job wrote ({why}); choose another -o/--out")


def read_job(out: Path) -> dict[str, Any] | None:
    """OUT's job record (job.json), or None when there is none.

    A job.json is the job's only when it is what `write_job` writes: a JSON object with the format
    marker (`format`, `format_version`), a mode of MODES, a bundle fingerprint and settings. Any
    other file of that name is the user's: OutputError, and nothing in OUT is touched.
    """
    path = out / JOB_FILE
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_file():
        raise _foreign_job(out, "not a plain file")
    try:
        if path.stat().st_size > JOB_RECORD_MAX:
            raise _foreign_job(out, "far larger than a job record")
        text = path.read_bytes()
    except OSError as e:
        raise OutputError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        job = json.loads(text)
    except ValueError:
        raise _foreign_job(out, "not JSON") from None
    if not isinstance(job, dict):
        raise _foreign_job(out, f"a JSON {type(job).__name__}, not a job record")
    if job.get("format") != JOB_FORMAT:
        legacy = "format" not in job and {"mode", "bundle_fingerprint", "settings"} <= set(job)
        raise _foreign_job(
            out,
            f'no "format": "{JOB_FORMAT}" in it'
            + ("; a job of a recon-run before job format 1 is not resumed either" if legacy else ""),
        )
    if job.get("format_version") not in JOB_FORMAT_VERSIONS_READ:
        raise OutputError(
            f"{path}: a dataset job record of format version {job.get('format_version')!r}, this recon-run reads "
            f"version {', '.join(map(str, JOB_FORMAT_VERSIONS_READ))}; use the recon-run that wrote it, "
            "or another -o/--out"
        )
    if (
        job.get("mode") not in MODES
        or not isinstance(job.get("bundle_fingerprint"), str)
        or not isinstance(job.get("settings"), dict)
    ):
        raise _foreign_job(out, "its mode, bundle fingerprint or settings are not a job's")
    return job


def write_job(out: Path, record: dict[str, Any]) -> None:
    with atomic_path(out / JOB_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def _temp_target(name: str) -> str | None:
    """The file whose temporary file (files.audio.atomic_path: `.NAME.<12 hex>.part<suffix of NAME>`) is `name`, or None."""
    m = re.fullmatch(r"\.(.+)\.[0-9a-f]{12}\.part(\.[^./]+)?", name)
    if m is None or PurePosixPath(m[1]).suffix != (m[2] or ""):
        return None
    return m[1]


def refuse_foreign(out: Path) -> dict[str, Any] | None:
    """OUT's job record; OutputError unless OUT is empty or a job's folder, with a job.lock (if any) of a job.

    A job never writes into (nor --no-resume cleans) a user's folder: a job.json or job.lock that
    no job wrote makes the folder the user's, whatever else it holds.
    """
    job = read_job(out)
    lock = out / LOCK_FILE
    if os.path.lexists(lock):
        try:
            ours = not lock.is_symlink() and lock.is_file() and _is_lock_record(_head(lock, LOCK_RECORD_MAX + 1))
        except OSError:
            ours = False
        if not ours:
            raise OutputError(_foreign_lock_message(out))
    if job is not None:
        return job
    try:  # a temporary job.json of a job killed while it wrote its first record is the job's too
        others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE and _temp_target(p.name) != JOB_FILE)
    except OSError as e:
        raise OutputError(f"{out}: cannot be read ({e.strerror or e})") from None
    if others:
        raise OutputError(
            f"{out}: folder exists and is not empty (it holds {others[0]} and no dataset job); choose another -o/--out"
        )
    return None


def _head(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _own_shard(name: str) -> bool:
    """A shard name the job writes (part-<20 hex>.parquet), or the temporary file of one left by a killed run."""
    return (
        re.fullmatch(r"part-[0-9a-f]{20}\.parquet|\.part-[0-9a-f]{20}\.parquet\.[0-9a-f]{12}\.part\.parquet", name)
        is not None
    )


def _record_rel(output: str) -> str | None:
    """A recorded output (relative to OUT, under audio/), or None when it names no file there: never trusted,
    never deleted then, whatever a shard says."""
    rel = PurePosixPath(output)
    if rel.is_absolute() or len(rel.parts) < 2 or rel.parts[0] != AUDIO_DIR or ".." in rel.parts:
        return None
    return rel.as_posix()


def recorded_outputs(out: Path) -> dict[str, str]:
    """reconstruct: audio the job wrote or was about to write (OUT/done and OUT/outputs, relative to OUT)
    -> its input. A record names the input an output belongs to; whether the file there is the job's
    is `still_written`'s to say."""
    owners: dict[str, str] = {}
    for folder in (OUTPUTS_DIR, RESULT_DIRS[RECONSTRUCT]):
        table = read_table(out / folder, ["path", "output"])
        if table is not None:
            for output, path in zip(table.column("output").to_pylist(), table.column("path").to_pylist()):
                rel = _record_rel(str(output))
                if rel is not None:
                    owners[rel] = path
    return owners


def written_outputs(out: Path) -> dict[str, set[tuple[int, int]]]:
    """reconstruct: the audio the job wrote (relative to OUT) -> the (size, mtime_ns) it had right after
    each write, from OUT/outputs (recorded after each write, before the batch's done/ shard) and
    OUT/done. A row of OUT/outputs without them (a plan: the run was about to write it) owns nothing.
    Read it before compaction: compaction drops the done/ rows of inputs that changed since."""
    written: dict[str, set[tuple[int, int]]] = {}
    tables = [
        read_table(out / RESULT_DIRS[RECONSTRUCT], ["output", "output_size", "output_mtime_ns"]),
        read_table(out / OUTPUTS_DIR),  # whole: shards of earlier versions lack the size and mtime
    ]
    for table in tables:
        if table is None or "output_size" not in table.column_names:
            continue
        columns = (table.column(c).to_pylist() for c in ("output", "output_size", "output_mtime_ns"))
        for output, size, mtime in zip(*columns):
            rel = _record_rel(str(output))
            if rel is not None and size is not None and mtime is not None:
                written.setdefault(rel, set()).add((size, mtime))
    return written


def still_written(path: Path, stats: set[tuple[int, int]] | None) -> bool:
    """Whether the file at `path` is still what the job wrote there: a regular file of a size and mtime
    `written_outputs` recorded for it. A file only planned (`stats` None), or changed or put there
    since, is not the job's: it is kept, and never overwritten."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and stats is not None and (st.st_size, st.st_mtime_ns) in stats


def _remove_if_empty(folder: Path, stop: Path) -> None:
    """Remove `folder` and its parents up to (not including) `stop` while they are empty."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (a file the job did not write), or gone
            return
        folder = folder.parent


def remove_attempts(out: Path) -> None:
    """Remove the attempt markers of earlier runs (only the job's own names: see _Attempts)."""
    root = out / ATTEMPTS_DIR
    if not root.is_dir():
        return
    for batch in root.iterdir():
        if batch.is_dir() and re.fullmatch(r"(read|run)-[0-9a-f]{20}", batch.name):
            for marker in batch.iterdir():
                if re.fullmatch(r"start-\d+-\d+-\d+|file-[0-9a-f]{20}", marker.name):
                    marker.unlink(missing_ok=True)
            _remove_if_empty(batch, out)
    _remove_if_empty(root, out)


def _job_dirs(mode: str) -> tuple[str, ...]:
    """The shard folders a job of `mode` writes."""
    return (RESULT_DIRS[mode], ERRORS_DIR, *((OUTPUTS_DIR,) if mode == RECONSTRUCT else ()))


def _job_files(mode: str) -> tuple[str, ...]:
    """The files at OUT's top a job of `mode` writes, besides job.json and job.lock."""
    return (SUMMARY_FILE, *((METRICS_SUMMARY_FILE,) if mode == EVALUATE else ()))


def remove_temps(out: Path, mode: str, recorded: Iterable[str]) -> None:
    """Remove the temporary files a killed run left (a shard, an audio file or a JSON file it was writing).

    Only names the job gives: a shard's temporary file in the job's shard folders, one of job.json
    or the summaries at OUT's top, and one of an audio file the job recorded (`recorded`, relative
    to OUT) beside it. Each folder is listed once.
    """
    tops = {JOB_FILE, *_job_files(mode)}
    with contextlib.suppress(OSError):
        for entry in os.scandir(out):
            if _temp_target(entry.name) in tops and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
    for name in _job_dirs(mode):
        folder = out / name
        if folder.is_dir() and not folder.is_symlink():
            for entry in os.scandir(folder):
                if entry.name.startswith(".") and _own_shard(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
    audio = (out / AUDIO_DIR).resolve()
    by_dir: dict[Path, set[str]] = {}
    for rel in recorded:
        path = out / rel
        by_dir.setdefault(path.parent, set()).add(path.name)
    for folder, names in by_dir.items():
        if folder.is_dir() and folder.resolve().is_relative_to(audio):  # never outside OUT/audio
            for entry in os.scandir(folder):
                if _temp_target(entry.name) in names and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)


def start_over(out: Path, job: dict[str, Any], echo: Callable[[str], None]) -> None:
    """--no-resume: delete what earlier runs of the job in `out` wrote, found by its names and records.

    The audio reconstruct wrote is recorded with its size and mtime (OUT/outputs right after each
    write, OUT/done after the batch) and deleted only while it is still that file (`still_written`);
    shards, markers and the job's JSON files have names only the job gives; only the folders and
    files of the job's own mode count. Anything else stays. job.json is marked `resetting` first
    and removed last: a reset that is interrupted (Ctrl-C, a kill) is finished by the next run,
    whatever its flags, so no run ever skips a file whose result the reset had already deleted.
    """
    mode = job["mode"]
    if not job.get("resetting"):
        write_job(out, {**job, "resetting": True})
    recorded = list(recorded_outputs(out)) if mode == RECONSTRUCT else []
    written = written_outputs(out) if mode == RECONSTRUCT else {}
    remove_temps(out, mode, recorded)
    audio = out / AUDIO_DIR
    real_audio = audio.resolve()
    for rel in recorded:  # the audio first, then the records that name it
        path = out / rel
        if not path.parent.resolve().is_relative_to(real_audio):
            continue  # a folder under OUT/audio that links elsewhere: never outside OUT/audio
        if still_written(path, written.get(rel)):  # else only planned, or changed since: the user's, kept
            path.unlink()
        _remove_if_empty(path.parent, audio)
    _remove_if_empty(audio, out)
    for name in _job_dirs(mode):
        folder = out / name
        if folder.is_dir() and not folder.is_symlink():
            for shard in folder.iterdir():
                if _own_shard(shard.name) and shard.is_file() and not shard.is_symlink():
                    shard.unlink()
            _remove_if_empty(folder, out)
    remove_attempts(out)
    for name in _job_files(mode):
        (out / name).unlink(missing_ok=True)
    ours = {out / JOB_FILE, out / LOCK_FILE}
    kept = [p for p in out.rglob("*") if p.is_file() and p not in ours]
    (out / JOB_FILE).unlink()
    if kept:
        echo(f"--no-resume: kept {len(kept)} file(s) in {out} that the job did not write, e.g. {kept[0]}")


def check_job_record(cfg: JobConfig, fingerprint: str, job: dict[str, Any] | None) -> None:
    """A resume must use the job's bundle and settings (its mode is checked before); a new job writes its record."""
    settings = cfg.settings()
    if job is not None:
        if job["format_version"] != JOB_FORMAT_VERSION:
            raise OutputError(
                f"{cfg.out}: holds a dataset {job['mode']} job of an earlier recon-run (job format "
                f"{job['format_version']}), whose rows name their columns otherwise; --no-resume starts it over "
                "(deleting only what the job wrote), or use another output folder"
            )
        if job["bundle_fingerprint"] != fingerprint:
            raise OutputError(
                f"{cfg.out}: holds results of bundle {job['bundle_fingerprint']}, this bundle is {fingerprint}; "
                "use another output folder (or --no-resume to start over)"
            )
        before = job["settings"]
        diff = [f"{k} {before.get(k, 'unset')!r} then, {v!r} now" for k, v in settings.items() if before.get(k) != v]
        if diff:
            raise OutputError(
                f"{cfg.out}: holds results made with other settings ({'; '.join(diff)}); "
                "use the same settings, another output folder, or --no-resume to start over"
            )
        return
    write_job(
        cfg.out,
        {
            "format": JOB_FORMAT,
            "format_version": JOB_FORMAT_VERSION,
            "mode": cfg.mode,
            "bundle_fingerprint": fingerprint,
            "settings": settings,
        },
    )
