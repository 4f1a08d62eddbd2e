"""The two stages a dataset job runs on Ray: CPU tasks that read and prepare each file
(`prepare_batch`), and graph workers (`Worker`, one `Reconstructor` each) that run the graphs and
write a batch's shards; `_Attempts` bounds the retries of a batch whose worker dies."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import numpy as np

from ..channels import channel_count, encode_facts, encoded_clip
from ..contract import ENCODER, RANDOM_WEIGHTS_WARNING, ROLES
from ..errors import AudioInputError, ReconError, failure_message
from ..files.audio import read_audio
from ..files.encoded import (
    BUNDLE_FINGERPRINT,
    FIELDS,
    FORMAT_VERSION_FIELD,
    GAIN,
    INPUT_CHANNELS,
    INPUT_SAMPLE_RATE,
    NUM_SAMPLES,
    SAMPLE_RATE_FIELD,
    SAMPLED,
    SCALING_FACTOR,
    SEED,
    SOURCE,
    file_seed,
)
from ..files.outputs import write_audio_file
from ..reconstructor import posterior_draw
from ..windows import Features
from .config import (
    ATTEMPTS_DIR,
    ENCODE,
    ERRORS_DIR,
    METRIC_NAMES,
    OUTPUTS_DIR,
    RECONSTRUCT,
    RESULT_DIRS,
    JobConfig,
    Key,
    audio_rel,
)
from .listing import is_uri, open_filesystem
from .shards import WRITTEN, error_table, keys_digest, shard_name, write_shard, written_table

_LOGGER = logging.getLogger(__name__)

Reader = Callable[[str], tuple[np.ndarray, int]]
"""Reads one input (a local path or a URI) as (float32 samples, sample rate)."""

PREPARE_MEMORY: Final = 1 << 30  # Ray memory request per read + front-end task (one decoded file + a batch of log-mels)
PREPARE_CPUS: Final = 0.25  # Ray CPUs per read + front-end task (they mostly wait on I/O and numpy)


_FRONT_ENDS: dict[Any, Any] = {}


class _SaidByTheDriver(logging.Filter):
    """Drops the bundle's random-weights warning in Ray's processes: `run_job` says it once, where
    every read task and graph worker would each repeat it (and Ray then adds its log-dedup notice)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != RANDOM_WEIGHTS_WARNING


def _quiet_repeats() -> None:
    """Install _SaidByTheDriver on the reconstructor's logger, once per process."""
    logger = logging.getLogger("recon_runtime.reconstructor")
    if not any(isinstance(f, _SaidByTheDriver) for f in logger.filters):
        logger.addFilter(_SaidByTheDriver())


def _front_end(model: Any) -> Any:
    """A Reconstructor for the front end only, once per process: CPU, no graphs loaded."""
    _quiet_repeats()
    key = (str(model.model), getattr(model, "expect_digest", None))
    if key not in _FRONT_ENDS:
        _FRONT_ENDS[key] = dataclasses.replace(
            model, provider="cpu", precision="auto", cuda_graph=False, device=None
        ).load(None)
    return _FRONT_ENDS[key]


def read_any(path: str) -> tuple[np.ndarray, int]:
    """`read_audio` for a local path; other file systems are copied to a temporary file first."""
    if not is_uri(path):
        return read_audio(Path(path))
    filesystem, inner = open_filesystem(path)
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
        self.dir = out / ATTEMPTS_DIR / f"{stage}-{keys_digest(keys)[:20]}"
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
    read: Reader = read_any,
) -> dict[str, np.ndarray]:
    """CPU task: read (`read`), decode and run the front end (`Reconstructor.features`); a failure becomes
    the row's error.

    The prepared waveform goes on only with `keep_waveform` (evaluate compares against it).
    """
    rec = _front_end(model)
    n = len(batch["path"])
    paths = [str(p) for p in batch["path"]]
    attempts = None
    if out is not None:
        keys = [(paths[i], int(batch["size"][i]), int(batch["mtime_ns"][i])) for i in range(n)]
        attempts = _Attempts(out, "read", keys, batch_attempts)
    mels, waves, gains, samples, rates, channels, errors = [], [], [], [], [], [], []
    for i in range(n):
        path = paths[i]
        isolate = attempts is not None and attempts.isolate
        died = isolate and attempts.died_on(path)
        try:
            if died:
                raise AudioInputError(attempts.message(path, "reading"))
            if isolate:
                attempts.begin(path)
            audio, sr = read(path)
            seconds = audio.shape[0] / sr
            if max_seconds is not None and seconds > max_seconds:
                raise AudioInputError(
                    f"{path}: {seconds:.1f} s is longer than the limit of {max_seconds:g} s (--max-seconds)"
                )
            feats = rec.features(audio, sr)
            count = channel_count(audio)
            del audio
            mels.append(feats.log_mel)
            waves.append(feats.waveform if keep_waveform else np.zeros(0, np.float32))
            gains.append(feats.gain)
            samples.append(feats.num_samples)
            rates.append(sr)
            channels.append(count)
            errors.append("")
        except Exception as e:  # noqa: BLE001 - a bad file is an error row, never the end of the job
            mels.append(np.zeros((0, rec.contract.mel.n_mels), np.float32))
            waves.append(np.zeros(0, np.float32))
            gains.append(0.0)
            samples.append(0)
            rates.append(0)
            channels.append(0)
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
        channels=np.asarray(channels, np.int64),
        read_error=np.asarray(errors, dtype=object),
    )
    return out_batch


