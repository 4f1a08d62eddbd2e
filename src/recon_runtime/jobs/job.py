"""Dataset jobs on Ray Data: encode a whole dataset to latents, reconstruct it, or evaluate it.

Pipeline: the driver lists the inputs (folders, files, CSV/Parquet manifests, local or any file
system pyarrow opens) and drops the files already done -> CPU tasks read, decode and run the front
end (`Reconstructor.features`) -> an actor pool (`map_batches` with a class holding one
`Reconstructor`, so the graphs load once per worker) runs the graphs and writes the results ->
the driver counts what came back and prints a summary.

Output folder (`OUT`, a local path; on a cluster, one every node mounts):

- `job.json`: the job (a format marker, mode, bundle fingerprint, output settings); a rerun with
  another mode (with or without --no-resume), bundle or settings is refused.
- `latents/` (encode), `done/` (reconstruct), `metrics/` (evaluate): Parquet shards, one row per
  file, keyed by (`path`, `size`, `mtime_ns`); reconstruct's audio goes under `audio/`, mirroring
  the input tree as `recon-run reconstruct` does.
- `errors/`: Parquet shards, one row per failed file (`path`, `size`, `mtime_ns`, `stage`, `message`).
- `outputs/` (reconstruct): the audio each run is about to write, recorded before it writes it
  (relative to OUT, as `done/` records it).
- `attempts/`: per-batch attempt markers while a run goes (see `_Attempts`).
- `summary.json` (and for evaluate `metrics-summary.json`: mean, median, p95 per metric).
- `job.lock` while a job runs (`OutLock`): a second job on the same folder is refused.

OUT must be empty or a job's folder: a job.json that is not a job record (`read_job`) or a
job.lock that is not a lock record makes it the user's, refused whole. The job never overwrites a
file it did not write, never reads its own outputs as inputs, and --no-resume deletes only what
the job wrote (`_start_over`). Ctrl-C ends a job within seconds (`stop_ray`), keeping what was
written.

Resume: a rerun skips every file that has a row (result or error) with the same key and does the
rest; `retry_errors` runs the failed ones again. A graph worker writes both of a batch's shards
(results and errors, even empty) atomically under a name derived from the whole batch's keys, so a
batch that Ray runs again after a worker died replaces its own rows; compaction at the start of a
run removes repeated keys and error rows of files that have a result. Ray's retries are bounded,
and a file that kills its worker every time ends as an error row (`_Attempts`).

ray and pyarrow are imported only inside functions: `import recon_runtime` never imports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

import numpy as np

from ..contract import ENCODER, ROLES, read_contract
from ..errors import AudioInputError, OutputError, ReconError, failure_message, install_hint
from ..files.audio import atomic_path, is_audio_file, read_audio, write_audio

_LOGGER = logging.getLogger(__name__)

ENCODE: Final = "encode"
RECONSTRUCT: Final = "reconstruct"
EVALUATE: Final = "evaluate"
MODES: Final = (ENCODE, RECONSTRUCT, EVALUATE)
RESULT_DIRS: Final = {ENCODE: "latents", RECONSTRUCT: "done", EVALUATE: "metrics"}
ERRORS_DIR: Final = "errors"
ATTEMPTS_DIR: Final = "attempts"
PREPARE_MEMORY: Final = 1 << 30  # Ray memory request per read + front-end task (one decoded file + a batch of log-mels)
AUDIO_DIR: Final = "audio"
JOB_FILE: Final = "job.json"
SUMMARY_FILE: Final = "summary.json"
METRICS_SUMMARY_FILE: Final = "metrics-summary.json"
MANIFEST_EXTENSIONS: Final = (".csv", ".parquet")
METRIC_NAMES: Final = ("log_mel_l1", "log_mel_rmse", "mel_correlation", "mrstft", "si_sdr_db")
DEFAULT_MAX_SECONDS: Final = 3600.0
KEY_COLUMNS: Final = ("path", "size", "mtime_ns")
PREPARE_CPUS: Final = 0.25  # Ray CPUs per read + front-end task (they mostly wait on I/O and numpy)
STALL_SECONDS: Final = 600.0  # stall_after hook: long enough that only the interrupted job's shutdown ends it
LOCK_FILE: Final = "job.lock"
LOCK_RECORD_MAX: Final = 4096  # bytes: a lock record is far smaller; a larger job.lock is not one
LOCK_KEYS: Final = frozenset({"pid", "host", "mode", "started"})
JOB_FORMAT: Final = "recon-run dataset job"  # job.json's marker: a job.json without it is the user's
JOB_FORMAT_VERSION: Final = 1
JOB_RECORD_MAX: Final = 1 << 20  # bytes: a job record is about 400; a larger job.json is not one
OUTPUTS_DIR: Final = "outputs"  # reconstruct: the audio a run is about to write, recorded before it writes it
SHUTDOWN_TIMEOUT_S: Final = 10.0  # how long ray.shutdown may take (after Ctrl-C) before Ray's processes are killed
INTERRUPTED_EXIT: Final = 130  # exit status after Ctrl-C (128 + SIGINT, as shells report it)

Key = tuple[str, int, int]


def ray_missing_message() -> str:
    return f"dataset jobs need Ray Data and pyarrow: {install_hint('ray')}"


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class JobConfig:
    """One dataset job. `model` is any object with `load(stages) -> Reconstructor` (options.LoadOptions)."""

    mode: str
    inputs: tuple[str, ...]
    out: Path
    model: Any
    ray_address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    batch_size: int = 8
    resume: bool = True
    retry_errors: bool = False
    max_seconds: float | None = DEFAULT_MAX_SECONDS
    output_rate: int | None = None
    sample_format: str = "float32"
    progress: bool = True
    # test hooks: each graph worker stalls once it has written this many files (until the job is
    # interrupted, so a test can stop a job mid-way however fast the workers are), and make one
    # worker process die once (os._exit) on the file whose name is crash_once[0], using the
    # marker file crash_once[1] to do it only once
    stall_after: int | None = None
    crash_once: tuple[str, str] | None = None
    # test hook: the process handling the file named crash_always[0] dies (os._exit) every time, in
    # stage crash_always[1] ("read": the CPU task, "run": the graph worker), as an OOM kill or a
    # decoder segfault would
    crash_always: tuple[str, str] | None = None
    # a batch whose worker died this many times is run again one file at a time, and a file whose
    # worker dies then gets an error row instead of another try
    batch_attempts: int = 2

    def settings(self) -> dict[str, Any]:
        """What shapes the results besides the bundle: a resume must use the same."""
        model = self.model
        out: dict[str, Any] = {
            "backend": getattr(model, "backend", None),
            "provider": getattr(model, "provider", None),
            "precision": getattr(model, "precision", None),
            "max_seconds": self.max_seconds,
        }
        if self.mode == RECONSTRUCT:
            out.update(output_rate=self.output_rate, sample_format=self.sample_format)
        return out


@dataclass
class JobResult:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    failed_before: int = 0
    errors_outstanding: int = 0  # files of this job with an error row (this run or before), no result
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (path, stage, message)

    def line(self, mode: str) -> str:
        rate = f"{self.audio_seconds / self.wall_seconds:.2f}" if self.wall_seconds else "-"
        return (
            f"dataset {mode}: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (done before"
            + (
                f", {self.failed_before} of them failed then; --retry-errors runs them again"
                if self.failed_before
                else ""
            )
            + "); "
            f"{self.audio_seconds / 3600:.4f} h of audio in {self.wall_seconds:.1f} s wall ({rate} audio-s/s)"
            + (
                f"; {self.errors_outstanding} file(s) of this job have errors (this run or before): exit status 1"
                if self.errors_outstanding
                else ""
            )
        )


class JobInterrupted(ReconError):
    """Ctrl-C stopped the job; the message says what OUT keeps. `ray_stopped`: ray.shutdown finished in time."""

    def __init__(self, message: str, ray_stopped: bool):
        super().__init__(message)
        self.ray_stopped = ray_stopped


# ----------------------------------------------------------------------------- listing


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _filesystem(path: str) -> tuple[Any, str]:
    from pyarrow import fs

    return fs.FileSystem.from_uri(path)


@dataclass
class Item:
    """One input file, its key, and the relative path its outputs mirror."""

    path: str
    size: int
    mtime_ns: int
    rel: str
    error: str | None = None
    stage: str = "list"

    @property
    def key(self) -> Key:
        return (self.path, self.size, self.mtime_ns)


def _stat(path: str, rel: str) -> Item:
    if _is_uri(path):
        from pyarrow import fs as pafs

        filesystem, inner = _filesystem(path)
        info = filesystem.get_file_info(inner)
        if info.type != pafs.FileType.File:
            return Item(path, -1, -1, rel, f"{path}: no such file")
        mtime = info.mtime_ns if info.mtime_ns is not None else -1
        return Item(path, int(info.size or 0), int(mtime), rel)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Item(path, -1, -1, rel, f"{path}: no such file")
    except OSError as e:
        return Item(path, -1, -1, rel, f"{path}: cannot be read ({e.strerror or e})")
    if not os.path.isfile(path):
        return Item(path, -1, -1, rel, f"{path}: is not a file")
    return Item(path, int(st.st_size), int(st.st_mtime_ns), rel)


def _read_manifest(path: str) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if _is_uri(path):
        filesystem, inner = _filesystem(path)
        with filesystem.open_input_file(inner) as f:
            table = pacsv.read_csv(f) if inner.lower().endswith(".csv") else pq.read_table(f)
    else:
        table = pacsv.read_csv(path) if path.lower().endswith(".csv") else pq.read_table(path)
    if "path" not in table.column_names:
        raise AudioInputError(f"{path}: manifest has no `path` column (columns: {', '.join(table.column_names)})")
    return [str(p) for p in table.column("path").to_pylist() if p is not None and str(p).strip()]


def _join(base: str, child: str) -> str:
    """`child` as written in a manifest at `base`'s folder: absolute paths and URIs stay as they are."""
    if _is_uri(child) or os.path.isabs(child):
        return child
    if _is_uri(base):
        return base.rsplit("/", 1)[0] + "/" + child
    return os.path.abspath(os.path.join(os.path.dirname(base), child))


