"""Dataset jobs on Ray Data (local Ray, tiny bundle, short clips): encode, reconstruct, evaluate, resume."""

from __future__ import annotations

import json
import os
import pickle
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

from recon_runtime.audio_io import read_audio  # noqa: E402
from recon_runtime.cli import main  # noqa: E402
from recon_runtime.dataset import JobConfig, read_table, run_job  # noqa: E402
from recon_runtime.options import LoadOptions  # noqa: E402

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
        assert row["source_sample_rate"] == sr and row["num_samples"] == round(audio.shape[0] * 16000 / sr)
        assert row["duration_s"] == pytest.approx(row["num_samples"] / 16000) and row["gain"] > 0
        assert row["bundle_fingerprint"] == rec.contract.fingerprint

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


# a job process that starts and shuts down its own Ray, reads its JobConfig from argv (pickled, hex)
_JOB_SCRIPT = (
    "import pickle, sys; from recon_runtime.dataset import run_job; run_job(pickle.loads(bytes.fromhex(sys.argv[1])))"
)
JOB_START_TIMEOUT_S = 180.0  # a fresh Ray and one worker on a busy 2-core machine
JOB_POLL_S = 0.2


def test_interrupted_job_resumes_without_duplicates_or_gaps(tiny_bundle: Path, tmp_path: Path) -> None:
    """Ctrl-C on a running job (a real process), then the same command: every file once, none missing."""
    root = tmp_path / "in"
    files = _folder(root, 12)
    out = tmp_path / "out"
    # one worker, batches of 2: it stalls before its third batch, 4 files in, so Ctrl-C lands mid-job
    cfg = _job(tiny_bundle, "encode", [root], out, batch_size=2, stall_after=3)
    log = tmp_path / "job.log"
    with open(log, "wb") as sink:  # a file, never a pipe nobody reads while the test polls
        # its own process group, as a terminal's foreground job: Ctrl-C reaches the driver and Ray's processes
        proc = subprocess.Popen(
            [sys.executable, "-c", _JOB_SCRIPT, pickle.dumps(cfg).hex()],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + JOB_START_TIMEOUT_S
        while len(_keys(out, "latents")) < 3:
            assert proc.poll() is None, f"the job ended before it was interrupted:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the job wrote no results in time:\n{log.read_text()[-2000:]}"
            time.sleep(JOB_POLL_S)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(JOB_START_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in log.read_text(), log.read_text()[-2000:]
    first = _keys(out, "latents")
    assert len(first) == 4 and not (out / "summary.json").exists()
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


def test_a_worker_that_dies_is_retried_and_every_file_accounted_for(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    files = _folder(root, 6)
    marker = tmp_path / "crashed"
    out = tmp_path / "out"
    result = run_job(_job(tiny_bundle, "encode", [root], out, batch_size=2, crash_once=(files[3].name, str(marker))))
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
        result = run_job(_job(tiny_bundle, "encode", [root], out, batch_size=2, crash_always=(killer_run.name, "run")))
        assert (result.ok, result.failed) == (5, 1)
        out2 = tmp_path / "out2"
        result2 = run_job(
            _job(tiny_bundle, "encode", [root], out2, batch_size=2, crash_always=(killer_read.name, "read"))
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

    from recon_runtime.dataset import _shard_name, compact, write_shard

    def table(keys):
        return pa.table(
            {
                "path": pa.array([k[0] for k in keys], pa.string()),
                "size": pa.array([k[1] for k in keys], pa.int64()),
                "mtime_ns": pa.array([k[2] for k in keys], pa.int64()),
            }
        )

    # shards {b}, {a, b}, {a} in name order, the last one named as the filtered middle one would be
    a = next(("a", 1, m) for m in range(1000) if _shard_name([("a", 1, m)]) > "part-2")
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
    from recon_runtime.dataset import prepare_batch

    rows = {
        "path": np.asarray([str(f) for f in files], dtype=object),
        "size": np.asarray([f.stat().st_size for f in files], np.int64),
        "mtime_ns": np.asarray([f.stat().st_mtime_ns for f in files], np.int64),
        "rel": np.asarray([f.name for f in files], dtype=object),
    }
    return prepare_batch(rows, _model(bundle), 60.0, **kw)


def test_a_batch_run_again_with_another_outcome_replaces_its_rows(tiny_bundle: Path, tmp_path: Path) -> None:
    from recon_runtime.dataset import Worker

    files = _folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    cfg = _job(tiny_bundle, "encode", [tmp_path / "in"], out)
    worker = Worker(cfg)
    batch = _batch(tiny_bundle, files)
    assert all(w.size == 0 for w in batch["waveform"])  # encode does not ship the waveform
    first = dict(batch, read_error=np.asarray(["", f"{files[1]}: flaky read", ""], dtype=object))
    worker(first)  # the first try: files[1] fails
    worker(batch)  # Ray runs the batch again (its worker died after writing): now all succeed
    assert Counter(_keys(out, "latents")) == Counter(str(f) for f in files)
    assert _keys(out, "errors") == []

    # an error row left for a file that has a result row (e.g. written by an older version) is dropped
    from recon_runtime.dataset import _error_table, write_shard

    st = files[1].stat()
    row = {"path": str(files[1]), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "stage": "read", "message": "x"}
    write_shard(out / "errors", _error_table([row]))
    again = run_job(cfg)
    assert (again.ok, again.failed, again.skipped, again.failed_before, again.errors_outstanding) == (0, 0, 3, 0, 0)
    assert _keys(out, "errors") == []


def test_metrics_summary_counts_each_file_once(tmp_path: Path) -> None:
    import pyarrow as pa

    from recon_runtime.dataset import METRIC_NAMES, metrics_summary, write_shard

    def shard(name: str, value: float) -> None:
        cols = {"path": ["x"], "size": [1], "mtime_ns": [1]} | {m: [value] for m in METRIC_NAMES}
        write_shard(tmp_path / "metrics", pa.table(cols), name)

    shard("part-0.parquet", 1.0)
    shard("part-1.parquet", 1.0)
    cols = {"path": ["y"], "size": [1], "mtime_ns": [1]} | {m: [3.0] for m in METRIC_NAMES}
    write_shard(tmp_path / "metrics", pa.table(cols), "part-2.parquet")
    summary = metrics_summary(tmp_path)
    assert summary["si_sdr_db"]["files"] == 2 and summary["si_sdr_db"]["mean"] == pytest.approx(2.0)


def test_encode_crops_latents_as_encode_features_does(tiny_bundle: Path, tmp_path: Path) -> None:
    import dataclasses

    from recon_runtime import Reconstructor
    from recon_runtime.dataset import Worker

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
    # --no-resume starts over, audio included
    (out / "audio" / "stale.wav").write_bytes(b"old")
    res = cli("reconstruct", str(test), "-o", str(out), "--format", "pcm16", "--no-resume")
    assert res.exit_code == 0 and "1 ok, 0 failed" in res.output, res.output
    assert sorted(p.name for p in (out / "audio").iterdir()) == ["0001.wav"]
    assert sf.info(str(out / "audio" / "0001.wav")).frames == 4000

    # -o naming a file: one line, no traceback
    (tmp_path / "afile").write_text("x")
    res = cli("encode", str(train), "-o", str(tmp_path / "afile"))
    assert (
        res.exit_code == 1
        and res.output.strip()
        == f"error: {tmp_path / 'afile'}: exists and is not a folder; -o/--out names the job's output folder"
    )
