"""Dataset jobs on Ray Data (local Ray, tiny bundle, short clips): encode, reconstruct, evaluate, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ray = pytest.importorskip("ray", reason="dataset jobs need the `ray` extra (pip install -e '.[ray]')")
pq = pytest.importorskip("pyarrow.parquet", reason="dataset jobs need pyarrow (the `ray` extra)")

from click.testing import CliRunner  # noqa: E402

from recon_runtime.channels import encode_audio  # noqa: E402
from recon_runtime.cli import main  # noqa: E402
from recon_runtime.files.audio import read_audio  # noqa: E402
from recon_runtime.files.encoded import FIELDS, EncodedAudio, file_seed  # noqa: E402
from recon_runtime.jobs.config import JobConfig  # noqa: E402
from recon_runtime.jobs.job import run_job  # noqa: E402
from recon_runtime.jobs.shards import read_table  # noqa: E402
from recon_runtime.options import LoadOptions  # noqa: E402

from . import dataset_hooks  # noqa: E402
from .conftest import run_cli, tone  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


def _model(bundle: Path) -> LoadOptions:
    return LoadOptions(bundle, "auto", "cpu", "auto", None, False, None)


def _job(bundle: Path, mode: str, inputs: list[Path | str], out: Path, **kw) -> JobConfig:
    kw.setdefault("progress", False)
    return JobConfig(mode=mode, inputs=tuple(str(i) for i in inputs), out=out, model=_model(bundle), **kw)


def _wav(path: Path, audio: np.ndarray, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, subtype="FLOAT")
    return path


def _folder(root: Path, count: int) -> list[Path]:
    """`count` short generated clips in a small tree, some not at 16 kHz, one stereo."""
    files = []
    for i in range(count):
        rate = (16000, 22050, 44100)[i % 3]
        audio = tone(0.15 + 0.05 * (i % 4), rate, 150 + 40 * i)
        if i == 5:
            audio = np.stack([audio, audio * 0.5], 1)
        files.append(_wav(root / ("sub" if i % 2 else "") / f"clip{i:02d}.wav", audio, rate))
    return files


def _keys(out: Path, folder: str) -> list[str]:
    table = read_table(out / folder, ["path"])
    return [] if table is None else table.column("path").to_pylist()


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))


def test_encode_folder_rows_equal_reconstructor_encode_and_errors_recorded(tiny_bundle: Path, tmp_path: Path) -> None:
    from recon_runtime import Reconstructor

    root = tmp_path / "in"
    good = _folder(root, 18)
    (root / "sub" / "text.wav").write_text("this is not audio\n" * 20)
    _wav(root / "nan.wav", np.array([0.1, np.nan, 0.2] * 200, np.float32))
    out = tmp_path / "out"
    result = run_job(_job(tiny_bundle, "encode", [root], out, workers=2, cpus_per_worker=0.5, batch_size=4))
    assert (result.ok, result.failed, result.skipped) == (18, 2, 0)

    table = read_table(out / "latents")
    assert table.num_rows == 18 and sorted(table.column("path").to_pylist()) == sorted(str(p) for p in good)
    rec = Reconstructor.load(tiny_bundle, provider="cpu")
    for row in table.to_pylist():
        audio, sr = read_audio(Path(row["path"]))
        expected = rec.encode(audio, sr)
        got = np.asarray(row["latents"], np.float32).reshape(row["latent_shape"])
        assert got.shape == expected.shape and _rel_l2(got, expected) <= 1e-6, row["path"]
        st = os.stat(row["path"])
        assert (row["size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        assert row["input_sample_rate"] == sr and row["num_samples"] == round(audio.shape[0] * 16000 / sr)
        assert row["duration_s"] == pytest.approx(row["num_samples"] / 16000) and row["gain"] > 0
        assert row["bundle_fingerprint"] == rec.contract.fingerprint
        # the columns are the encoded-audio fields: a row reads back as the clip `recon-run encode` makes
        clip = EncodedAudio.from_fields(got[None], row)
        want = encode_audio(rec, audio, sr, source=row["path"])
        assert set(FIELDS) <= set(row) and "source_sample_rate" not in row
        assert clip.fields() == {**want.fields(), "gain": [pytest.approx(want.gain[0], rel=1e-12)]}
        assert (row["source"], row["input_channels"], row["sampled"], row["seed"]) == (
            row["path"],
            1 if audio.ndim == 1 else audio.shape[1],
            False,
            None,
        )

    errors = {r["path"]: r for r in read_table(out / "errors").to_pylist()}
    assert set(errors) == {str(root / "sub" / "text.wav"), str(root / "nan.wav")}
    assert all(r["stage"] == "read" for r in errors.values())
    assert "not a readable audio file" in errors[str(root / "sub" / "text.wav")]["message"]
    assert "NaN" in errors[str(root / "nan.wav")]["message"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 18 and summary["failed"] == 2 and summary["audio_hours"] > 0

    # a rerun does nothing and writes nothing
    shards = sorted(p.name for p in out.rglob("*.parquet"))
    again = run_job(_job(tiny_bundle, "encode", [root], out))
    assert (again.ok, again.failed, again.skipped, again.failed_before) == (0, 0, 20, 2)
    assert sorted(p.name for p in out.rglob("*.parquet")) == shards


def test_manifest_inputs_missing_empty_and_too_long(tiny_bundle: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    data = tmp_path / "data"
    a = _wav(data / "a.wav", tone(0.2, 16000))
    b = _wav(data / "deep" / "b.wav", tone(0.3, 22050), 22050)
    long = _wav(data / "long.wav", tone(1.0, 16000))
    (data / "empty.wav").write_bytes(b"")
    (data / "list.csv").write_text("path,label\na.wav,x\ndeep/b.wav,y\nmissing.wav,z\nempty.wav,w\n")
    pq.write_table(pa.table({"path": [str(long)]}), tmp_path / "more.parquet")
    out = tmp_path / "out"
    result = run_job(_job(tiny_bundle, "encode", [data / "list.csv", tmp_path / "more.parquet"], out, max_seconds=0.5))
    assert (result.ok, result.failed) == (2, 3)
    assert sorted(_keys(out, "latents")) == sorted([str(a), str(b)])
    errors = {r["path"]: (r["stage"], r["message"]) for r in read_table(out / "errors").to_pylist()}
    assert errors[str(data / "missing.wav")][0] == "list" and "no such file" in errors[str(data / "missing.wav")][1]
    assert "empty file" in errors[str(data / "empty.wav")][1]
    assert "longer than the limit" in errors[str(long)][1]


# `recon-run dataset ...` (argv[3:]) in a process of its own, with stalling graph workers (dataset_hooks.stalling,
# from the folder argv[1], after argv[2] files): each graph worker stalls once it has taken that many files, so
# the job is still running when a test acts
_CLI_SCRIPT = (
    "import functools, sys; sys.path.insert(0, sys.argv[1]); import dataset_hooks; import recon_runtime.jobs.job as j; "
    "j.run_job = functools.partial(j.run_job, stages=dataset_hooks.stalling(int(sys.argv[2]))); "
    "from recon_runtime.cli import main; main(sys.argv[3:], prog_name='recon-run')"
)
JOB_START_TIMEOUT_S = 180.0  # a fresh Ray and one worker on a busy 2-core machine
JOB_POLL_S = 0.2
# Ctrl-C to exit: ray.shutdown gets SHUTDOWN_TIMEOUT_S (10 s), then Ray's processes are killed and the
# command exits, which takes about 1 s on a quiet machine; the rest is room for a CPU that other jobs share
INTERRUPT_EXIT_BOUND_S = 30.0
GROUP_GONE_BOUND_S = 30.0  # Ray's workers exit once their raylet is gone


def _start_job(bundle: Path, stall_after: int, args: list[str], log: Path) -> subprocess.Popen:
    """The job in its own process group, as a terminal's foreground job: Ctrl-C reaches the driver and Ray's processes."""
    common = ["--model", str(bundle), "--provider", "cpu", "--no-progress"]
    with open(log, "wb") as sink:  # a file, never a pipe nobody reads while the test polls
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CLI_SCRIPT,
                str(Path(__file__).parent),
                str(stall_after),
                "dataset",
                *args,
                *common,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = JOB_START_TIMEOUT_S) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the job ended before {what}:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s:\n{log.read_text()[-2000:]}"
        time.sleep(JOB_POLL_S)


def _group(pgid: int) -> list[tuple[int, str]]:
    """Live (not zombie) processes of a process group, as (pid, command name), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append((int(entry.name), name))
    return found


