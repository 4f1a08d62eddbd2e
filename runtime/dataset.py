"""Dataset jobs on Ray Data: encode a whole dataset to latents, reconstruct it, or evaluate it.

Pipeline: the driver lists the inputs (folders, files, CSV/Parquet manifests, local or any file
system pyarrow opens) and drops the files already done -> CPU tasks read, decode and run the front
end (`Reconstructor.features`) -> an actor pool (`map_batches` with a class holding one
`Reconstructor`, so the graphs load once per worker) runs the graphs and writes the results ->
the driver counts what came back and prints a summary.

Output folder (`OUT`, a local path; on a cluster, one every node mounts):

- `job.json`: the job (mode, bundle fingerprint); a rerun with another mode or bundle is refused.
- `latents/` (encode), `done/` (reconstruct), `metrics/` (evaluate): Parquet shards, one row per
  file, keyed by (`path`, `size`, `mtime_ns`); reconstruct's audio goes under `audio/`, mirroring
  the input tree as `recon-run reconstruct` does.
- `errors/`: Parquet shards, one row per failed file (`path`, `size`, `mtime_ns`, `stage`, `message`).
- `summary.json` (and for evaluate `metrics-summary.json`: mean, median, p95 per metric).

Resume: a rerun skips every file that has a row (result or error) with the same key and does the
rest; `retry_errors` runs the failed ones again. Every shard is written atomically under a name
derived from the keys it holds, so a batch that Ray retries after a worker died rewrites the same
shard instead of adding a second one; a file is never counted twice, and none goes missing.

ray and pyarrow are imported only inside functions: `import recon_runtime` never imports them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

import numpy as np

from .audio_io import atomic_path, is_audio_file, read_audio, write_audio
from .contract import ENCODER, ROLES, read_contract
from .errors import AudioInputError, OutputError, ReconError

_LOGGER = logging.getLogger(__name__)

ENCODE: Final = "encode"
RECONSTRUCT: Final = "reconstruct"
EVALUATE: Final = "evaluate"
MODES: Final = (ENCODE, RECONSTRUCT, EVALUATE)
RESULT_DIRS: Final = {ENCODE: "latents", RECONSTRUCT: "done", EVALUATE: "metrics"}
ERRORS_DIR: Final = "errors"
AUDIO_DIR: Final = "audio"
JOB_FILE: Final = "job.json"
SUMMARY_FILE: Final = "summary.json"
METRICS_SUMMARY_FILE: Final = "metrics-summary.json"
MANIFEST_EXTENSIONS: Final = (".csv", ".parquet")
METRIC_NAMES: Final = ("log_mel_l1", "log_mel_rmse", "mel_correlation", "mrstft", "si_sdr_db")
DEFAULT_MAX_SECONDS: Final = 3600.0
KEY_COLUMNS: Final = ("path", "size", "mtime_ns")
PREPARE_CPUS: Final = 0.25  # Ray CPUs per read + front-end task (they mostly wait on I/O and numpy)

Key = tuple[str, int, int]


def ray_missing_message() -> str:
    return "dataset jobs need Ray: pip install 'audioldm2-recon[ray]' (adds ray[data,serve] and pyarrow)"


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class JobConfig:
    """One dataset job. `model` is any object with `load(stages) -> Reconstructor` (cli.ModelArgs)."""

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
    # test hooks: stop the driver after this many files came back (as if it were killed), and make
    # one worker process die once (os._exit) on the file whose name is crash_once[0], using the
    # marker file crash_once[1] to do it only once
    stop_after: int | None = None
    crash_once: tuple[str, str] | None = None


@dataclass
class JobResult:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    failed_before: int = 0
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
        )


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
    from .audio_io import discover

    return [_stat(os.path.abspath(p), rel.as_posix()) for p, rel in discover([Path(root)], is_audio_file)]


def _is_dir(path: str) -> bool:
    if _is_uri(path):
        from pyarrow import fs as pafs

        filesystem, inner = _filesystem(path)
        return filesystem.get_file_info(inner).type == pafs.FileType.Directory
    return os.path.isdir(path)


def list_inputs(inputs: Iterable[str]) -> list[Item]:
    """Expand folders, files and manifests into items; a clash of mirrored outputs fails each file involved."""
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
    items = list(unique.values())
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
    return items


# ----------------------------------------------------------------------------- tables on disk


def _shard_name(keys: Sequence[Key]) -> str:
    digest = hashlib.sha256("\n".join(f"{p}\t{s}\t{m}" for p, s, m in sorted(keys)).encode()).hexdigest()
    return f"part-{digest[:20]}.parquet"


def write_shard(folder: Path, table: Any) -> Path:
    """Write a table atomically as folder/part-<hash of its keys>.parquet (the same rows, the same name)."""
    import pyarrow.parquet as pq

    keys = list(zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS)))
    path = folder / _shard_name(keys)
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


def compact(folder: Path, drop: Callable[[Key], bool]) -> None:
    """Remove rows `drop` selects and repeated keys, shard by shard (each rewrite atomic, then the old one removed).

    A crash between writing a shard's replacement and removing it leaves repeated keys, which the
    next compaction removes: a key is never lost.
    """
    import pyarrow.parquet as pq

    seen: set[Key] = set()
    for shard in _shards(folder):
        table = pq.read_table(shard)
        keys = list(zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS)))
        keep = []
        for k in keys:
            keep.append(not drop(k) and k not in seen)
            seen.add(k)
        if all(keep):
            continue
        if any(keep):
            new = write_shard(folder, table.filter(keep))
            if new == shard:
                continue
        shard.unlink()


def _done_keys(out: Path, mode: str) -> tuple[set[Key], set[Key]]:
    result, errors = set(), set()
    for folder, target in ((out / RESULT_DIRS[mode], result), (out / ERRORS_DIR, errors)):
        table = read_table(folder, KEY_COLUMNS)
        if table is not None:
            target.update(zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS)))
    return result, errors


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


# ----------------------------------------------------------------------------- stages (run on Ray)

_FRONT_ENDS: dict[Any, Any] = {}


def _front_end(model: Any) -> Any:
    """A Reconstructor for the front end only, once per process: CPU, no sessions created."""
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


def _message(path: str, e: BaseException) -> str:
    if isinstance(e, ReconError):
        text = str(e)
    elif isinstance(e, MemoryError):
        text = "out of memory"
    else:
        text = f"{type(e).__name__}: {' '.join(str(e).split()) or 'no message'}"
    return text if path in text else f"{path}: {text}"


def _objects(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array of arrays (ragged columns for Ray Data)."""
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def prepare_batch(batch: dict[str, np.ndarray], model: Any, max_seconds: float | None) -> dict[str, np.ndarray]:
    """CPU task: read, decode and run the front end (`Reconstructor.features`); a failure becomes the row's error."""
    rec = _front_end(model)
    n = len(batch["path"])
    mels, waves, gains, samples, rates, errors = [], [], [], [], [], []
    for i in range(n):
        path = str(batch["path"][i])
        try:
            audio, sr = _read_any(path)
            seconds = audio.shape[0] / sr
            if max_seconds is not None and seconds > max_seconds:
                raise AudioInputError(
                    f"{path}: {seconds:.1f} s is longer than the limit of {max_seconds:g} s (--max-seconds)"
                )
            feats = rec.features(audio, sr)
            mels.append(feats.log_mel)
            waves.append(feats.waveform)
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
            errors.append(_message(path, e))
    out = {k: batch[k] for k in ("path", "size", "mtime_ns", "rel")}
    out.update(
        log_mel=_objects(mels),
        waveform=_objects(waves),
        gain=np.asarray(gains, np.float64),
        num_samples=np.asarray(samples, np.int64),
        source_rate=np.asarray(rates, np.int64),
        read_error=np.asarray(errors, dtype=object),
    )
    return out


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

    def _maybe_crash(self, paths: Sequence[str]) -> None:
        hook = self.config.crash_once
        if hook and any(PurePosixPath(p).name == hook[0] for p in paths) and not os.path.exists(hook[1]):
            Path(hook[1]).write_text("crashed once\n")
            os._exit(1)

    def _run(self, feats: list[Any]) -> list[Any]:
        """Per input: the mode's graph output, or the exception it raised (a bad one never sinks the batch)."""
        rec = self.rec
        jobs = (
            (lambda fs: [m for m, _ in rec.run_jobs([rec.encoding_job(f) for f in fs])])
            if self.config.mode == ENCODE
            else rec.reconstruct_features
        )
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .reconstructor import Features

        cfg = self.config
        n = len(batch["path"])
        paths = [str(p) for p in batch["path"]]
        self._maybe_crash(paths)
        errors: list[dict[str, Any]] = []
        ready: list[int] = []
        feats: list[Any] = []
        base = [
            {"path": paths[i], "size": int(batch["size"][i]), "mtime_ns": int(batch["mtime_ns"][i])} for i in range(n)
        ]
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
        outs = self._run(feats) if feats else []
        rate = self.rec.contract.mel.sample_rate
        rows: list[dict[str, Any]] = []
        for i, f, out in zip(ready, feats, outs):
            try:
                if isinstance(out, BaseException):
                    raise out
                if not np.isfinite(out).all():
                    raise ReconError(f"{paths[i]}: the graphs produced NaN or inf")
                rows.append(self._result(batch, i, f, out, base[i]))
            except Exception as e:  # noqa: BLE001 - one error row per failed file
                errors.append({**base[i], "stage": cfg.mode, "message": _message(paths[i], e)})
        if rows:
            write_shard(cfg.out / RESULT_DIRS[cfg.mode], self._table(rows))
        if errors:
            write_shard(cfg.out / ERRORS_DIR, _error_table(errors))
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
            dst = cfg.out / AUDIO_DIR / PurePosixPath(str(batch["rel"][i])).with_suffix(".wav")
            write_audio(dst, rec.finish(feats, out, out_rate), out_rate, cfg.sample_format)
            row["output"] = str(dst)
        else:
            from .metrics import compare

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
        else:
            for name in METRIC_NAMES:
                cols[name] = pa.array([r[name] for r in rows], pa.float64())
        cols["num_samples"] = pa.array([r["num_samples"] for r in rows], pa.int64())
        cols["gain"] = pa.array([r["gain"] for r in rows], pa.float64())
        cols["source_sample_rate"] = pa.array([r["source_sample_rate"] for r in rows], pa.int32())
        cols["duration_s"] = pa.array([r["duration_s"] for r in rows], pa.float64())
        cols["bundle_fingerprint"] = pa.array([r["bundle_fingerprint"] for r in rows], pa.string())
        return pa.table(cols)