class _Written:
    """reconstruct: the audio one batch wrote, recorded in OUT/outputs right after each write (its size
    and mtime then), before the batch's done/ shard: a worker killed in between leaves its files owned.

    One shard per batch (`shard_name(keys, WRITTEN)`), rewritten whole after each file (a batch holds
    a few); a batch that runs again (its worker died) starts from the rows its earlier tries recorded."""

    def __init__(self, out: Path, keys: Sequence[Key]):
        import pyarrow.parquet as pq

        self.folder = out / OUTPUTS_DIR
        self.name = shard_name(keys, WRITTEN)
        path = self.folder / self.name
        self.rows: list[dict[str, Any]] = pq.read_table(path).to_pylist() if path.is_file() else []

    def add(self, base: dict[str, Any], output: str, size: int, mtime_ns: int) -> None:
        self.rows.append({**base, "output": output, "output_size": size, "output_mtime_ns": mtime_ns})
        write_shard(self.folder, written_table(self.rows), self.name)


class Worker:
    """Actor stage: one Reconstructor per worker runs the graphs and writes the batch's shards."""

    def __init__(self, config: JobConfig):
        self.config = config
        stages = (ENCODER,) if config.mode == ENCODE else ROLES
        _quiet_repeats()
        self.rec = config.model.for_cpus(config.cpus_per_worker).load(stages)
        self.fingerprint = self.rec.contract.fingerprint
        self._written: _Written | None = None  # reconstruct: the running batch's written audio

    def process(self, paths: Sequence[str], feats: list[Features]) -> list[Any]:
        """Per input: the mode's graph output, or the exception it raised (a bad one never sinks the batch).

        `paths` name the inputs of `feats`. Called once per batch, or once per file when the batch's
        worker died before (`_Attempts`): the one place where a subclass sees which files run (tests
        make a worker die there, as an out-of-memory kill would).
        """
        rec = self.rec

        def encode(fs: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
            # the posterior's mean and std cropped as Reconstructor.encode_features crops them (drops bucket padding)
            outs = rec.run_jobs([rec.encoding_job(f) for f in fs])
            return [(rec.crop_latents(f, m), rec.crop_latents(f, sd)) for f, (m, sd) in zip(fs, outs)]

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
        if not all(np.isfinite(part).all() for part in (out if isinstance(out, tuple) else (out,))):
            raise ReconError(f"{base['path']}: the graphs produced NaN or inf")
        return self._result(batch, i, f, out, base)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.config
        n = len(batch["path"])
        paths = [str(p) for p in batch["path"]]
        base = [
            {"path": paths[i], "size": int(batch["size"][i]), "mtime_ns": int(batch["mtime_ns"][i])} for i in range(n)
        ]
        keys = [(b["path"], b["size"], b["mtime_ns"]) for b in base]
        attempts = _Attempts(cfg.out, "run", keys, cfg.batch_attempts)
        self._written = _Written(cfg.out, keys) if cfg.mode == RECONSTRUCT else None
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
                    rows.append(self._row(batch, i, f, self.process([paths[i]], [f])[0], base[i]))
                except Exception as e:  # noqa: BLE001 - one error row per failed file
                    errors.append({**base[i], "stage": cfg.mode, "message": failure_message(paths[i], e)})
                attempts.end(paths[i])
        else:
            outs = self.process([paths[i] for i in ready], feats) if feats else []
            for i, f, out in zip(ready, feats, outs):
                try:
                    rows.append(self._row(batch, i, f, out, base[i]))
                except Exception as e:  # noqa: BLE001 - one error row per failed file
                    errors.append({**base[i], "stage": cfg.mode, "message": failure_message(paths[i], e)})
        # both shards named after the whole batch and always written (even empty): a batch that runs
        # again (Ray retried it) replaces both, whatever its outcome was the first time
        name = shard_name(keys)
        write_shard(cfg.out / ERRORS_DIR, error_table(errors), name)
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

    def _result(self, batch: dict[str, np.ndarray], i: int, feats: Any, out: Any, base: dict[str, Any]) -> dict:
        """One file's row: its key, the encoded-audio fields (`FIELDS`, by `encoded_clip`, the builder of
        every encode's facts) that the mode has, and the mode's results."""
        cfg, rec = self.config, self.rec
        rate = rec.contract.mel.sample_rate
        source_rate, channels = int(batch["source_rate"][i]), int(batch["channels"][i])
        if cfg.mode == ENCODE:
            mean, std = out
            seed = file_seed(cfg.seed, base["path"]) if cfg.sample else None
            latents = posterior_draw(mean, std, seed) if cfg.sample else mean
            clip = encoded_clip(  # checked as every encoded clip is (finite latents, a length they hold)
                rec.contract, feats, latents, source_rate, sampled=cfg.sample, seed=seed,
                input_channels=channels, source=base["path"],
            )  # fmt: skip
            fields = {**clip.fields(), GAIN: clip.gain[0]}  # one channel (dataset jobs mix): a number
        else:
            fields = encode_facts(rec.contract, feats, source_rate, input_channels=channels)
        names = ENCODE_FIELDS if cfg.mode == ENCODE else COMMON_FIELDS
        row = {**base, **{name: fields[name] for name in names}, "duration_s": feats.num_samples / rate}
        if cfg.mode == ENCODE:
            row["latents"] = np.ascontiguousarray(latents, np.float32).ravel()
            row["latent_shape"] = list(latents.shape)
        elif cfg.mode == RECONSTRUCT:
            out_rate = cfg.output_rate or rate
            rel = audio_rel(str(batch["rel"][i]))
            write_audio_file(cfg.out / rel, rec.finish(feats, out, out_rate), out_rate, sample_format=cfg.sample_format)
            st = os.stat(cfg.out / rel)  # what the job wrote: it deletes or replaces the file only while it is that
            assert self._written is not None
            self._written.add(base, rel, st.st_size, st.st_mtime_ns)
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
            from ..files.metrics import UNDEFINED_REASON

            for name in METRIC_NAMES:  # null where undefined (a silent input), UNDEFINED_REASON says why
                cols[name] = pa.array([r[name] for r in rows], pa.float64())
            cols[UNDEFINED_REASON] = pa.array([r.get(UNDEFINED_REASON) for r in rows], pa.string())
        types = field_types()
        for name in ENCODE_FIELDS if self.config.mode == ENCODE else COMMON_FIELDS:
            cols[name] = pa.array([r[name] for r in rows], types[name])
        cols["duration_s"] = pa.array([r["duration_s"] for r in rows], pa.float64())
        return pa.table(cols)


@dataclass(frozen=True)
class Stages:
    """The two stages `run_job` runs: how a CPU task reads a file, and the graph workers' class.

    Production runs these defaults; tests pass others to `run_job` (a reader or a worker that dies
    or stalls, as an out-of-memory kill or a hung node would), so no production batch checks a test's
    setting. Both travel to Ray's processes: a replacement must pickle (cloudpickle) there.
    """

    read: Reader = read_any
    worker: type[Worker] = Worker


COMMON_FIELDS: Final = (NUM_SAMPLES, GAIN, INPUT_SAMPLE_RATE, INPUT_CHANNELS, BUNDLE_FINGERPRINT)
"""The encoded-audio fields every mode's rows carry (the input and its prepared level and length)."""
ENCODE_FIELDS: Final = FIELDS
"""encode rows carry them all, so `EncodedAudio.from_fields(latents, row)` reads a row as a clip;
`source` is the row's `path`."""


def field_types() -> dict[str, Any]:
    """The Parquet type of each field's column (gain: one number, as dataset jobs mix to one channel)."""
    import pyarrow as pa

    return {
        FORMAT_VERSION_FIELD: pa.int32(),
        NUM_SAMPLES: pa.int64(),
        SAMPLE_RATE_FIELD: pa.int32(),
        GAIN: pa.float64(),
        BUNDLE_FINGERPRINT: pa.string(),
        SAMPLED: pa.bool_(),
        SEED: pa.int64(),
        INPUT_SAMPLE_RATE: pa.int32(),
        INPUT_CHANNELS: pa.int32(),
        SCALING_FACTOR: pa.float64(),
        SOURCE: pa.string(),
    }