def _rel_from(root: str, path: str) -> str:
    """Path of `path` relative to `root` when inside it, else the path without its anchor or scheme."""
    p = path.split("://", 1)[-1]
    r = root.split("://", 1)[-1].rstrip("/")
    if p.startswith(r + "/"):
        return p[len(r) + 1 :]
    return str(PurePosixPath(p.lstrip("/")))


def _list_folder(root: str) -> list[Item]:
    if _is_uri(root):
        from pyarrow import fs as pafs

        filesystem, inner = _filesystem(root)
        scheme = root.split("://", 1)[0]
        infos = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True))
        items = []
        for info in sorted(infos, key=lambda i: i.path):
            if info.type == pafs.FileType.File and is_audio_file(Path(info.path)):
                uri = f"{scheme}://{info.path}"
                rel = info.path[len(inner.rstrip("/")) + 1 :]
                mtime = info.mtime_ns if info.mtime_ns is not None else -1
                items.append(Item(uri, int(info.size or 0), int(mtime), rel))
        return items
    from ..files.audio import discover

    return [_stat(os.path.abspath(p), rel.as_posix()) for p, rel in discover([Path(root)], is_audio_file)]


def _is_dir(path: str) -> bool:
    if _is_uri(path):
        from pyarrow import fs as pafs

        filesystem, inner = _filesystem(path)
        return filesystem.get_file_info(inner).type == pafs.FileType.Directory
    return os.path.isdir(path)


def list_inputs(inputs: Iterable[str], mirror_outputs: bool = False) -> list[Item]:
    """Expand folders, files and manifests into items.

    With `mirror_outputs` (reconstruct: one audio file per input, mirroring the tree), a clash of
    mirrored outputs fails each file involved; encode and evaluate write no per-file output.
    """
    items = _expand(inputs)
    if mirror_outputs:
        _fail_clashes(items)
    return items


def _expand(inputs: Iterable[str]) -> list[Item]:
    """Folders, files and manifests as items, each file once."""
    items: list[Item] = []
    for raw in inputs:
        root = raw if _is_uri(raw) else os.path.abspath(_local(raw))
        try:
            if _is_dir(root):
                items += _list_folder(root)
            elif root.lower().endswith(MANIFEST_EXTENSIONS):
                paths = [_join(root, p) for p in _read_manifest(root)]
                base = root.rsplit("/", 1)[0] if _is_uri(root) else os.path.dirname(root)
                items += [_stat(p, _rel_from(base, p)) for p in paths]
            else:
                items.append(_stat(root, PurePosixPath(root.split("://", 1)[-1]).name))
        except ReconError as e:
            items.append(Item(root, -1, -1, "", str(e)))
        except Exception as e:  # noqa: BLE001 - an unreadable input is one error row, the job goes on
            items.append(Item(root, -1, -1, "", f"{root}: cannot be listed ({type(e).__name__}: {e})"))
    # the same file twice: keep one
    unique: dict[str, Item] = {}
    for item in items:
        unique.setdefault(item.path, item)
    return list(unique.values())


