"""`run_job`: one dataset job, from listing its inputs to its summary, on a local Ray or a cluster.

It lists the inputs (`listing`), refuses an OUT no job wrote and takes its lock (`outdir`), drops
the files done before (`shards`), runs the two stages on Ray Data (`stages`), and writes the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..cluster import start_ray
from ..contract import RANDOM_WEIGHTS_WARNING, read_contract
from ..errors import OutputError, ReconError, require
from ..files.audio import atomic_path
from .config import (
    ERRORS_DIR,
    EVALUATE,
    KEY_COLUMNS,
    METRIC_NAMES,
    METRICS_SUMMARY_FILE,
    MODES,
    OUTPUTS_DIR,
    RECONSTRUCT,
    RESULT_DIRS,
    SUMMARY_FILE,
    JobConfig,
    Key,
    audio_output,
    audio_rel,
)
from .listing import Item, expand, fail_clashes, leave_out_inside
from .outdir import (
    OutLock,
    check_job_record,
    recorded_outputs,
    refuse_foreign,
    remove_attempts,
    remove_temps,
    start_over,
    still_written,
    written_outputs,
)
from .shards import (
    PLANNED,
    compact,
    done_keys,
    error_table,
    outputs_table,
    read_keys,
    read_table,
    shard_name,
    table_keys,
    write_shard,
)
from .stages import PREPARE_CPUS, PREPARE_MEMORY, Stages, max_tries, prepare_batch

_LOGGER = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S: Final = 10.0  # how long ray.shutdown may take (after Ctrl-C) before Ray's processes are killed
INTERRUPTED_EXIT: Final = 130  # exit status after Ctrl-C (128 + SIGINT, as shells report it)


def duration(seconds: float) -> str:
    """A span in the unit a reader takes in at once: seconds under a minute, minutes under an hour, then hours."""
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    if round(seconds / 60, 1) < 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


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
            f"{duration(self.audio_seconds)} of audio in {duration(self.wall_seconds)} wall ({rate} audio-s/s)"
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


def metrics_summary(out: Path) -> dict[str, dict[str, float | int | None]]:
    """mean, median and p95 of each metric over the rows of OUT/metrics, one per file (repeated keys count once).

    A metric undefined for a file (null: a silent input) is left out of its statistics: `files`
    counts the files it is defined for, `undefined` the others; with none defined the statistics are None.
    """
    table = read_table(out / RESULT_DIRS[EVALUATE], [*KEY_COLUMNS, *METRIC_NAMES])
    if table is None or table.num_rows == 0:
        return {}
    first: dict[Key, int] = {}
    for i, k in enumerate(table_keys(table)):
        first.setdefault(k, i)
    rows = sorted(first.values())
    summary: dict[str, dict[str, float | int | None]] = {}
    for name in METRIC_NAMES:
        column = np.asarray(table.column(name).to_pylist(), np.float64)[rows]  # null -> NaN
        values = column[~np.isnan(column)]
        summary[name] = {
            "mean": float(np.mean(values)) if values.size else None,
            "median": float(np.median(values)) if values.size else None,
            "p95": float(np.percentile(values, 95)) if values.size else None,
            "files": int(values.size),
            "undefined": int(column.size - values.size),
        }
    return summary


def _stat(value: float | int | None) -> str:
    return f"{value:>10.4f}" if value is not None else f"{'-':>10}"


class _DefaultTokenNotice(logging.Filter):
    """Drops Ray's notice that a new local Ray enables token authentication by default (how to opt
    out): the job keeps that default. Ray's warning that authentication is disabled still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled")