# ----------------------------------------------------------------------------- the job


def _check_job_file(cfg: JobConfig, fingerprint: str) -> None:
    path = cfg.out / JOB_FILE
    if path.is_file():
        try:
            job = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise OutputError(f"{path}: unreadable ({e}); use a fresh output folder") from None
        if job.get("mode") != cfg.mode:
            raise OutputError(f"{cfg.out}: holds a dataset {job.get('mode')} job; use another output folder")
        if job.get("bundle_fingerprint") != fingerprint:
            raise OutputError(
                f"{cfg.out}: holds results of bundle {job.get('bundle_fingerprint')}, this bundle is {fingerprint}; "
                "use another output folder (or --no-resume to start over)"
            )
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"mode": cfg.mode, "bundle_fingerprint": fingerprint}, indent=2) + "\n")


def _start_over(cfg: JobConfig) -> None:
    for name in (RESULT_DIRS[cfg.mode], ERRORS_DIR, JOB_FILE, SUMMARY_FILE, METRICS_SUMMARY_FILE):
        target = cfg.out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def metrics_summary(out: Path) -> dict[str, dict[str, float]]:
    """mean, median and p95 of each metric over every row of OUT/metrics."""
    table = read_table(out / RESULT_DIRS[EVALUATE], METRIC_NAMES)
    if table is None or table.num_rows == 0:
        return {}
    summary = {}
    for name in METRIC_NAMES:
        values = np.asarray(table.column(name).to_pylist(), np.float64)
        summary[name] = {
            "mean": float(np.mean(values)),
            "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)),
            "files": int(values.size),
        }
    return summary