def _fail_clashes(items: list[Item]) -> None:
    """reconstruct: inputs whose mirrored outputs would land on one path all fail (stage `plan`)."""
    by_out: dict[str, list[Item]] = {}
    for item in items:
        if item.error is None:
            by_out.setdefault(str(PurePosixPath(item.rel).with_suffix("")), []).append(item)
    for clash in (g for g in by_out.values() if len(g) > 1):
        for item in clash:
            others = ", ".join(o.path for o in clash if o is not item)
            item.error = (
                f"{item.path}: its output would also be written from {others}; rename one or run them separately"
            )
            item.stage = "plan"


def _leave_out_inside(items: list[Item], out: Path) -> tuple[list[Item], int]:
    """The items outside OUT (resolved, `out` itself resolved), and how many were inside it.

    OUT inside an input folder (data/ with data/runs/x as OUT) would make the job read its own
    outputs back as inputs on the next run (audio/x.wav becoming audio/audio/x.wav, and so on):
    whatever a job finds under its own output folder is not an input. Leaving them out instead of
    refusing keeps that layout usable. Symlinks and `..` are resolved (each folder once).
    """
    real_dirs: dict[str, str] = {}
    kept: list[Item] = []
    inside = 0
    root = str(out)
    for item in items:
        if not _is_uri(item.path):
            folder, name = os.path.split(item.path)
            if folder not in real_dirs:
                real_dirs[folder] = os.path.realpath(folder)
            real = os.path.join(real_dirs[folder], name)
            if os.path.islink(real):
                real = os.path.realpath(real)
            if real == root or real.startswith(root + os.sep):
                inside += 1
                continue
        kept.append(item)
    return kept, inside


# ----------------------------------------------------------------------------- tables on disk


def _keys_digest(keys: Iterable[Key]) -> str:
    return hashlib.sha256("\n".join(f"{p}\t{s}\t{m}" for p, s, m in sorted(keys)).encode()).hexdigest()


def _shard_name(keys: Iterable[Key]) -> str:
    return f"part-{_keys_digest(keys)[:20]}.parquet"


def _table_keys(table: Any) -> list[Key]:
    return list(zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS)))


def write_shard(folder: Path, table: Any, name: str | None = None) -> Path:
    """Write a table atomically as folder/`name` (default: part-<hash of its keys>.parquet).

    The graph workers name both of a batch's shards (results and errors) after the whole batch's
    keys, so a batch that runs again replaces its own shards whatever its outcome this time.
    """
    import pyarrow.parquet as pq

    path = folder / (name or _shard_name(_table_keys(table)))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def read_table(folder: Path, columns: Sequence[str] | None = None) -> Any:
    """All shards of a folder as one table (None when there are none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in _shards(folder)]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _read_keys(folder: Path) -> set[Key]:
    table = read_table(folder, KEY_COLUMNS)
    return set() if table is None else set(_table_keys(table))


def compact(folder: Path, drop: Callable[[Key], bool]) -> None:
    """Remove rows `drop` selects and repeated keys (the first row of a key in shard-name order stays).

    Plans from the key columns only, then writes each changed shard's kept rows under a new name
    (never onto an existing shard), and only then removes the old shards. A crash in between leaves
    repeated keys, which the next compaction removes: a key is never lost.
    """
    import pyarrow.parquet as pq

    seen: set[Key] = set()
    plan: list[tuple[Path, list[bool]]] = []
    for shard in _shards(folder):
        keep = []
        for k in _table_keys(pq.read_table(shard, columns=list(KEY_COLUMNS))):
            keep.append(not drop(k) and k not in seen)
            seen.add(k)
        if not all(keep):
            plan.append((shard, keep))
    if not plan:
        return
    existing = {p.name for p in _shards(folder)}
    for shard, keep in plan:
        if any(keep):
            table = pq.read_table(shard).filter(keep)
            salt = 0
            while True:  # a name no shard has: never overwrite rows another shard holds
                digest = _keys_digest(_table_keys(table))
                name = f"part-{hashlib.sha256(f'{digest}:{shard.name}:{salt}'.encode()).hexdigest()[:20]}.parquet"
                if name not in existing:
                    break
                salt += 1
            existing.add(name)
            write_shard(folder, table, name)
    for shard, _ in plan:
        shard.unlink()


def _done_keys(out: Path, mode: str) -> tuple[set[Key], set[Key]]:
    """Keys with a result row, and keys with an error row but no result row."""
    result = _read_keys(out / RESULT_DIRS[mode])
    return result, _read_keys(out / ERRORS_DIR) - result


def _error_table(rows: Sequence[dict[str, Any]]) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "path": pa.array([r["path"] for r in rows], pa.string()),
            "size": pa.array([r["size"] for r in rows], pa.int64()),
            "mtime_ns": pa.array([r["mtime_ns"] for r in rows], pa.int64()),
            "stage": pa.array([r["stage"] for r in rows], pa.string()),
            "message": pa.array([r["message"] for r in rows], pa.string()),
        }
    )


def _outputs_table(items: Sequence[Item]) -> Any:
    """reconstruct: the key of each input and the audio file it is about to write, relative to OUT (OUT/outputs)."""
    import pyarrow as pa

    return pa.table(
        {
            "path": pa.array([i.path for i in items], pa.string()),
            "size": pa.array([i.size for i in items], pa.int64()),
            "mtime_ns": pa.array([i.mtime_ns for i in items], pa.int64()),
            "output": pa.array([audio_rel(i.rel) for i in items], pa.string()),
        }
    )


# ----------------------------------------------------------------------------- stages (run on Ray)

_FRONT_ENDS: dict[Any, Any] = {}


def _front_end(model: Any) -> Any:
    """A Reconstructor for the front end only, once per process: CPU, no graphs loaded."""
    key = (str(model.model), getattr(model, "expect_digest", None))
    if key not in _FRONT_ENDS:
        _FRONT_ENDS[key] = dataclasses.replace(model, provider="cpu", precision="auto", cuda_graph=False).load(None)
    return _FRONT_ENDS[key]


def _read_any(path: str) -> tuple[np.ndarray, int]:
    """`read_audio` for a local path; other file systems are copied to a temporary file first."""
    if not _is_uri(path):
        return read_audio(Path(path))
    filesystem, inner = _filesystem(path)
    suffix = PurePosixPath(inner).suffix
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        with filesystem.open_input_stream(inner) as f:
            shutil.copyfileobj(f, tmp)
        tmp.flush()
        try:
            return read_audio(Path(tmp.name))
        except AudioInputError as e:
            raise AudioInputError(str(e).replace(tmp.name, path)) from None


def _objects(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array of arrays (ragged columns for Ray Data)."""
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