def _end_group(proc: subprocess.Popen) -> None:
    """Test cleanup: kill whatever is left of the job's process group."""
    if _group(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()


def _wait_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + GROUP_GONE_BOUND_S
    while _group(pgid):
        assert time.monotonic() < deadline, f"still running {GROUP_GONE_BOUND_S:.0f} s after the job: {_group(pgid)}"
        time.sleep(JOB_POLL_S)


def test_interrupted_job_exits_within_a_bound_and_resumes_without_duplicates_or_gaps(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """Ctrl-C on a running job (a real `recon-run dataset encode` process), then the same command.

    Ray's GCS is stopped (SIGSTOP) before Ctrl-C: a GCS that gets no CPU, the worst case of a busy
    machine, where ray.shutdown waited without end (a job did not exit within 180 s of Ctrl-C). The
    test measures the time from SIGINT to exit against a bound instead of racing the machine.
    """
    root = tmp_path / "in"
    files = _folder(root, 12)
    out = tmp_path / "out"
    log = tmp_path / "job.log"
    # one worker, batches of 2: it stalls before its third batch, 4 files in, so Ctrl-C lands mid-job
    proc = _start_job(tiny_bundle, 3, ["encode", str(root), "-o", str(out), "--batch-size", "2"], log)
    try:
        _wait_for("results", lambda: len(_keys(out, "latents")) >= 3, proc, log)
        gcs = [pid for pid, name in _group(proc.pid) if name == "gcs_server"]
        assert len(gcs) == 1, _group(proc.pid)
        os.kill(gcs[0], signal.SIGSTOP)
        interrupted = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(INTERRUPT_EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the job did not exit within {INTERRUPT_EXIT_BOUND_S:.0f} s of Ctrl-C:\n{log.read_text()[-2000:]}"
            )
        took = time.monotonic() - interrupted
        _wait_group_gone(proc.pid)  # Ray's processes too, the stopped GCS included
    finally:
        _end_group(proc)
    text = log.read_text()
    assert proc.returncode == 130 and "Traceback" not in text, text[-2000:]
    assert text.strip().splitlines()[-1] == (
        f"error: dataset encode: interrupted; {out} keeps 4 result(s) and 0 error row(s) of 12 file(s), "
        "8 not done; the same command resumes"
    ), (took, text[-2000:])
    first = _keys(out, "latents")
    assert len(first) == 4 and not (out / "summary.json").exists() and not (out / "job.lock").exists()
    result = run_job(_job(tiny_bundle, "encode", [root], out, batch_size=2))
    assert result.skipped == len(first) and result.ok == 12 - len(first) and result.failed == 0
    keys = _keys(out, "latents")
    assert Counter(keys) == Counter(str(p) for p in files)  # each file once, none missing

    # a file that changed since is done again and its old row goes
    _wav(files[0], tone(0.4, 16000, 900))
    result = run_job(_job(tiny_bundle, "encode", [root], out))
    assert (result.ok, result.skipped) == (1, 11)
    rows = read_table(out / "latents", ["path", "size"]).to_pylist()
    assert Counter(r["path"] for r in rows) == Counter(str(p) for p in files)
    assert next(r["size"] for r in rows if r["path"] == str(files[0])) == files[0].stat().st_size


def test_a_second_job_on_one_folder_is_refused_and_a_killed_jobs_lock_is_taken_over(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """Two real processes on one OUT: the second is refused in one line naming the first."""
    import socket

    root = tmp_path / "in"
    files = _folder(root, 6)
    out = tmp_path / "out"
    log = tmp_path / "job.log"
    lock = out / "job.lock"

    def holder() -> int | None:
        try:
            return json.loads(lock.read_text()).get("pid")
        except (OSError, ValueError):
            return None

    # stall_after=0: the graph worker stalls on its first batch, so this job holds OUT until it is killed
    proc = _start_job(tiny_bundle, 0, ["encode", str(root), "-o", str(out), "--batch-size", "2"], log)
    try:
        # job.json: written once the job holds OUT (and by a job of any version before its pipeline runs)
        _wait_for("job.json", (out / "job.json").is_file, proc, log)
        common = ["--model", str(tiny_bundle), "--provider", "cpu", "--no-progress"]
        second = run_cli("recon-run", "dataset", "encode", str(root), "-o", str(out), "--batch-size", "3", *common)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(
            f"error: {out}: another dataset job runs on this folder (pid {proc.pid} on {socket.gethostname()}, encode "
        ) and line.endswith("; wait for it to end or use another output folder"), line
        assert proc.poll() is None and holder() == proc.pid  # the first job still runs, and holds OUT
        os.killpg(proc.pid, signal.SIGKILL)  # killed: its lock file stays, nobody holds it
        proc.wait()
        _wait_group_gone(proc.pid)
    finally:
        _end_group(proc)
    assert holder() == proc.pid
    lines: list[str] = []
    result = run_job(_job(tiny_bundle, "encode", [root], out, batch_size=2), echo=lines.append)
    assert any(ln.startswith(f"{lock}: taking over the lock of pid {proc.pid} on ") for ln in lines), lines
    assert (result.ok, result.failed) == (6 - result.skipped, 0)
    assert Counter(_keys(out, "latents")) == Counter(str(p) for p in files)  # each file once
    assert not lock.exists()


def test_a_worker_that_dies_is_retried_and_every_file_accounted_for(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    files = _folder(root, 6)
    marker = tmp_path / "crashed"
    out = tmp_path / "out"
    result = run_job(
        _job(tiny_bundle, "encode", [root], out, batch_size=2),
        stages=dataset_hooks.dying_once(files[3].name, str(marker)),
    )
    assert marker.is_file(), "the hook did not kill the worker"
    assert (result.ok, result.failed) == (6, 0)
    assert Counter(_keys(out, "latents")) == Counter(str(p) for p in files)


def test_reconstruct_matches_the_cli_and_evaluate_matches_its_metrics(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    _folder(root, 4)
    cli_out, metrics = tmp_path / "cli", tmp_path / "m.json"
    r = run_cli(
        "recon-run",
        "reconstruct",
        str(root),
        "-o",
        str(cli_out),
        "--model",
        str(tiny_bundle),
        "--metrics",
        str(metrics),
    )
    assert r.returncode == 0, r.stderr

    out = tmp_path / "ray"
    common = ["--model", str(tiny_bundle), "--provider", "cpu", "--no-progress"]
    res = CliRunner().invoke(main, ["dataset", "reconstruct", str(root), "-o", str(out), *common])
    assert res.exit_code == 0, res.output
    assert "dataset reconstruct: 4 ok, 0 failed" in res.output and "audio-s/s" in res.output
    made = sorted(p.relative_to(out / "audio").as_posix() for p in (out / "audio").rglob("*.wav"))
    assert made == sorted(p.relative_to(cli_out).as_posix() for p in cli_out.rglob("*.wav"))
    for name in made:
        ours, rate = sf.read(str(out / "audio" / name), dtype="float32")
        theirs, rate2 = sf.read(str(cli_out / name), dtype="float32")
        assert rate == rate2 and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-5)

    ev = tmp_path / "eval"
    res = CliRunner().invoke(main, ["dataset", "evaluate", str(root), "-o", str(ev), *common])
    assert res.exit_code == 0, res.output
    expected = json.loads(metrics.read_text())["files"]
    rows = read_table(ev / "metrics").to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(expected)
    names = ("log_mel_l1", "log_mel_rmse", "mel_correlation", "mrstft", "si_sdr_db")
    for row in rows:
        for name in names:
            assert row[name] == pytest.approx(expected[row["path"]][name], rel=1e-4, abs=1e-4), (row["path"], name)
    summary = json.loads((ev / "metrics-summary.json").read_text())
    for name in names:
        values = [expected[p][name] for p in expected]
        assert summary[name]["mean"] == pytest.approx(np.mean(values), rel=1e-4, abs=1e-4)
        assert summary[name]["median"] == pytest.approx(np.median(values), rel=1e-4, abs=1e-4)
        assert summary[name]["p95"] == pytest.approx(np.percentile(values, 95), rel=1e-4, abs=1e-4)
        assert name in res.output


def test_resume_options_and_refusals(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    _folder(root, 2)
    (root / "bad.wav").write_text("not audio")
    out = tmp_path / "out"
    assert run_job(_job(tiny_bundle, "encode", [root], out)).failed == 1
    # --retry-errors runs the failed file again; its error row is replaced, not added
    again = run_job(_job(tiny_bundle, "encode", [root], out, retry_errors=True))
    assert (again.ok, again.failed, again.skipped) == (0, 1, 2)
    assert _keys(out, "errors") == [str(root / "bad.wav")]
    # another mode into the same folder is refused; --no-resume starts over
    res = CliRunner().invoke(main, ["dataset", "evaluate", str(root), "-o", str(out), "--model", str(tiny_bundle)])
    assert res.exit_code == 1 and "holds a dataset encode job" in res.output
    fresh = run_job(_job(tiny_bundle, "encode", [root], out, resume=False))
    assert (fresh.ok, fresh.failed, fresh.skipped) == (2, 1, 0)
    assert sorted(_keys(out, "latents")) == sorted(str(p) for p in root.rglob("clip*.wav"))


# ----------------------------------------------------------------------------- review findings


class _Alarm:
    """Fail a test that runs longer than `seconds` instead of hanging the suite."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self) -> None:
        import signal

        def boom(signum, frame):  # noqa: ANN001
            raise TimeoutError(f"still running after {self.seconds} s (a job that never ends)")

        self.old = signal.signal(signal.SIGALRM, boom)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: object) -> None:
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def test_a_file_that_kills_its_worker_every_time_fails_alone_and_the_job_ends(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    root = tmp_path / "in"
    files = _folder(root, 6)
    out = tmp_path / "out"
    killer_run, killer_read = files[3], files[0]
    with _Alarm(240):
        # the graph worker dies on one file, every time; a CPU read task dies on another, every time
        result = run_job(
            _job(tiny_bundle, "encode", [root], out, batch_size=2),
            stages=dataset_hooks.dying_always(killer_run.name, "run"),
        )
        assert (result.ok, result.failed) == (5, 1)
        out2 = tmp_path / "out2"
        result2 = run_job(
            _job(tiny_bundle, "encode", [root], out2, batch_size=2),
            stages=dataset_hooks.dying_always(killer_read.name, "read"),
        )
        assert (result2.ok, result2.failed) == (5, 1)
    for folder, killer, stage in ((out, killer_run, "encode"), (out2, killer_read, "read")):
        errors = read_table(folder / "errors").to_pylist()
        assert [(e["path"], e["stage"]) for e in errors] == [(str(killer), stage)]
        assert "worker process died" in errors[0]["message"]
        # every file ends with exactly one row: a result or an error
        assert Counter(_keys(folder, "latents") + _keys(folder, "errors")) == Counter(str(p) for p in files)
        assert not (folder / "attempts").exists()


def test_compact_never_loses_a_key(tmp_path: Path) -> None:
    import pyarrow as pa

    from recon_runtime.jobs.shards import compact, shard_name, write_shard

    def table(keys):
        return pa.table(
            {
                "path": pa.array([k[0] for k in keys], pa.string()),
                "size": pa.array([k[1] for k in keys], pa.int64()),
                "mtime_ns": pa.array([k[2] for k in keys], pa.int64()),
            }
        )

    # shards {b}, {a, b}, {a} in name order, the last one named as the filtered middle one would be
    a = next(("a", 1, m) for m in range(1000) if shard_name([("a", 1, m)]) > "part-2")
    b = ("b", 1, 0)
    folder = tmp_path / "t"
    folder.mkdir()
    write_shard(folder, table([b]), "part-0.parquet")
    write_shard(folder, table([a, b]), "part-1.parquet")
    write_shard(folder, table([a]))
    compact(folder, lambda k: False)
    assert Counter(_keys(tmp_path, "t")) == Counter(["a", "b"])
    compact(folder, lambda k: k == b)
    assert _keys(tmp_path, "t") == ["a"]


def _batch(bundle: Path, files: list[Path], **kw) -> dict:
    from recon_runtime.jobs.stages import prepare_batch

    rows = {
        "path": np.asarray([str(f) for f in files], dtype=object),
        "size": np.asarray([f.stat().st_size for f in files], np.int64),
        "mtime_ns": np.asarray([f.stat().st_mtime_ns for f in files], np.int64),
        "rel": np.asarray([f.name for f in files], dtype=object),
    }
    return prepare_batch(rows, _model(bundle), 60.0, **kw)


def test_a_batch_run_again_with_another_outcome_replaces_its_rows(tiny_bundle: Path, tmp_path: Path) -> None:
    from recon_runtime.contract import read_contract
    from recon_runtime.jobs.outdir import check_job_record
    from recon_runtime.jobs.stages import Worker

    files = _folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    cfg = _job(tiny_bundle, "encode", [tmp_path / "in"], out)
    out.mkdir()
    check_job_record(cfg, read_contract(tiny_bundle).fingerprint, None)  # a job's folder, as the driver makes it first
    worker = Worker(cfg)
    batch = _batch(tiny_bundle, files)
    assert all(w.size == 0 for w in batch["waveform"])  # encode does not ship the waveform
    first = dict(batch, read_error=np.asarray(["", f"{files[1]}: flaky read", ""], dtype=object))
    worker(first)  # the first try: files[1] fails
    worker(batch)  # Ray runs the batch again (its worker died after writing): now all succeed
    assert Counter(_keys(out, "latents")) == Counter(str(f) for f in files)
    assert _keys(out, "errors") == []

    # an error row left for a file that has a result row (e.g. written by an older version) is dropped
    from recon_runtime.jobs.shards import error_table, write_shard

    st = files[1].stat()
    row = {"path": str(files[1]), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "stage": "read", "message": "x"}
    write_shard(out / "errors", error_table([row]))
    again = run_job(cfg)
    assert (again.ok, again.failed, again.skipped, again.failed_before, again.errors_outstanding) == (0, 0, 3, 0, 0)
    assert _keys(out, "errors") == []


@pytest.mark.parametrize(
    ("audio", "wall", "words"),
    [
        (8.3, 1.3, "8.3 s of audio in 1.3 s wall"),
        (150.0, 59.96, "2.5 min of audio in 1.0 min wall"),
        (9000.0, 3600.0, "2.50 h of audio in 1.00 h wall"),
    ],
)
def test_the_summary_line_says_seconds_minutes_or_hours(audio: float, wall: float, words: str) -> None:
    from recon_runtime.jobs.job import JobResult

    line = JobResult(ok=3, audio_seconds=audio, wall_seconds=wall).line("encode")
    assert words in line, line


def test_metrics_summary_counts_each_file_once(tmp_path: Path) -> None:
    import pyarrow as pa

    from recon_runtime.jobs.config import METRIC_NAMES
    from recon_runtime.jobs.job import metrics_summary
    from recon_runtime.jobs.shards import write_shard

    def shard(name: str, value: float) -> None:
        cols = {"path": ["x"], "size": [1], "mtime_ns": [1]} | {m: [value] for m in METRIC_NAMES}
        write_shard(tmp_path / "metrics", pa.table(cols), name)

    shard("part-0.parquet", 1.0)
    shard("part-1.parquet", 1.0)
    cols = {"path": ["y"], "size": [1], "mtime_ns": [1]} | {m: [3.0] for m in METRIC_NAMES}
    write_shard(tmp_path / "metrics", pa.table(cols), "part-2.parquet")
    summary = metrics_summary(tmp_path)
    assert summary["si_sdr_db"]["files"] == 2 and summary["si_sdr_db"]["mean"] == pytest.approx(2.0)


def test_evaluate_rows_and_summary_leave_undefined_metrics_of_a_silent_input_null(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from recon_runtime.jobs.job import metrics_summary
    from recon_runtime.jobs.stages import Worker

    files = [_wav(tmp_path / "in" / "silence.wav", np.zeros(16000, np.float32))]
    files += [_wav(tmp_path / "in" / f"tone{i}.wav", tone(0.5, 16000, 300 + 100 * i)) for i in range(2)]
    out = tmp_path / "out"
    Worker(_job(tiny_bundle, "evaluate", files, out))(_batch(tiny_bundle, files, keep_waveform=True))
    rows = {Path(r["path"]).name: r for r in read_table(out / "metrics").to_pylist()}
    silent = rows["silence.wav"]
    assert (silent["mel_correlation"], silent["mrstft"], silent["si_sdr_db"]) == (None, None, None), silent
    assert "input is silent" in silent["undefined_reason"] and np.isfinite(silent["log_mel_l1"])
    assert rows["tone0.wav"]["undefined_reason"] is None and np.isfinite(rows["tone0.wav"]["si_sdr_db"])
    summary = metrics_summary(out)
    assert (summary["si_sdr_db"]["files"], summary["si_sdr_db"]["undefined"]) == (2, 1)
    tones = [rows[f"tone{i}.wav"]["si_sdr_db"] for i in range(2)]
    assert summary["si_sdr_db"]["mean"] == pytest.approx(np.mean(tones))
    assert (summary["log_mel_l1"]["files"], summary["log_mel_l1"]["undefined"]) == (3, 0)


def test_encode_crops_latents_as_encode_features_does(tiny_bundle: Path, tmp_path: Path) -> None:
    import dataclasses

    from recon_runtime import Reconstructor
    from recon_runtime.jobs.stages import Worker

    @dataclasses.dataclass(frozen=True)
    class Bucketed(LoadOptions):
        def load(self, stages):  # noqa: ANN001, ANN202
            return Reconstructor.load(self.model, provider="cpu", stages=stages, bucket_frames=64)

    files = [_wav(tmp_path / "in" / "short.wav", tone(0.2, 16000))]
    out = tmp_path / "out"
    model = Bucketed(tiny_bundle, "auto", "cpu", "auto", None, False, None)
    cfg = JobConfig(mode="encode", inputs=(str(files[0]),), out=out, model=model, progress=False)
    Worker(cfg)(_batch(tiny_bundle, files))
    row = read_table(out / "latents").to_pylist()[0]
    audio, sr = read_audio(files[0])
    expected = model.load(("encoder",)).encode(audio, sr)
    assert row["latent_shape"] == list(expected.shape)
    got = np.asarray(row["latents"], np.float32).reshape(row["latent_shape"])
    assert _rel_l2(got, expected) <= 1e-6


def test_output_clashes_outstanding_errors_settings_and_bad_out(tiny_bundle: Path, tmp_path: Path) -> None:
    train, test = tmp_path / "train", tmp_path / "test"
    _wav(train / "0001.wav", tone(0.2, 16000))
    _wav(test / "0001.wav", tone(0.25, 16000, 300))
    common = ["--model", str(tiny_bundle), "--provider", "cpu", "--no-progress"]

    def cli(*args: str):
        return CliRunner().invoke(main, ["dataset", *args, *common])

    # encode and evaluate write no per-file output: the same name in two folders is no clash
    enc = tmp_path / "enc"
    res = cli("encode", str(train), str(test), "-o", str(enc))
    assert res.exit_code == 0 and "2 ok, 0 failed" in res.output, res.output

    out = tmp_path / "rec"
    assert cli("reconstruct", str(train), "-o", str(out)).exit_code == 0
    # a file of the user's where an output would go: an error row naming it, never an overwrite
    _wav(train / "0002.wav", tone(0.2, 16000, 500))
    (out / "audio" / "0002.wav").write_bytes(b"mine")
    res = cli("reconstruct", str(train), "-o", str(out))
    assert res.exit_code == 1 and "0 ok, 1 failed, 1 skipped" in res.output, res.output
    assert f"{out / 'audio' / '0002.wav'} exists and was not written by this job" in res.output
    assert (out / "audio" / "0002.wav").read_bytes() == b"mine"
    (train / "0002.wav").unlink()
    # another input whose output is the audio an earlier run wrote from train/0001.wav: refused
    res = cli("reconstruct", str(test), "-o", str(out))
    assert res.exit_code == 1 and "was written from" in res.output, res.output
    assert sf.info(str(out / "audio" / "0001.wav")).frames == 3200  # train's audio (0.2 s), untouched
    # a rerun with that failure outstanding still fails, and says so
    res = cli("reconstruct", str(test), "-o", str(out))
    assert res.exit_code == 1 and "0 failed, 1 skipped" in res.output and "have errors" in res.output, res.output
    # other output settings than the folder's results: refused in one line naming the difference
    res = cli("reconstruct", str(train), "-o", str(out), "--format", "pcm16")
    assert res.exit_code == 1 and "sample_format 'float32' then, 'pcm16' now" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    # --no-resume starts over: it deletes what the job wrote (its audio too), nothing else
    (out / "audio" / "keep.wav").write_bytes(b"mine")
    (out / "done" / "notes.txt").write_text("mine")
    res = cli("reconstruct", str(test), "-o", str(out), "--format", "pcm16", "--no-resume")
    assert res.exit_code == 0 and "1 ok, 0 failed" in res.output, res.output
    assert f"--no-resume: kept 3 file(s) in {out} that the job did not write" in res.output
    assert sorted(p.name for p in (out / "audio").iterdir()) == ["0001.wav", "0002.wav", "keep.wav"]
    assert sf.info(str(out / "audio" / "0001.wav")).frames == 4000
    assert (out / "audio" / "0002.wav").read_bytes() == (out / "audio" / "keep.wav").read_bytes() == b"mine"
    assert (out / "done" / "notes.txt").read_text() == "mine"
    assert _keys(out, "done") == [str(test / "0001.wav")] and _keys(out, "errors") == []
    # a run killed after writing its audio, before its done/ shard: the rerun writes that audio again
    for shard in (out / "done").glob("part-*.parquet"):
        shard.unlink()
    res = cli("reconstruct", str(test), "-o", str(out), "--format", "pcm16")
    assert res.exit_code == 0 and "1 ok, 0 failed" in res.output, res.output

    # -o naming a file: one line, no traceback
    (tmp_path / "afile").write_text("x")
    res = cli("encode", str(train), "-o", str(tmp_path / "afile"))
    assert (
        res.exit_code == 1
        and res.output.strip()
        == f"error: {tmp_path / 'afile'}: exists and is not a folder; -o/--out names the job's output folder"
    )


def test_a_job_records_its_windows_and_an_earlier_jobs_record_means_the_defaults(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """--window-frames/--overlap-frames change the results: a resume with others is refused. A job of
    a version that recorded no windows (none could be chosen then) ran at the defaults."""
    import dataclasses

    from recon_runtime.contract import read_contract
    from recon_runtime.errors import OutputError
    from recon_runtime.jobs.outdir import JOB_FORMAT_VERSION, check_job_record

    fingerprint = read_contract(tiny_bundle).fingerprint
    cfg = _job(tiny_bundle, "encode", [tmp_path], tmp_path / "out")
    assert {cfg.settings()[k] for k in ("window_frames", "overlap_frames")} == {1024, 64}
    earlier = {k: v for k, v in cfg.settings().items() if k not in ("window_frames", "overlap_frames")}
    record = {
        "mode": "encode",
        "format_version": JOB_FORMAT_VERSION,
        "bundle_fingerprint": fingerprint,
        "settings": earlier,
    }
    check_job_record(cfg, fingerprint, record)  # the defaults resume an earlier job
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, window_frames=512))
    with pytest.raises(OutputError, match="window_frames 1024 then, 512 now"):
        check_job_record(wider, fingerprint, record)
    # a job of a version before the input-sized plan ran long inputs otherwise: its resume is refused
    older = {k: v for k, v in earlier.items() if k != "long_audio_plan"}
    with pytest.raises(OutputError, match="long_audio_plan 'full windows, each vocoded, waveforms cross-faded' then"):
        check_job_record(cfg, fingerprint, {**record, "settings": older})


def test_a_folder_that_holds_no_job_is_refused_and_left_as_it_is(tiny_bundle: Path, tmp_path: Path) -> None:
    src = _wav(tmp_path / "in" / "a.wav", tone(0.2, 16000))
    out = tmp_path / "mine"
    (out / "audio").mkdir(parents=True)
    (out / "latents").mkdir()
    (out / "audio" / "keep.wav").write_bytes(b"mine")
    (out / "latents" / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    common = ["--model", str(tiny_bundle), "--provider", "cpu", "--no-progress"]
    for mode, flags in (("encode", ["--no-resume"]), ("reconstruct", ["--no-resume"]), ("evaluate", [])):
        r = run_cli("recon-run", "dataset", mode, str(src), "-o", str(out), *flags, *common)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip() == (
            f"error: {out}: folder exists and is not empty (it holds audio and no dataset job); choose another -o/--out"
        )
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # nothing added, nothing gone
    assert (out / "audio" / "keep.wav").read_bytes() == b"mine" and (
        out / "latents" / "notes.txt"
    ).read_text() == "mine"


# ----------------------------------------------------------------------------- whose folder, whose files

COMMON = ("--provider", "cpu", "--no-progress")


def _job_record(mode: str, fingerprint: str = "0123456789abcdef") -> str:
    """A job.json as a job writes it (a test of what a job does with its own folder needs no Ray run)."""
    from recon_runtime.jobs.outdir import JOB_FORMAT_VERSION

    record = {"format": "recon-run dataset job", "format_version": JOB_FORMAT_VERSION, "mode": mode}
    return json.dumps({**record, "bundle_fingerprint": fingerprint, "settings": {}})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_job_json_or_job_lock_no_job_wrote_makes_the_folder_the_users(tiny_bundle: Path, tmp_path: Path) -> None:
    """A user's job.json (any content) and job.lock are never read as a job's: --no-resume deletes nothing."""
    src = _wav(tmp_path / "in" / "a.wav", tone(0.2, 16000))
    cases = {
        "named": ({"job.json": b'{"name": "my job"}\n', "summary.json": b'{"mine": 1}\n', "notes.txt": b"mine"}, ""),
        "a list": ({"job.json": b"[1, 2]\n", "summary.json": b"{}"}, "a JSON list, not a job record"),
        "no marker": ({"job.json": _job_record("encode").replace('"format"', '"fmt"').encode()}, 'no "format"'),
        "before format 1": (
            {"job.json": b'{"mode": "encode", "bundle_fingerprint": "0123456789abcdef", "settings": {}}'},
            "a job of a recon-run before job format 1 is not resumed either",
        ),
        "not JSON": ({"job.json": b"\xff\xfe not json"}, "not JSON"),
        "a bad mode": ({"job.json": _job_record("train").encode()}, "are not a job's"),
    }
    for name, (files, why) in cases.items():
        out = tmp_path / name
        out.mkdir()
        for rel, data in files.items():
            (out / rel).write_bytes(data)
        before = _snapshot(out)
        r = run_cli(
            "recon-run",
            "dataset",
            "encode",
            str(src),
            "-o",
            str(out),
            "--no-resume",
            "--model",
            str(tiny_bundle),
            *COMMON,
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith(f"error: {out}: holds a job.json that no dataset job wrote (") and why in line, line
        assert line.endswith("; choose another -o/--out") and "--no-resume" not in line, line
        assert _snapshot(out) == before, name  # byte-identical, nothing added

    # a job.lock that is not a lock record: in an otherwise empty folder, and in a job's folder
    for name, job in (("lock only", None), ("job and lock", _job_record("encode"))):
        out = tmp_path / name
        out.mkdir()
        (out / "job.lock").write_text("my notes on locks\n")
        if job:
            (out / "job.json").write_text(job)
        before = _snapshot(out)
        res = CliRunner().invoke(
            main, ["dataset", "encode", str(src), "-o", str(out), "--no-resume", "--model", str(tiny_bundle), *COMMON]
        )
        assert res.exit_code == 1 and res.output.strip() == (
            f"error: {out}: holds a job.lock that no dataset job wrote (not a lock record); choose another -o/--out"
        ), res.output
        assert _snapshot(out) == before, name


def test_no_resume_never_deletes_a_job_of_another_mode(tiny_bundle: Path, tmp_path: Path) -> None:
    src = _wav(tmp_path / "in" / "a.wav", tone(0.2, 16000))
    out = tmp_path / "enc"
    (out / "latents").mkdir(parents=True)
    (out / "job.json").write_text(_job_record("encode"))
    (out / "latents" / "part-0123456789abcdef0123.parquet").write_bytes(b"the encode job's rows")
    before = _snapshot(out)
    for flags in (["--no-resume"], []):
        res = CliRunner().invoke(
            main, ["dataset", "reconstruct", str(src), "-o", str(out), *flags, "--model", str(tiny_bundle), *COMMON]
        )
        assert res.exit_code == 1 and res.output.strip() == (
            f"error: {out}: holds a dataset encode job; use another output folder"
        ), res.output
        assert _snapshot(out) == before


def test_an_interrupted_no_resume_is_finished_by_the_next_run(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while --no-resume deletes (after the audio, before done/): a plain rerun must not skip files whose audio is gone."""
    from recon_runtime.jobs.job import JobInterrupted

    root = tmp_path / "in"
    files = [_wav(root / f"c{i}.wav", tone(0.2, 16000, 300 + 100 * i)) for i in range(3)]
    out = tmp_path / "out"
    assert run_job(_job(tiny_bundle, "reconstruct", [root], out)).ok == 3
    assert sorted(_keys(out, "done")) == sorted(map(str, files))
    # a worker killed while it wrote: its temporary file is the job's, not the user's
    temp = out / "audio" / ".c0.wav.0123456789ab.part.wav"
    temp.write_bytes(b"half a wav")

    real_unlink = Path.unlink

    def interrupt_in_done(self: Path, missing_ok: bool = False) -> None:
        if self.parent.name == "done":
            raise KeyboardInterrupt
        real_unlink(self, missing_ok=missing_ok)

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", interrupt_in_done)
        with pytest.raises(JobInterrupted, match="interrupted; .* the same command resumes"):
            run_job(_job(tiny_bundle, "reconstruct", [root], out, resume=False))
    assert json.loads((out / "job.json").read_text())["resetting"] is True
    lines: list[str] = []
    result = run_job(_job(tiny_bundle, "reconstruct", [root], out), echo=lines.append)  # a plain rerun
    assert (result.ok, result.skipped, result.failed) == (3, 0, 0), lines
    assert any("finishing the --no-resume that an earlier run began" in ln for ln in lines), lines
    assert not any("kept" in ln for ln in lines), lines  # the temporary file was the job's
    assert sorted(p.name for p in (out / "audio").iterdir()) == ["c0.wav", "c1.wav", "c2.wav"]
    assert "resetting" not in json.loads((out / "job.json").read_text())


def test_ctrl_c_before_ray_starts_exits_130_with_one_line(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recon_runtime.files import audio as audio_io

    src = _wav(tmp_path / "in" / "a.wav", tone(0.2, 16000))
    out = tmp_path / "out"

    def ctrl_c(*args, **kwargs):  # noqa: ANN002, ANN003 - Ctrl-C while the inputs are listed
        raise KeyboardInterrupt

    monkeypatch.setattr(audio_io, "discover", ctrl_c)
    res = CliRunner().invoke(
        main, ["dataset", "encode", str(src.parent), "-o", str(out), "--model", str(tiny_bundle), *COMMON]
    )
    assert res.exit_code == 130, res.output
    assert res.output.strip() == (
        f"error: dataset encode: interrupted; {out} keeps what was written so far; the same command resumes"
    )
    assert not (out / "job.lock").exists()


def test_out_inside_an_input_folder_is_never_read_as_input(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "inp"
    _wav(root / "a.wav", tone(0.2, 16000))
    out = root / "out"
    args = ["dataset", "reconstruct", str(root), "-o", str(out), "--model", str(tiny_bundle), *COMMON]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and "1 ok, 0 failed, 0 skipped" in first.output, first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "0 ok, 0 failed, 1 skipped" in again.output, again.output
    assert f"{out}: left out 1 input file(s) inside the job's own output folder" in again.output
    assert [p.relative_to(out / "audio").as_posix() for p in (out / "audio").rglob("*.wav")] == ["a.wav"]


def test_a_job_rerun_with_another_spelling_of_out_finds_its_own_outputs(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`-o rj`, then `-o ../rj` from a subfolder: the same folder, the same records."""
    root = tmp_path / "in"
    files = [_wav(root / f"c{i}.wav", tone(0.2, 16000, 300 + 100 * i)) for i in range(2)]
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run_job(_job(tiny_bundle, "reconstruct", [root], Path("rj"))).ok == 2
    monkeypatch.chdir(tmp_path / "sub")
    lines: list[str] = []
    result = run_job(_job(tiny_bundle, "reconstruct", [root], Path("../rj"), resume=False), echo=lines.append)
    assert (result.ok, result.failed) == (2, 0), lines
    assert not any("kept" in ln for ln in lines), lines
    again = run_job(_job(tiny_bundle, "reconstruct", [root], Path("../rj")))
    assert (again.ok, again.failed, again.skipped) == (0, 0, 2)
    assert sorted(_keys(tmp_path / "rj", "done")) == sorted(map(str, files))
    # recorded relative to OUT: a record names its file however -o spells OUT
    outputs = read_table(tmp_path / "rj" / "done", ["output"]).column("output").to_pylist()
    assert sorted(outputs) == ["audio/c0.wav", "audio/c1.wav"]
    # an output the user replaced since the job wrote it is the user's: --no-resume keeps it
    mine = tmp_path / "rj" / "audio" / "c1.wav"
    mine.write_bytes(b"mine")
    lines.clear()
    result = run_job(_job(tiny_bundle, "reconstruct", [root], Path("../rj"), resume=False), echo=lines.append)
    assert (result.ok, result.failed) == (1, 1) and mine.read_bytes() == b"mine", lines
    assert any(ln.startswith(f"--no-resume: kept 1 file(s) in {tmp_path / 'rj'}") for ln in lines), lines
    assert any(f"{mine} exists and was not written by this job" in ln for ln in lines), lines


def _reconstruct_cli(bundle: Path, root: Path, out: Path, *flags: str):
    return CliRunner().invoke(
        main, ["dataset", "reconstruct", str(root), "-o", str(out), "--model", str(bundle), *COMMON, *flags]
    )


def _good_and_bad(root: Path) -> tuple[Path, Path, bytes]:
    """good.wav, and bad.wav: a WAV of the same length whose header is no audio header (its own bytes returned)."""
    good = _wav(root / "good.wav", tone(0.2, 16000))
    fixed = _wav(root / "bad.wav", tone(0.3, 16000, 500)).read_bytes()
    (root / "bad.wav").write_bytes(b"JUNK" + fixed[4:])
    return good, root / "bad.wav", fixed


def test_no_resume_keeps_a_users_file_where_a_failed_input_would_have_written(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """OUT/outputs recorded every planned output before anything ran, failed inputs too, and --no-resume
    took such a record for the job's file: a user's file put there since was deleted without a word."""
    root, out = tmp_path / "in", tmp_path / "out"
    _good_and_bad(root)
    first = _reconstruct_cli(tiny_bundle, root, out)
    assert "1 ok, 1 failed" in first.output, first.output
    mine = out / "audio" / "bad.wav"
    mine.write_bytes(b"mine\n")
    res = _reconstruct_cli(tiny_bundle, root, out, "--no-resume")
    assert mine.read_bytes() == b"mine\n", res.output
    assert f"--no-resume: kept 1 file(s) in {out} that the job did not write, e.g. {mine}" in res.output, res.output
    assert f"its output {mine} exists and was not written by this job" in res.output, res.output
    assert "1 ok, 1 failed" in res.output and (out / "audio" / "good.wav").is_file(), res.output


def test_a_resume_never_overwrites_a_users_file_at_the_output_of_a_fixed_input(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """The input that failed is fixed (another size and mtime) and the job resumed: its planned output,
    now a file of the user's, was silently overwritten. The job's own output of an input that changed
    is still replaced."""
    root, out = tmp_path / "in", tmp_path / "out"
    good, bad, _ = _good_and_bad(root)
    first = _reconstruct_cli(tiny_bundle, root, out)
    assert "1 ok, 1 failed" in first.output, first.output
    mine = out / "audio" / "bad.wav"
    mine.write_bytes(b"mine\n")
    _wav(bad, tone(0.4, 16000, 600))  # fixed: valid audio now
    _wav(good, tone(0.25, 16000, 350))  # changed: done again, its audio (the job's) replaced
    res = _reconstruct_cli(tiny_bundle, root, out)
    assert mine.read_bytes() == b"mine\n", res.output
    assert f"its output {mine} exists and was not written by this job" in res.output, res.output
    assert res.exit_code == 1 and "1 ok, 1 failed, 0 skipped" in res.output, res.output
    assert sf.info(str(out / "audio" / "good.wav")).frames == 4000  # 0.25 s: the new good.wav's
    # the outputs of inputs that ended in errors/ are nobody's: no row of OUT/outputs names them
    assert set(_keys(out, "outputs")) == {str(good)}, _keys(out, "outputs")


def test_retry_errors_never_overwrites_a_users_file_at_the_output_of_a_failed_input(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """--retry-errors plans as a resume does: the input that failed, now readable under the same key
    (size and mtime), must not replace the user's file at its output."""
    root, out = tmp_path / "in", tmp_path / "out"
    _, bad, fixed = _good_and_bad(root)
    first = _reconstruct_cli(tiny_bundle, root, out)
    assert "1 ok, 1 failed" in first.output, first.output
    mine = out / "audio" / "bad.wav"
    mine.write_bytes(b"mine\n")
    st = bad.stat()
    bad.write_bytes(fixed)  # its header repaired: the same size, and its mtime set back
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = _reconstruct_cli(tiny_bundle, root, out)
    assert "0 ok, 0 failed, 2 skipped" in res.output, res.output  # the same key: its error stands
    res = _reconstruct_cli(tiny_bundle, root, out, "--retry-errors")
    assert mine.read_bytes() == b"mine\n", res.output
    assert f"its output {mine} exists and was not written by this job" in res.output, res.output
    mine.unlink()  # moved away: the retry writes it
    res = _reconstruct_cli(tiny_bundle, root, out, "--retry-errors")
    assert res.exit_code == 0 and "1 ok, 0 failed, 1 skipped" in res.output, res.output
    assert sf.info(str(mine)).frames == 4800


def test_stop_ray_kills_the_processes_of_its_first_look(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the timeout, a second look only adds processes; a pid it finds again keeps the first look's object."""
    import threading

    from recon_runtime.jobs import job as dataset

    killed: list[str] = []

    class Proc:
        def __init__(self, tag: str):
            self.tag = tag

        def kill(self) -> None:
            killed.append(self.tag)

    looks = iter([{1: Proc("first 1"), 2: Proc("first 2")}, {1: Proc("second 1"), 3: Proc("second 3")}])
    release = threading.Event()
    monkeypatch.setattr(dataset, "_local_ray_processes", lambda: next(looks))
    monkeypatch.setattr(ray, "shutdown", lambda: release.wait(60))
    try:
        assert dataset.stop_ray(timeout=0.1) is False
    finally:
        release.set()
    assert sorted(killed) == ["first 1", "first 2", "second 3"]


def test_ray_processes_whose_popen_was_reaped_are_never_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from ray._private import worker as ray_worker

    from recon_runtime.jobs import job as dataset

    reaped = subprocess.Popen(["true"])
    reaped.wait()
    reaped.pid = os.getpid()  # its pid given to another process since (here: this one)
    live = subprocess.Popen(["sleep", "60"])
    try:
        node = SimpleNamespace(
            all_processes={"a": [SimpleNamespace(process=reaped)], "b": [SimpleNamespace(process=live)]}
        )
        monkeypatch.setattr(ray_worker, "_global_node", node)
        assert sorted(dataset._local_ray_processes()) == [live.pid]
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------- the encoded-audio fields
def test_dataset_encode_sample_seeds_each_file_from_the_seed_and_its_path(tiny_bundle: Path, tmp_path: Path) -> None:
    """`dataset encode --sample --seed S`: a draw per file, seeded by `file_seed(S, path)` (recorded in
    its row), equal to `recon-run encode --sample --seed` of that seed; another seed is another job."""
    from recon_runtime import Reconstructor

    root = tmp_path / "in"
    files = [_wav(root / f"c{i}.wav", tone(0.3, 16000, 300.0)) for i in range(3)]  # one length: one noise shape
    out = tmp_path / "out"
    common = ["--model", str(tiny_bundle), *COMMON]
    res = CliRunner().invoke(main, ["dataset", "encode", str(root), "-o", str(out), "--sample", "--seed", "7", *common])
    assert res.exit_code == 0, res.output
    rows = {r["path"]: r for r in read_table(out / "latents").to_pylist()}
    assert sorted(rows) == sorted(map(str, files))
    rec = Reconstructor.load(tiny_bundle, provider="cpu")
    mean = rec.encode(*read_audio(files[0]))
    for path, row in rows.items():
        assert row["sampled"] is True and row["seed"] == file_seed(7, path)
        got = np.asarray(row["latents"], np.float32).reshape(row["latent_shape"])
        want = rec.encode(*read_audio(Path(path)), sample=True, seed=row["seed"])
        assert _rel_l2(got, want) <= 1e-6 and _rel_l2(got, mean) > 1e-3, path  # a draw, not the mean
    assert len({r["seed"] for r in rows.values()}) == 3  # equal files, each its own noise
    draws = [np.asarray(r["latents"]) for r in rows.values()]
    assert not np.allclose(draws[0], draws[1])
    res = CliRunner().invoke(main, ["dataset", "encode", str(root), "-o", str(out), "--sample", "--seed", "8", *common])
    assert res.exit_code == 1 and "seed 7 then, 8 now" in res.output and "--no-resume" in res.output, res.output


def test_a_job_written_before_the_field_names_is_refused_in_one_line_and_no_resume_starts_it_over(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    root = tmp_path / "in"
    _folder(root, 2)
    out = tmp_path / "out"
    assert run_job(_job(tiny_bundle, "encode", [root], out)).ok == 2
    job = json.loads((out / "job.json").read_text())
    (out / "job.json").write_text(json.dumps({**job, "format_version": 1}))  # as an earlier recon-run wrote it
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    common = ["--model", str(tiny_bundle), *COMMON]
    res = CliRunner().invoke(main, ["dataset", "encode", str(root), "-o", str(out), *common])
    assert res.exit_code == 1 and res.output.strip() == (
        f"error: {out}: holds a dataset encode job of an earlier recon-run (job format 1), whose rows name their "
        "columns otherwise; --no-resume starts it over (deleting only what the job wrote), or use another output "
        "folder"
    ), res.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    res = CliRunner().invoke(main, ["dataset", "encode", str(root), "-o", str(out), "--no-resume", *common])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "job.json").read_text())["format_version"] == job["format_version"] == 2
    assert read_table(out / "latents").num_rows == 2 and "input_sample_rate" in read_table(out / "latents").schema.names


def test_dataset_jobs_take_the_model_options_of_the_file_commands() -> None:
    import dataclasses

    from recon_runtime.cli import dataset, files

    def options(command: object) -> dict[str, tuple]:
        return {p.name: (p.opts, p.default, getattr(p.type, "choices", None)) for p in command.params}

    model = {f.name for f in dataclasses.fields(LoadOptions)}
    for file_command, job in ((files.encode, dataset.encode), (files.reconstruct, dataset.reconstruct)):
        theirs, ours = options(file_command), options(job)
        assert model <= set(ours) and {n: ours[n] for n in model} == {n: theirs[n] for n in model}
    assert {"sample", "seed"} <= set(options(dataset.encode))


# ----------------------------------------------------------------------------- what a job prints

# Ray's lines that no setting silences without hiding real errors too, by a fragment of each, with the reason
RAY_LINES_KEPT = {
    "has constructor arguments in the object store and max_restarts > 0": (
        "Ray Data hands every actor of a pool its own object-store references (its DataContext and the map "
        "function) and restarts the actors without limit (its default, and the job's: a file that kills a "
        "graph worker restarts it); Ray's C++ core then logs this at error level on the driver's stderr "
        "(ray-project/ray#53727), and its one switch, RAY_BACKEND_LOG_LEVEL, would drop every C++ error with it"
    ),
}


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture exported from random weights, as `recon-export --random-weights` writes it."""
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import build_random

    out = tmp_path_factory.mktemp("random") / "tiny-random"
    export_bundle(build_random("tiny", 3), out, precisions=("fp32",))
    return out


@pytest.mark.parametrize("progress", [["--no-progress"], []], ids=["no-progress", "stdout-not-a-terminal"])
def test_a_job_prints_only_its_own_lines(random_bundle: Path, tmp_path: Path, progress: list[str]) -> None:
    """No Ray INFO, no progress lines where stdout is no terminal, no deprecation or token notices, and
    the bundle's random-weights warning once (not once per read task and graph worker, with Ray's dedup notice)."""
    root = tmp_path / "in"
    for i in range(4):
        _wav(root / f"clip{i}.wav", tone(0.3, 16000, 200 + 50 * i))
    (root / "bad.wav").write_text("not audio\n")
    out = tmp_path / "out"
    args = ["--model", str(random_bundle), "--provider", "cpu", "--workers", "2", "--batch-size", "1", *progress]
    r = run_cli("recon-run", "dataset", "encode", str(root), "-o", str(out), *args)
    assert r.returncode == 1, r.stderr  # the bad file
    assert r.stdout == ""
    ours = [ln for ln in r.stderr.splitlines() if not any(k in ln for k in RAY_LINES_KEPT)]
    assert len(ours) == 3, r.stderr
    assert ours[0] == f"{random_bundle} holds RANDOM weights: output is not meaningful audio", r.stderr
    assert ours[1].startswith(f"error: {root / 'bad.wav'}: not a readable audio file"), r.stderr
    assert ours[2].startswith("dataset encode: 4 ok, 1 failed, 0 skipped") and " s of audio in " in ours[2], r.stderr