class _Stopped(RuntimeError):
    """Raised by the stop_after test hook, as if the driver had been killed."""


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


def run_job(cfg: JobConfig, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> JobResult:
    """Run one dataset job to the end (or to the first system failure Ray could not retry)."""
    try:
        import pyarrow  # noqa: F401
        import ray
    except ImportError:
        raise ReconError(ray_missing_message()) from None
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; use {MODES}")
    started = time.perf_counter()
    result = JobResult()
    contract = read_contract(Path(cfg.model.model))
    if getattr(cfg.model, "expect_digest", None) and cfg.model.expect_digest != contract.digest:
        raise ReconError(f"{cfg.model.model}: bundle digest is {contract.digest}, expected {cfg.model.expect_digest}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        _start_over(cfg)
    _check_job_file(cfg, contract.fingerprint)

    items = list_inputs(cfg.inputs)
    current = {i.path: i.key for i in items}

    def stale(key: Key) -> bool:  # a row for a file that has changed since
        return key[0] in current and current[key[0]] != key

    compact(cfg.out / RESULT_DIRS[cfg.mode], stale)
    compact(cfg.out / ERRORS_DIR, lambda k: stale(k) or (cfg.retry_errors and k[0] in current))
    results, failures = _done_keys(cfg.out, cfg.mode)
    todo: list[Item] = []
    list_errors: list[dict[str, Any]] = []
    for item in items:
        if item.key in results or item.key in failures:
            result.skipped += 1
            result.failed_before += item.key not in results
        elif item.error is not None:
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

    if todo:
        started_ray = _start_ray(cfg)
        try:
            _run_pipeline(cfg, todo, result, echo)
        finally:
            if started_ray:
                ray.shutdown()
    result.wall_seconds = time.perf_counter() - started
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
    echo(result.line(cfg.mode))
    return result


def _run_pipeline(cfg: JobConfig, todo: list[Item], result: JobResult, echo: Callable[[str], None]) -> None:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    rows = [{"path": i.path, "size": i.size, "mtime_ns": i.mtime_ns, "rel": i.rel} for i in todo]
    # small jobs: batches small enough that every worker gets some
    batch = max(1, min(cfg.batch_size, -(-len(rows) // cfg.workers)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch)))
    ds = ds.map_batches(
        prepare_batch,
        fn_kwargs={"model": cfg.model, "max_seconds": cfg.max_seconds},
        batch_size=batch,
        batch_format="numpy",
        num_cpus=PREPARE_CPUS,
    )
    ds = ds.map_batches(
        Worker,
        fn_constructor_kwargs={"config": cfg},
        batch_size=batch,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.workers),
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker or None,
    )
    seen = 0
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
            seen += 1
            if cfg.stop_after is not None and seen >= cfg.stop_after:
                raise _Stopped(f"stopped after {seen} files (test hook)")