class _Attempts:
    """Attempt markers of one batch under OUT/attempts: how often it started, and which file was running.

    Each start of the batch adds a marker. Once `limit` earlier starts exist (so its worker died that
    often), the batch runs one file at a time, marking each file while it runs; a file still marked
    when the batch starts again is the one its worker died on, and gets an error row instead of
    another try. So every death is progress, and a batch needs at most limit + files tries.
    """

    def __init__(self, out: Path, stage: str, keys: Sequence[Key], limit: int):
        self.dir = out / ATTEMPTS_DIR / f"{stage}-{_keys_digest(keys)[:20]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        before = len(list(self.dir.glob("start-*")))
        (self.dir / f"start-{before}-{os.getpid()}-{time.time_ns()}").touch()
        self.isolate = before >= limit
        self.starts = before + 1

    def _file(self, path: str) -> Path:
        return self.dir / f"file-{hashlib.sha256(path.encode()).hexdigest()[:20]}"

    def died_on(self, path: str) -> bool:
        return self._file(path).exists()

    def begin(self, path: str) -> None:
        self._file(path).touch()

    def end(self, path: str) -> None:
        self._file(path).unlink(missing_ok=True)

    def message(self, path: str, stage: str) -> str:
        return (
            f"{path}: the worker process died while {stage} this file (killed, e.g. out of memory, or crashed; "
            f"{self.starts - 1} tries); --retry-errors runs it again"
        )


def _maybe_die(hook: tuple[str, str] | None, stage: str, paths: Sequence[str]) -> None:
    """Test hook (JobConfig.crash_always): die as an OOM kill or a segfault would."""
    if hook and hook[1] == stage and any(PurePosixPath(p).name == hook[0] for p in paths):
        os._exit(1)


def max_tries(batch_attempts: int, batch_size: int) -> int:
    """Ray retries per task: a task holds at most two batches (Ray Data bundles blocks up to a batch's
    rows), each needing at most `batch_attempts` + its files tries (see _Attempts)."""
    return 2 * (batch_attempts + batch_size) + 1