def _quiet_ray(progress: bool) -> None:
    """Ray's own console output down to what a user acts on; its session log files keep everything.

    Ray Data's progress bars only when wanted and stdout and stderr are terminals (elsewhere Ray
    Data logs progress as INFO lines, dozens per job); its INFO lines (execution plans, "execution
    finished") and its notices about the progress display go to its log files only. Its warnings and
    errors still show, and so do the driver's (`ray.init(logging_level=WARNING)`) and the workers'.
    """
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = progress and sys.stdout.isatty() and sys.stderr.isatty()
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":  # Ray Data's console handler (ray.data._internal.logging), INFO by default
            handler.setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled. To enable..."
    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DefaultTokenNotice) for f in token.filters):
        token.addFilter(_DefaultTokenNotice())


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


def run_job(
    cfg: JobConfig, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr), stages: Stages = Stages()
) -> JobResult:
    """Run one dataset job to the end (or to the first system failure Ray could not retry).

    `stages`: the reader and the graph workers' class (tests replace them; see `Stages`).

    Raises JobInterrupted on Ctrl-C, wherever it comes (in the pipeline: once Ray is shut down,
    within SHUTDOWN_TIMEOUT_S): what was written stays, and the same job resumes.
    """
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; use {MODES}")
    # OUT resolved (symlinks, `..`): one spelling, whichever way -o names it, for the checks below
    cfg = dataclasses.replace(cfg, out=Path(os.path.realpath(cfg.out)))
    try:
        return _run_job(cfg, echo, stages)
    except KeyboardInterrupt:  # outside the pipeline (its Ctrl-C is a JobInterrupted): no Ray to stop
        raise JobInterrupted(interrupted_message(cfg.mode, cfg.out), ray_stopped=True) from None


def _run_job(cfg: JobConfig, echo: Callable[[str], None], stages: Stages) -> JobResult:
    require(("pyarrow", "ray"), "dataset jobs need Ray Data and pyarrow", "ray")
    started = time.perf_counter()
    contract = read_contract(Path(cfg.model.model))
    if contract.random_weights:  # said once here; the read tasks and graph workers do not repeat it
        echo(RANDOM_WEIGHTS_WARNING % cfg.model.model)
    if cfg.model.expect_digest and cfg.model.expect_digest != contract.digest:
        raise ReconError(f"{cfg.model.model}: bundle digest is {contract.digest}, expected {cfg.model.expect_digest}")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise OutputError(f"{cfg.out}: exists and is not a folder; -o/--out names the job's output folder")
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{cfg.out}: cannot create the output folder ({e.strerror or e})") from None
    refuse_foreign(cfg.out)  # before the lock: never a job.lock in a folder of the user's
    with OutLock(cfg.out, cfg.mode, echo):
        return _run_locked(cfg, contract, started, echo, stages)