def prepare_batch(
    batch: dict[str, np.ndarray],
    model: Any,
    max_seconds: float | None,
    keep_waveform: bool = False,
    out: Path | None = None,
    batch_attempts: int = 2,
    crash_always: tuple[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """CPU task: read, decode and run the front end (`Reconstructor.features`); a failure becomes the row's error.

    The prepared waveform goes on only with `keep_waveform` (evaluate compares against it).
    """
    rec = _front_end(model)
    n = len(batch["path"])
    paths = [str(p) for p in batch["path"]]
    attempts = None
    if out is not None:
        keys = [(paths[i], int(batch["size"][i]), int(batch["mtime_ns"][i])) for i in range(n)]
        attempts = _Attempts(out, "read", keys, batch_attempts)
    mels, waves, gains, samples, rates, errors = [], [], [], [], [], []
    for i in range(n):
        path = paths[i]
        isolate = attempts is not None and attempts.isolate
        died = isolate and attempts.died_on(path)
        try:
            if died:
                raise AudioInputError(attempts.message(path, "reading"))
            if isolate:
                attempts.begin(path)
            _maybe_die(crash_always, "read", [path])
            audio, sr = _read_any(path)
            seconds = audio.shape[0] / sr
            if max_seconds is not None and seconds > max_seconds:
                raise AudioInputError(
                    f"{path}: {seconds:.1f} s is longer than the limit of {max_seconds:g} s (--max-seconds)"
                )
            feats = rec.features(audio, sr)
            del audio
            mels.append(feats.log_mel)
            waves.append(feats.waveform if keep_waveform else np.zeros(0, np.float32))
            gains.append(feats.gain)
            samples.append(feats.num_samples)
            rates.append(sr)
            errors.append("")
        except Exception as e:  # noqa: BLE001 - a bad file is an error row, never the end of the job
            mels.append(np.zeros((0, rec.contract.mel.n_mels), np.float32))
            waves.append(np.zeros(0, np.float32))
            gains.append(0.0)
            samples.append(0)
            rates.append(0)
            errors.append(failure_message(path, e))
        if isolate and not died:
            attempts.end(path)
    out_batch = {k: batch[k] for k in ("path", "size", "mtime_ns", "rel")}
    out_batch.update(
        log_mel=_objects(mels),
        waveform=_objects(waves),
        gain=np.asarray(gains, np.float64),
        num_samples=np.asarray(samples, np.int64),
        source_rate=np.asarray(rates, np.int64),
        read_error=np.asarray(errors, dtype=object),
    )
    return out_batch


def audio_rel(rel: str) -> str:
    """Where reconstruct writes the audio of the input at `rel`, relative to OUT (the input tree mirrored
    under OUT/audio): how OUT/outputs and OUT/done record it, so a record names its file however OUT is
    spelled on the command line."""
    return (PurePosixPath(AUDIO_DIR) / PurePosixPath(rel).with_suffix(".wav")).as_posix()


def audio_output(out: Path, rel: str) -> Path:
    """The audio file of the input at `rel` under OUT (see `audio_rel`)."""
    return out / audio_rel(rel)


class Worker:
    """Actor stage: one Reconstructor per worker runs the graphs and writes the batch's shards."""

    def __init__(self, config: JobConfig):
        self.config = config
        stages = (ENCODER,) if config.mode == ENCODE else ROLES
        model = config.model
        if getattr(model, "threads", None) is None and dataclasses.is_dataclass(model):
            # one intra-op thread per CPU this worker holds, not all the node's cores per worker
            model = dataclasses.replace(model, threads=max(1, int(round(config.cpus_per_worker))))
        self.rec = model.load(stages)
        self.fingerprint = self.rec.contract.fingerprint
        self.files_done = 0

    def _maybe_stall(self) -> None:
        """stall_after hook: hold this worker until the interrupted job's shutdown kills it."""
        if self.config.stall_after is not None and self.files_done >= self.config.stall_after:
            time.sleep(STALL_SECONDS)
            raise RuntimeError(f"stall_after: the job was not interrupted within {STALL_SECONDS:.0f} s")

    def _maybe_crash(self, paths: Sequence[str]) -> None:
        hook = self.config.crash_once
        if hook and any(PurePosixPath(p).name == hook[0] for p in paths) and not os.path.exists(hook[1]):
            Path(hook[1]).write_text("crashed once\n")
            os._exit(1)
        _maybe_die(self.config.crash_always, "run", paths)

    def _run(self, feats: list[Any]) -> list[Any]:
        """Per input: the mode's graph output, or the exception it raised (a bad one never sinks the batch)."""
        rec = self.rec

        def encode(fs: list[Any]) -> list[np.ndarray]:
            # the posterior mean cropped as Reconstructor.encode_features crops it (drops bucket padding)
            return [rec.crop_latents(f, m) for f, (m, _) in zip(fs, rec.run_jobs([rec.encoding_job(f) for f in fs]))]

        jobs = encode if self.config.mode == ENCODE else rec.reconstruct_features
        try:
            return list(jobs(feats))
        except Exception:  # noqa: BLE001 - retry one by one to find the bad one
            outs: list[Any] = []
            for f in feats:
                try:
                    outs.append(jobs([f])[0])
                except Exception as e:  # noqa: BLE001
                    outs.append(e)
            return outs

    def _row(self, batch: dict[str, np.ndarray], i: int, f: Any, out: Any, base: dict[str, Any]) -> dict[str, Any]:
        if isinstance(out, BaseException):
            raise out
        if not np.isfinite(out).all():
            raise ReconError(f"{base['path']}: the graphs produced NaN or inf")
        return self._result(batch, i, f, out, base)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..reconstructor import Features

        cfg = self.config
        self._maybe_stall()
        n = len(batch["path"])
        self.files_done += n
        paths = [str(p) for p in batch["path"]]
        base = [
            {"path": paths[i], "size": int(batch["size"][i]), "mtime_ns": int(batch["mtime_ns"][i])} for i in range(n)
        ]
        keys = [(b["path"], b["size"], b["mtime_ns"]) for b in base]
        attempts = _Attempts(cfg.out, "run", keys, cfg.batch_attempts)
        errors: list[dict[str, Any]] = []
        ready: list[int] = []
        feats: list[Any] = []
        for i in range(n):
            if batch["read_error"][i]:
                errors.append({**base[i], "stage": "read", "message": str(batch["read_error"][i])})
                continue
            ready.append(i)
            feats.append(
                Features(
                    np.asarray(batch["log_mel"][i], np.float32),
                    float(batch["gain"][i]),
                    int(batch["num_samples"][i]),
                    np.asarray(batch["waveform"][i], np.float32),
                )
            )
        rows: list[dict[str, Any]] = []
        if attempts.isolate:
            # this batch's worker died before: one file at a time, and the file it dies on fails
            for i, f in zip(ready, feats):
                if attempts.died_on(paths[i]):
                    errors.append({**base[i], "stage": cfg.mode, "message": attempts.message(paths[i], "processing")})
                    continue
                attempts.begin(paths[i])
                try:
                    self._maybe_crash([paths[i]])
                    rows.append(self._row(batch, i, f, self._run([f])[0], base[i]))
                except Exception as e:  # noqa: BLE001 - one error row per failed file
                    errors.append({**base[i], "stage": cfg.mode, "message": failure_message(paths[i], e)})
                attempts.end(paths[i])
        else:
            if ready:
                self._maybe_crash([paths[i] for i in ready])
            outs = self._run(feats) if feats else []
            for i, f, out in zip(ready, feats, outs):
                try:
                    rows.append(self._row(batch, i, f, out, base[i]))
                except Exception as e:  # noqa: BLE001 - one error row per failed file
                    errors.append({**base[i], "stage": cfg.mode, "message": failure_message(paths[i], e)})
        # both shards named after the whole batch and always written (even empty): a batch that runs
        # again (Ray retried it) replaces both, whatever its outcome was the first time
        name = _shard_name(keys)
        write_shard(cfg.out / ERRORS_DIR, _error_table(errors), name)
        write_shard(cfg.out / RESULT_DIRS[cfg.mode], self._table(rows), name)
        rate = self.rec.contract.mel.sample_rate
        seconds = {r["path"]: r["num_samples"] / rate for r in rows}
        failed = {e["path"]: e for e in errors}
        return {
            "path": np.asarray(paths, dtype=object),
            "ok": np.asarray([p in seconds for p in paths]),
            "seconds": np.asarray([seconds.get(p, 0.0) for p in paths], np.float64),
            "stage": np.asarray([failed[p]["stage"] if p in failed else "" for p in paths], dtype=object),
            "message": np.asarray([failed[p]["message"] if p in failed else "" for p in paths], dtype=object),
        }

    def _result(self, batch: dict[str, np.ndarray], i: int, feats: Any, out: np.ndarray, base: dict[str, Any]) -> dict:
        cfg, rec = self.config, self.rec
        rate = rec.contract.mel.sample_rate
        row = {
            **base,
            "num_samples": feats.num_samples,
            "gain": feats.gain,
            "source_sample_rate": int(batch["source_rate"][i]),
            "duration_s": feats.num_samples / rate,
            "bundle_fingerprint": self.fingerprint,
        }
        if cfg.mode == ENCODE:
            row["latents"] = np.ascontiguousarray(out, np.float32).ravel()
            row["latent_shape"] = list(out.shape)
        elif cfg.mode == RECONSTRUCT:
            out_rate = cfg.output_rate or rate
            rel = audio_rel(str(batch["rel"][i]))
            write_audio(cfg.out / rel, rec.finish(feats, out, out_rate), out_rate, cfg.sample_format)
            st = os.stat(cfg.out / rel)  # what the job wrote: --no-resume deletes the file only while it is that
            row.update(output=rel, output_size=st.st_size, output_mtime_ns=st.st_mtime_ns)
        else:
            from ..files.metrics import compare

            row.update(compare(feats.waveform, out))
        return row

    def _table(self, rows: list[dict[str, Any]]) -> Any:
        import pyarrow as pa

        cols: dict[str, Any] = {
            "path": pa.array([r["path"] for r in rows], pa.string()),
            "size": pa.array([r["size"] for r in rows], pa.int64()),
            "mtime_ns": pa.array([r["mtime_ns"] for r in rows], pa.int64()),
        }
        if self.config.mode == ENCODE:
            cols["latents"] = pa.array([r["latents"] for r in rows], pa.list_(pa.float32()))
            cols["latent_shape"] = pa.array([r["latent_shape"] for r in rows], pa.list_(pa.int32()))
        elif self.config.mode == RECONSTRUCT:
            cols["output"] = pa.array([r["output"] for r in rows], pa.string())
            cols["output_size"] = pa.array([r["output_size"] for r in rows], pa.int64())
            cols["output_mtime_ns"] = pa.array([r["output_mtime_ns"] for r in rows], pa.int64())
        else:
            for name in METRIC_NAMES:
                cols[name] = pa.array([r[name] for r in rows], pa.float64())
        cols["num_samples"] = pa.array([r["num_samples"] for r in rows], pa.int64())
        cols["gain"] = pa.array([r["gain"] for r in rows], pa.float64())
        cols["source_sample_rate"] = pa.array([r["source_sample_rate"] for r in rows], pa.int32())
        cols["duration_s"] = pa.array([r["duration_s"] for r in rows], pa.float64())
        cols["bundle_fingerprint"] = pa.array([r["bundle_fingerprint"] for r in rows], pa.string())
        return pa.table(cols)


# ----------------------------------------------------------------------------- the output folder


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
        if not ours:  # a file of the user's that _refuse_foreign did not see (written since): never truncated
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

    A job.json is the job's only when it is what `_write_job` writes: a JSON object with the format
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
    if job.get("format_version") != JOB_FORMAT_VERSION:
        raise OutputError(
            f"{path}: a dataset job record of format version {job.get('format_version')!r}, this recon-run reads "
            f"version {JOB_FORMAT_VERSION}; use the recon-run that wrote it, or another -o/--out"
        )
    if (
        job.get("mode") not in MODES
        or not isinstance(job.get("bundle_fingerprint"), str)
        or not isinstance(job.get("settings"), dict)
    ):
        raise _foreign_job(out, "its mode, bundle fingerprint or settings are not a job's")
    return job


def _write_job(out: Path, record: dict[str, Any]) -> None:
    with atomic_path(out / JOB_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def _temp_target(name: str) -> str | None:
    """The file whose temporary file (files.audio.atomic_path: `.NAME.<12 hex>.part<suffix of NAME>`) is `name`, or None."""
    m = re.fullmatch(r"\.(.+)\.[0-9a-f]{12}\.part(\.[^./]+)?", name)
    if m is None or PurePosixPath(m[1]).suffix != (m[2] or ""):
        return None
    return m[1]


def _refuse_foreign(out: Path) -> dict[str, Any] | None:
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


def _recorded_outputs(out: Path) -> dict[str, str]:
    """reconstruct: audio the job wrote or was about to write (OUT/done and OUT/outputs, relative to OUT) -> its input."""
    owners: dict[str, str] = {}
    for folder in (OUTPUTS_DIR, RESULT_DIRS[RECONSTRUCT]):
        table = read_table(out / folder, ["path", "output"])
        if table is not None:
            for output, path in zip(table.column("output").to_pylist(), table.column("path").to_pylist()):
                rel = _record_rel(str(output))
                if rel is not None:
                    owners[rel] = path
    return owners


def _written_outputs(out: Path) -> dict[str, set[tuple[int, int]]]:
    """reconstruct: the audio OUT/done says the job wrote (relative to OUT) -> its (size, mtime_ns) then."""
    table = read_table(out / RESULT_DIRS[RECONSTRUCT], ["output", "output_size", "output_mtime_ns"])
    written: dict[str, set[tuple[int, int]]] = {}
    if table is not None:
        for output, size, mtime in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            rel = _record_rel(str(output))
            if rel is not None:
                written.setdefault(rel, set()).add((size, mtime))
    return written


def _still_written(path: Path, stats: set[tuple[int, int]] | None) -> bool:
    """Whether the file at a recorded output is still what the job wrote: a regular file and, where
    done/ records it, of the size and mtime it had then (a file put there since is not the job's).
    One that only outputs/ records was written by a run killed before its done/ shard: the job's."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and (stats is None or (st.st_size, st.st_mtime_ns) in stats)


def _remove_if_empty(folder: Path, stop: Path) -> None:
    """Remove `folder` and its parents up to (not including) `stop` while they are empty."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (a file the job did not write), or gone
            return
        folder = folder.parent


def _remove_attempts(out: Path) -> None:
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


def _remove_temps(out: Path, mode: str, recorded: Iterable[str]) -> None:
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


def _start_over(out: Path, job: dict[str, Any], echo: Callable[[str], None]) -> None:
    """--no-resume: delete what earlier runs of the job in `out` wrote, found by its names and records.

    The audio reconstruct wrote is recorded (OUT/outputs before it is written, OUT/done after);
    shards, markers and the job's JSON files have names only the job gives; only the folders and
    files of the job's own mode count. Anything else stays. job.json is marked `resetting` first
    and removed last: a reset that is interrupted (Ctrl-C, a kill) is finished by the next run,
    whatever its flags, so no run ever skips a file whose result the reset had already deleted.
    """
    mode = job["mode"]
    if not job.get("resetting"):
        _write_job(out, {**job, "resetting": True})
    recorded = list(_recorded_outputs(out)) if mode == RECONSTRUCT else []
    written = _written_outputs(out) if mode == RECONSTRUCT else {}
    _remove_temps(out, mode, recorded)
    audio = out / AUDIO_DIR
    real_audio = audio.resolve()
    for rel in recorded:  # the audio first, then the records that name it
        path = out / rel
        if not path.parent.resolve().is_relative_to(real_audio):
            continue  # a folder under OUT/audio that links elsewhere: never outside OUT/audio
        if _still_written(path, written.get(rel)):
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
    _remove_attempts(out)
    for name in _job_files(mode):
        (out / name).unlink(missing_ok=True)
    ours = {out / JOB_FILE, out / LOCK_FILE}
    kept = [p for p in out.rglob("*") if p.is_file() and p not in ours]
    (out / JOB_FILE).unlink()
    if kept:
        echo(f"--no-resume: kept {len(kept)} file(s) in {out} that the job did not write, e.g. {kept[0]}")


# ----------------------------------------------------------------------------- the job


def _check_job_file(cfg: JobConfig, fingerprint: str, job: dict[str, Any] | None) -> None:
    """A resume must use the job's bundle and settings (its mode is checked before); a new job writes its record."""
    settings = cfg.settings()
    if job is not None:
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
    _write_job(
        cfg.out,
        {
            "format": JOB_FORMAT,
            "format_version": JOB_FORMAT_VERSION,
            "mode": cfg.mode,
            "bundle_fingerprint": fingerprint,
            "settings": settings,
        },
    )


def metrics_summary(out: Path) -> dict[str, dict[str, float]]:
    """mean, median and p95 of each metric over the rows of OUT/metrics, one per file (repeated keys count once)."""
    table = read_table(out / RESULT_DIRS[EVALUATE], [*KEY_COLUMNS, *METRIC_NAMES])
    if table is None or table.num_rows == 0:
        return {}
    first: dict[Key, int] = {}
    for i, k in enumerate(_table_keys(table)):
        first.setdefault(k, i)
    rows = sorted(first.values())
    summary = {}
    for name in METRIC_NAMES:
        values = np.asarray(table.column(name).to_pylist(), np.float64)[rows]
        summary[name] = {
            "mean": float(np.mean(values)),
            "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)),
            "files": int(values.size),
        }
    return summary


def _start_ray(cfg: JobConfig) -> bool:
    """Connect to the cluster, or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, logging_level=logging.WARNING)
    else:
        need = cfg.workers * cfg.cpus_per_worker + 1
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(np.ceil(need))),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    return True


def _local_ray_processes() -> dict[int, Any]:
    """The processes of the local Ray this process started (GCS, raylet, their agents and workers), by pid.

    None when connected to a cluster. Ray's own record of the node it started names the first
    level; psutil (the `ray` extra) finds their children, and its Process
    objects never signal a process that took a dead one's pid.
    """
    try:
        import psutil
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        # a Popen already reaped (poll() has its exit status) names a pid the system may have given
        # to another process since: never looked up
        infos = [info for infos in node.all_processes.values() for info in infos] if node else []
        pids = [info.process.pid for info in infos if info.process.poll() is None]
    except Exception:  # noqa: BLE001 - internals of Ray: without them, only the CLI's exit is left to end the job
        return {}
    found: dict[int, Any] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            found[pid] = process
            found.update((child.pid, child) for child in process.children(recursive=True))
    return found


def stop_ray(timeout: float = SHUTDOWN_TIMEOUT_S) -> bool:
    """ray.shutdown, waited on for at most `timeout` s; True when it finished.

    After Ctrl-C in a terminal, Ray's processes (in the same process group) get the signal too and
    stop in any order, and ray.shutdown can wait without end on one that is gone or starved of CPU
    (seen: a job that did not exit within 180 s of Ctrl-C on a busy machine). So it runs in a
    thread; if it has not finished in time (or a second Ctrl-C comes), the processes of the local
    Ray this job started are killed, which ends their workers too. A cluster's processes are never
    touched: its GCS ends the job's actors when the driver goes.
    """
    import ray

    processes = _local_ray_processes()  # now: once ray.shutdown kills the raylet, its children are no longer its own
    done = threading.Event()

    def shutdown() -> None:
        try:
            ray.shutdown()
        except Exception as e:  # noqa: BLE001 - the bound below still holds
            _LOGGER.debug("ray.shutdown failed: %s", e)
        finally:
            done.set()

    threading.Thread(target=shutdown, name="ray-shutdown", daemon=True).start()
    try:
        finished = done.wait(timeout)
    except KeyboardInterrupt:  # another Ctrl-C: stop waiting
        finished = False
    if not finished:
        # the first snapshot's objects win: psutil checks their identity (pid and start time) before
        # it signals; the second only adds processes started since (Ray's new workers)
        for process in {**_local_ray_processes(), **processes}.values():
            with contextlib.suppress(Exception):  # gone already (psutil.NoSuchProcess), or not ours to signal
                process.kill()
    return finished


def interrupted_message(mode: str, out: Path) -> str:
    """The line for a Ctrl-C outside the Ray pipeline (listing, compaction, a reset, the summary)."""
    return f"dataset {mode}: interrupted; {out} keeps what was written so far; the same command resumes"


def run_job(cfg: JobConfig, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> JobResult:
    """Run one dataset job to the end (or to the first system failure Ray could not retry).

    Raises JobInterrupted on Ctrl-C, wherever it comes (in the pipeline: once Ray is shut down,
    within SHUTDOWN_TIMEOUT_S): what was written stays, and the same job resumes.
    """
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; use {MODES}")
    # OUT resolved (symlinks, `..`): one spelling, whichever way -o names it, for the checks below
    cfg = dataclasses.replace(cfg, out=Path(os.path.realpath(cfg.out)))
    try:
        return _run_job(cfg, echo)
    except KeyboardInterrupt:  # outside the pipeline (its Ctrl-C is a JobInterrupted): no Ray to stop
        raise JobInterrupted(interrupted_message(cfg.mode, cfg.out), ray_stopped=True) from None


def _run_job(cfg: JobConfig, echo: Callable[[str], None]) -> JobResult:
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise ReconError(ray_missing_message()) from None
    started = time.perf_counter()
    contract = read_contract(Path(cfg.model.model))
    if getattr(cfg.model, "expect_digest", None) and cfg.model.expect_digest != contract.digest:
        raise ReconError(f"{cfg.model.model}: bundle digest is {contract.digest}, expected {cfg.model.expect_digest}")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise OutputError(f"{cfg.out}: exists and is not a folder; -o/--out names the job's output folder")
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{cfg.out}: cannot create the output folder ({e.strerror or e})") from None
    _refuse_foreign(cfg.out)  # before the lock: never a job.lock in a folder of the user's
    with OutLock(cfg.out, cfg.mode, echo):
        return _run_locked(cfg, contract, started, echo)


def _run_locked(cfg: JobConfig, contract: Any, started: float, echo: Callable[[str], None]) -> JobResult:
    """run_job, holding OUT's lock."""
    import ray

    result = JobResult()
    job = _refuse_foreign(cfg.out)  # again, now that no other job can write OUT
    if job is not None and job["mode"] != cfg.mode:  # with --no-resume too: it would delete that job
        raise OutputError(f"{cfg.out}: holds a dataset {job['mode']} job; use another output folder")
    if job is not None and (job.get("resetting") or not cfg.resume):
        if job.get("resetting"):
            echo(f"{cfg.out}: finishing the --no-resume that an earlier run began (it was interrupted)")
        _start_over(cfg.out, job, echo)
        job = None
    _check_job_file(cfg, contract.fingerprint, job)
    _remove_attempts(cfg.out)  # markers of an earlier run mean nothing now

    items, inside = _leave_out_inside(_expand(cfg.inputs), cfg.out)
    if inside:
        echo(f"{cfg.out}: left out {inside} input file(s) inside the job's own output folder (never inputs)")
    if cfg.mode == RECONSTRUCT:
        _fail_clashes(items)
    current = {i.path: i.key for i in items}

    def stale(key: Key) -> bool:  # a row for a file that has changed since
        return key[0] in current and current[key[0]] != key

    results_dir = cfg.out / RESULT_DIRS[cfg.mode]
    compact(results_dir, stale)
    have = _read_keys(results_dir)
    # an error row whose file has a result row (a batch that ran again and succeeded) is no error
    compact(cfg.out / ERRORS_DIR, lambda k: stale(k) or k in have or (cfg.retry_errors and k[0] in current))
    results, failures = have, _read_keys(cfg.out / ERRORS_DIR) - have
    # reconstruct: audio written (or about to be) in earlier runs, relative to OUT -> the input it came from
    owners = _recorded_outputs(cfg.out) if cfg.mode == RECONSTRUCT else {}
    _remove_temps(cfg.out, cfg.mode, owners)  # what killed runs left half-written
    todo: list[Item] = []
    list_errors: list[dict[str, Any]] = []
    for item in items:
        if item.key in results or item.key in failures:
            result.skipped += 1
            result.failed_before += item.key not in results
            continue
        if cfg.mode == RECONSTRUCT and item.error is None:
            dst = audio_output(cfg.out, item.rel)
            owner = owners.get(audio_rel(item.rel))
            if owner is not None and owner != item.path:
                item.error = (
                    f"{item.path}: its output {dst} was written from {owner} in an earlier run into this output "
                    "folder; use another output folder"
                )
                item.stage = "plan"
            elif owner is None and (dst.exists() or dst.is_symlink()):
                item.error = (
                    f"{item.path}: its output {dst} exists and was not written by this job; "
                    "move it away or use another output folder"
                )
                item.stage = "plan"
        if item.error is not None:
            list_errors.append(
                {
                    "path": item.path,
                    "size": item.size,
                    "mtime_ns": item.mtime_ns,
                    "stage": item.stage,
                    "message": item.error,
                }
            )
        else:
            todo.append(item)
    if list_errors:
        write_shard(cfg.out / ERRORS_DIR, _error_table(list_errors))
        for e in list_errors:
            echo(f"error: {e['message']}")
            result.errors.append((e["path"], e["stage"], e["message"]))
        result.failed += len(list_errors)

    if todo and cfg.mode == RECONSTRUCT:  # recorded before any is written: --no-resume knows what to delete
        write_shard(cfg.out / OUTPUTS_DIR, _outputs_table(todo))

    failure: str | None = None
    interrupted, ray_stopped = False, True
    if todo:
        started_ray = not ray.is_initialized()
        try:
            _start_ray(cfg)
            _run_pipeline(cfg, todo, result, echo)
            _remove_attempts(cfg.out)
        except KeyboardInterrupt:
            interrupted = True
        except Exception as e:  # noqa: BLE001 - one line for the user; summary.json still written below
            failure = _short_error(e)
        finally:
            if started_ray:
                ray_stopped = stop_ray()
                if not ray_stopped and not interrupted:
                    echo(f"Ray did not shut down within {SHUTDOWN_TIMEOUT_S:g} s; its processes were killed")
    result.wall_seconds = time.perf_counter() - started
    results, failures = _done_keys(cfg.out, cfg.mode)
    if interrupted:  # no summary.json: the job did not end (one from an earlier run stays)
        ok = sum(1 for i in items if i.key in results)
        failed = sum(1 for i in items if i.key in failures)
        raise JobInterrupted(
            f"dataset {cfg.mode}: interrupted; {cfg.out} keeps {ok} result(s) and {failed} error row(s) of "
            f"{len(items)} file(s), {len(items) - ok - failed} not done; the same command resumes",
            ray_stopped,
        )
    result.errors_outstanding = sum(1 for i in items if i.key in failures)
    not_done = sum(1 for i in items if i.key not in results and i.key not in failures)
    summary: dict[str, Any] = {
        "mode": cfg.mode,
        "ok": result.ok,
        "failed": result.failed,
        "skipped": result.skipped,
        "failed_before": result.failed_before,
        "audio_hours": result.audio_seconds / 3600,
        "wall_seconds": result.wall_seconds,
        "audio_seconds_per_second": result.audio_seconds / result.wall_seconds if result.wall_seconds else None,
        "workers": cfg.workers,
        "gpus_per_worker": cfg.gpus_per_worker,
        "bundle_fingerprint": contract.fingerprint,
        "errors_outstanding": result.errors_outstanding,
        "not_done": not_done,
        "error": failure,
    }
    if cfg.mode == EVALUATE:
        stats = metrics_summary(cfg.out)
        with atomic_path(cfg.out / METRICS_SUMMARY_FILE) as tmp:
            tmp.write_text(json.dumps(stats, indent=2) + "\n")
        summary["metrics"] = stats
        if stats:
            echo(
                f"{'metric':<16} {'mean':>10} {'median':>10} {'p95':>10}   ({next(iter(stats.values()))['files']} files)"
            )
            for name, s in stats.items():
                echo(f"{name:<16} {s['mean']:>10.4f} {s['median']:>10.4f} {s['p95']:>10.4f}")
    with atomic_path(cfg.out / SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    if failure is not None:
        raise ReconError(
            f"dataset {cfg.mode}: the Ray job failed ({failure}); {not_done} file(s) not done, "
            "a rerun with the same command resumes"
        )
    echo(result.line(cfg.mode))
    return result


def _short_error(e: BaseException) -> str:
    """A Ray error (often pages of a remote traceback) as one short line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
    text = lines[-1] if lines else "no message"
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


def _run_pipeline(cfg: JobConfig, todo: list[Item], result: JobResult, echo: Callable[[str], None]) -> None:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    rows = [{"path": i.path, "size": i.size, "mtime_ns": i.mtime_ns, "rel": i.rel} for i in todo]
    # small jobs: batches small enough that every worker gets some
    batch = max(1, min(cfg.batch_size, -(-len(rows) // cfg.workers)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch)))
    tries = max_tries(cfg.batch_attempts, batch)
    ds = ds.map_batches(
        prepare_batch,
        fn_kwargs={
            "model": cfg.model,
            "max_seconds": cfg.max_seconds,
            "keep_waveform": cfg.mode == EVALUATE,
            "out": cfg.out,
            "batch_attempts": cfg.batch_attempts,
            "crash_always": cfg.crash_always,
        },
        batch_size=batch,
        batch_format="numpy",
        num_cpus=PREPARE_CPUS,
        memory=PREPARE_MEMORY,
        # Ray Data retries tasks without limit by default: a file that kills its process would
        # hang the job; _Attempts makes every retry progress, so this bound is never the end
        max_retries=tries,
    )
    ds = ds.map_batches(
        Worker,
        fn_constructor_kwargs={"config": cfg},
        batch_size=batch,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.workers),
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker or None,
        # restarts stay unlimited (each follows a task try, and those are bounded); task retries bounded
        max_restarts=-1,
        max_task_retries=tries,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for path, ok, seconds, stage, message in zip(
            batch["path"], batch["ok"], batch["seconds"], batch["stage"], batch["message"]
        ):
            if ok:
                result.ok += 1
                result.audio_seconds += float(seconds)
            else:
                result.failed += 1
                result.errors.append((str(path), str(stage), str(message)))
                echo(f"error: {message}")