def _run_locked(
    cfg: JobConfig, contract: Any, started: float, echo: Callable[[str], None], stages: Stages
) -> JobResult:
    """run_job, holding OUT's lock."""
    import ray

    result = JobResult()
    job = refuse_foreign(cfg.out)  # again, now that no other job can write OUT
    if job is not None and job["mode"] != cfg.mode:  # with --no-resume too: it would delete that job
        raise OutputError(f"{cfg.out}: holds a dataset {job['mode']} job; use another output folder")
    if job is not None and (job.get("resetting") or not cfg.resume):
        if job.get("resetting"):
            echo(f"{cfg.out}: finishing the --no-resume that an earlier run began (it was interrupted)")
        start_over(cfg.out, job, echo)
        job = None
    check_job_record(cfg, contract.fingerprint, job)
    remove_attempts(cfg.out)  # markers of an earlier run mean nothing now

    items, inside = leave_out_inside(expand(cfg.inputs), cfg.out)
    if inside:
        echo(f"{cfg.out}: left out {inside} input file(s) inside the job's own output folder (never inputs)")
    if cfg.mode == RECONSTRUCT:
        fail_clashes(items)
    current = {i.path: i.key for i in items}

    def stale(key: Key) -> bool:  # a row for a file that has changed since
        return key[0] in current and current[key[0]] != key

    results_dir = cfg.out / RESULT_DIRS[cfg.mode]
    # reconstruct, read before compaction drops the done/ rows of inputs that changed: audio written (or
    # about to be) in earlier runs, relative to OUT -> the input it came from, and what the job wrote
    owners = recorded_outputs(cfg.out) if cfg.mode == RECONSTRUCT else {}
    written = written_outputs(cfg.out) if cfg.mode == RECONSTRUCT else {}
    ended_in_errors = read_keys(cfg.out / ERRORS_DIR) - read_keys(results_dir) if cfg.mode == RECONSTRUCT else set()
    compact(results_dir, stale)
    have = read_keys(results_dir)
    # an error row whose file has a result row (a batch that ran again and succeeded) is no error
    compact(cfg.out / ERRORS_DIR, lambda k: stale(k) or k in have or (cfg.retry_errors and k[0] in current))
    results, failures = have, read_keys(cfg.out / ERRORS_DIR) - have
    if cfg.mode == RECONSTRUCT:  # the outputs of inputs that failed were never the job's: no row claims them
        compact(cfg.out / OUTPUTS_DIR, lambda k: k in ended_in_errors, dedupe=False)
    remove_temps(cfg.out, cfg.mode, owners)  # what killed runs left half-written
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
            elif (dst.exists() or dst.is_symlink()) and not still_written(dst, written.get(audio_rel(item.rel))):
                # a file put there, or changed since the job wrote it (or one it only planned): the user's
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
        write_shard(cfg.out / ERRORS_DIR, error_table(list_errors))
        for e in list_errors:
            echo(f"error: {e['message']}")
            result.errors.append((e["path"], e["stage"], e["message"]))
        result.failed += len(list_errors)

    if todo and cfg.mode == RECONSTRUCT:  # planned before any is written: a later run finds what a killed one left
        write_shard(cfg.out / OUTPUTS_DIR, outputs_table(todo), shard_name([i.key for i in todo], PLANNED))

    failure: str | None = None
    interrupted, ray_stopped = False, True
    if todo:
        started_ray = not ray.is_initialized()
        try:
            _quiet_ray(cfg.progress)
            start_ray(cfg.ray_address, cfg.workers * cfg.cpus_per_worker + 1)  # + 1: the CPU tasks
            _run_pipeline(cfg, todo, result, echo, stages)
            remove_attempts(cfg.out)
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
    results, failures = done_keys(cfg.out, cfg.mode)
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
            echo(f"{'metric':<16} {'mean':>10} {'median':>10} {'p95':>10} {'files':>6}")
            for name, s in stats.items():
                undefined = f"   ({s['undefined']} undefined: a silent input or output)" if s["undefined"] else ""
                echo(f"{name:<16} {_stat(s['mean'])} {_stat(s['median'])} {_stat(s['p95'])} {s['files']:>6}{undefined}")
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


def _run_pipeline(
    cfg: JobConfig, todo: list[Item], result: JobResult, echo: Callable[[str], None], stages: Stages
) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    rows = [{"path": i.path, "size": i.size, "mtime_ns": i.mtime_ns, "rel": i.rel} for i in todo]
    # small jobs: batches small enough that every worker gets some
    batch = max(1, min(cfg.batch_size, -(-len(rows) // cfg.workers)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch)))
    tries = max_tries(cfg.batch_attempts, batch)
    with warnings.catch_warnings():
        # max_retries, max_restarts and max_task_retries go through `**ray_remote_args`, which Ray
        # deprecates for "the named remote parameters"; Ray up to 2.63 (the `ray` extra's bound) names
        # none for these three, so its warning is silenced here, for these two calls only
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            prepare_batch,
            fn_kwargs={
                "model": cfg.model,
                "max_seconds": cfg.max_seconds,
                "keep_waveform": cfg.mode == EVALUATE,
                "out": cfg.out,
                "batch_attempts": cfg.batch_attempts,
                "read": stages.read,
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
            stages.worker,
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
