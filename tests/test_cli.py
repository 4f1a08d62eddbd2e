"""recon-run as a user runs it: files and folders, outputs, metrics, and every bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from recon_runtime.contract import SCHEMA_VERSION

from .conftest import run_cli, tone


def _wav(path: Path, audio: np.ndarray, rate: int = 16000, subtype: str = "FLOAT") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, subtype=subtype)
    return path


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".part" in p.name]


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    _wav(root / "a.wav", tone(1.0, 16000, 300))
    _wav(root / "sub" / "b.flac", tone(0.5, 44100, 700), 44100, subtype="PCM_16")
    _wav(root / "sub" / "deeper" / "c.wav", np.stack([tone(0.3, 48000), tone(0.3, 48000, 200)], 1), 48000)
    (root / "notes.txt").write_text("not audio, not picked up from a folder")
    return root


def test_reconstruct_folder_mirrors_tree_with_metrics_and_plot(tiny_bundle: Path, inputs: Path, tmp_path: Path) -> None:
    out, metrics, plot = tmp_path / "out", tmp_path / "m.json", tmp_path / "p.png"
    r = run_cli(
        "recon-run",
        "reconstruct",
        str(inputs),
        "-o",
        str(out),
        "--model",
        str(tiny_bundle),
        "--metrics",
        str(metrics),
        "--plot",
        str(plot),
    )
    assert r.returncode == 0, r.stderr
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.wav"))
    assert made == ["a.wav", "sub/b.wav", "sub/deeper/c.wav"]
    for name, seconds in (("a.wav", 1.0), ("sub/b.wav", 0.5), ("sub/deeper/c.wav", 0.3)):
        info = sf.info(str(out / name))
        assert info.samplerate == 16000 and info.frames == round(seconds * 16000) and info.subtype == "FLOAT"
    data = json.loads(metrics.read_text())
    assert len(data["files"]) == 3
    for m in data["files"].values():
        assert {"log_mel_l1", "log_mel_rmse", "mel_correlation", "mrstft", "si_sdr_db"} <= set(m)
        assert all(np.isfinite(v) for k, v in m.items() if k != "output")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reconstruct: 3 ok, 0 failed" in r.stderr
    check_speed(r.stderr, audio_seconds=1.8)


def check_speed(stderr: str, audio_seconds: float) -> None:
    """The summary's speed is audio seconds per wall second ("N.NNx real time"), as its own figures say."""
    m = re.search(r"([\d.]+) s of audio in ([\d.]+) s wall, ([\d.]+)x real time$", stderr.strip().splitlines()[-1])
    assert m, stderr
    audio, wall, speed = map(float, m.groups())
    assert audio == pytest.approx(audio_seconds, abs=0.05)
    low, high = (audio - 0.05) / (wall + 0.05), (audio + 0.05) / max(wall - 0.05, 1e-9)  # figures rounded to 0.1
    assert low - 0.005 <= speed <= high + 0.005, (audio, wall, speed)


def test_metrics_name_the_backend_that_ran(tiny_bundle: Path, inputs: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "m.json"
    args = [str(inputs / "a.wav"), "-o", str(tmp_path / "a.wav"), "--model", str(tiny_bundle), "--metrics"]
    r = run_cli("recon-run", "reconstruct", *args, str(metrics), "--backend", "onnxruntime")
    assert r.returncode == 0, r.stderr
    data = json.loads(metrics.read_text())
    assert (data["backend"], data["provider"], data["precision"]) == ("onnxruntime", "cpu", "fp32")


def test_help_names_both_engines() -> None:
    r = run_cli("recon-run", "--help")
    assert r.returncode == 0 and "ONNX Runtime" in r.stdout and "OpenVINO" in r.stdout, r.stdout
    r = run_cli("recon-run", "reconstruct", "--help")
    assert "auto: openvino for bf16 (only it runs bf16), else onnxruntime" in " ".join(r.stdout.split()), r.stdout


def test_reconstruct_single_file_pcm16_at_output_rate(tiny_bundle: Path, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.wav"
    r = run_cli(
        "recon-run",
        "reconstruct",
        str(inputs / "a.wav"),
        "-o",
        str(out),
        "--model",
        str(tiny_bundle),
        "--format",
        "pcm16",
        "--output-rate",
        "44100",
        "--threads",
        "1",
    )
    assert r.returncode == 0, r.stderr
    info = sf.info(str(out))
    assert info.subtype == "PCM_16" and info.samplerate == 44100 and abs(info.frames - 44100) <= 2
    again = run_cli("recon-run", "reconstruct", str(inputs / "a.wav"), "-o", str(out), "--model", str(tiny_bundle))
    assert again.returncode == 1 and "--force" in again.stderr


def test_encode_decode_round_trip_through_safetensors(tiny_bundle: Path, inputs: Path, tmp_path: Path) -> None:
    """encode writes one .safetensors per clip (no sidecar since the encoded-audio file); decode gives
    the length and level back."""
    from recon_runtime.files.encoded import EncodedAudio

    lat = tmp_path / "lat"
    r = run_cli("recon-run", "encode", str(inputs), "-o", str(lat), "--model", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(lat).as_posix() for p in lat.rglob("*")) == [
        "a.safetensors", "sub", "sub/b.safetensors", "sub/deeper", "sub/deeper/c.safetensors",
    ]  # fmt: skip
    b = EncodedAudio.load(lat / "sub" / "b.safetensors")
    assert b.latents.shape == (1, 8, (1 + 8000 // 160 + 3) // 4, 16)
    assert b.num_samples == 8000 and b.input_sample_rate == 44100 and b.gain[0] > 0
    wav = tmp_path / "wav"
    r = run_cli("recon-run", "decode", str(lat), "-o", str(wav), "--model", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    assert sf.info(str(wav / "sub" / "b.wav")).frames == 8000
    # bare latents (no sidecar) decode to their full length, 640 samples per latent frame
    np.save(tmp_path / "a.npy", EncodedAudio.load(lat / "a.safetensors").latents[0])
    r = run_cli(
        "recon-run", "decode", str(tmp_path / "a.npy"), "-o", str(tmp_path / "a.wav"), "--model", str(tiny_bundle)
    )
    assert r.returncode == 0 and sf.info(str(tmp_path / "a.wav")).frames == np.load(tmp_path / "a.npy").shape[1] * 640


def test_encode_sample_draws_per_file_seeds_as_dataset_encode(tiny_bundle: Path, tmp_path: Path) -> None:
    """--sample --seed S: each file draws with file_seed(S, its absolute path), the rule of dataset
    encode, so two copies of one clip get their own noise and a rerun the same draw."""
    from recon_runtime import Reconstructor
    from recon_runtime.files.encoded import EncodedAudio, file_seed

    audio = tone(1.0, 16000, 300)
    a, b = _wav(tmp_path / "in" / "a.wav", audio), _wav(tmp_path / "in" / "b.wav", audio)
    out = tmp_path / "lat"
    args = ("recon-run", "encode", str(tmp_path / "in"), "-o", str(out), "--model", str(tiny_bundle))
    r = run_cli(*args, "--sample", "--seed", "3")
    assert r.returncode == 0, r.stderr
    la, lb = (EncodedAudio.load(out / f"{n}.safetensors") for n in "ab")
    assert la.seed == file_seed(3, os.path.abspath(a)) and lb.seed == file_seed(3, os.path.abspath(b))
    assert not np.allclose(la.latents, lb.latents)
    rec = Reconstructor.load(tiny_bundle)
    want = rec.encode_features(rec.features(audio, 16000), sample=True, seed=la.seed)
    np.testing.assert_allclose(la.latents[0], want, rtol=1e-5, atol=1e-6)
    r = run_cli(*args, "--sample", "--seed", "3", "--force")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(EncodedAudio.load(out / "a.safetensors").latents, la.latents)


def test_info_human_and_json(tiny_bundle: Path) -> None:
    r = run_cli("recon-run", "info", "--model", str(tiny_bundle), "--verify")
    assert r.returncode == 0, r.stderr
    for text in (
        "encoder.fp32.onnx",
        "rel-L2",
        "scaling factor",
        "ln(max(mel, 1e-05))",
        "inference framing",
        "fp16 check   passed",
    ):
        assert text in r.stdout
    r = run_cli("recon-run", "info", "--model", str(tiny_bundle), "--json")
    assert json.loads(r.stdout)["schema_version"] == SCHEMA_VERSION


def test_silence_and_10ms_clips_work(tiny_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    _wav(src / "silence.wav", np.zeros(16000, np.float32))
    _wav(src / "short.wav", tone(0.01, 16000))
    r = run_cli("recon-run", "reconstruct", str(src), "-o", str(tmp_path / "out"), "--model", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    assert sf.info(str(tmp_path / "out" / "short.wav")).frames == 160
    assert np.isfinite(sf.read(str(tmp_path / "out" / "silence.wav"))[0]).all()


def test_metrics_of_a_silent_or_constant_input_are_null_with_a_reason(tiny_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    _wav(src / "silence.wav", np.zeros(2 * 16000, np.float32))
    _wav(src / "dc.wav", np.full(2 * 16000, 0.25, np.float32))
    _wav(src / "tone.wav", tone(2.0, 16000))
    metrics = tmp_path / "m.json"
    args = [str(src), "-o", str(tmp_path / "out"), "--model", str(tiny_bundle), "--metrics", str(metrics)]
    r = run_cli("recon-run", "reconstruct", *args)
    assert r.returncode == 0, r.stderr
    files = {Path(k).name: v for k, v in json.loads(metrics.read_text())["files"].items()}
    for name in ("silence.wav", "dc.wav"):
        m = files[name]
        assert (m["mel_correlation"], m["mrstft"], m["si_sdr_db"]) == (None, None, None), m
        assert "input is silent" in m["undefined_reason"], m
        assert np.isfinite(m["log_mel_l1"]) and np.isfinite(m["log_mel_rmse"])
    assert "undefined_reason" not in files["tone.wav"]
    assert all(np.isfinite(v) for k, v in files["tone.wav"].items() if k != "output")


# --------------------------------------------------------------------------------------- bad input


def _bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, text the error line must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.wav").write_text("this is not audio\n" * 20)
    _wav(folder / "zero.wav", np.zeros(0, np.float32))
    _wav(folder / "nan.wav", np.array([0.1, np.nan, 0.2] * 100, np.float32))
    return {
        "missing": (folder / "missing.wav", "no such file"),
        "empty": (folder / "empty.wav", "empty file"),
        "not audio": (folder / "text.wav", "not a readable audio file"),
        "zero length": (folder / "zero.wav", "no samples"),
        "nan": (folder / "nan.wav", "NaN"),
    }


def test_bad_inputs_fail_one_line_each_and_good_files_finish(tiny_bundle: Path, tmp_path: Path) -> None:
    bad = _bad_inputs(tmp_path / "bad")
    good = _wav(tmp_path / "good" / "ok.wav", tone(0.5, 16000))
    out = tmp_path / "out"
    args = [str(p) for p, _ in bad.values()] + [str(good)]
    r = run_cli("recon-run", "reconstruct", *args, "-o", str(out), "--model", str(tiny_bundle))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == len(bad)
    for path, text in bad.values():
        assert any(str(path) in ln and text in ln for ln in errors), (path, text, errors)
    assert (out / "ok.wav").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["ok.wav"]  # no partial outputs for the bad ones
    assert f"1 ok, {len(bad)} failed" in r.stderr


def test_each_bad_input_alone_exits_non_zero_without_output(tiny_bundle: Path, tmp_path: Path) -> None:
    for name, (path, text) in _bad_inputs(tmp_path / "bad").items():
        out = tmp_path / f"out-{name.replace(' ', '_')}.wav"
        r = run_cli("recon-run", "reconstruct", str(path), "-o", str(out), "--model", str(tiny_bundle))
        assert r.returncode != 0 and not out.exists(), name
        assert r.stderr.count("error:") == 1 and text in r.stderr and "Traceback" not in r.stderr


def test_unwritable_output(tiny_bundle: Path, tmp_path: Path) -> None:
    src = _wav(tmp_path / "a.wav", tone(0.3, 16000))
    r = run_cli("recon-run", "reconstruct", str(src), "-o", "/sys/recon-test/out.wav", "--model", str(tiny_bundle))
    assert r.returncode == 1 and "/sys/recon-test/out.wav: cannot write output" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreadable_folder_is_reported_and_others_finish(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from recon_runtime.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    good = _wav(tmp_path / "ok.wav", tone(0.3, 16000))
    real_rglob = Path.rglob

    def rglob(self: Path, pattern: str):  # root reads every folder, so the OS refusal is simulated
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_rglob(self, pattern)

    monkeypatch.setattr(Path, "rglob", rglob)
    result = CliRunner().invoke(
        main, ["reconstruct", str(locked), str(good), "-o", str(tmp_path / "out"), "--model", str(tiny_bundle)]
    )
    assert result.exit_code == 1
    assert f"error: {locked}: folder cannot be read (Permission denied)" in result.output
    assert (tmp_path / "out" / "ok.wav").is_file()


def test_latents_of_wrong_shape(tiny_bundle: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "z.npy", np.zeros((8, 5, 15), np.float32))
    out = tmp_path / "z.wav"
    r = run_cli("recon-run", "decode", str(tmp_path / "z.npy"), "-o", str(out), "--model", str(tiny_bundle))
    assert r.returncode == 1 and not out.exists()
    assert f"{tmp_path / 'z.npy'}: latents must be [8, frames, 16]" in r.stderr and "[8, 5, 15]" in r.stderr


def test_latents_from_another_model(tiny_bundle: Path, tmp_path: Path) -> None:
    import dataclasses

    from recon_runtime.files.encoded import EncodedAudio
    from recon_runtime.files.latents import save_latents

    src = _wav(tmp_path / "a.wav", tone(0.5, 16000))
    lat = tmp_path / "a.safetensors"
    assert run_cli("recon-run", "encode", str(src), "-o", str(lat), "--model", str(tiny_bundle)).returncode == 0
    clip = dataclasses.replace(EncodedAudio.load(lat), bundle_fingerprint="0123456789abcdef")
    clip.save(tmp_path / "other.safetensors")
    other = dict(sample_rate=16000, num_samples=8000, input_sample_rate=16000, gain=1.0, sample=False, seed=0)
    save_latents(
        tmp_path / "old.npy", clip.latents[0], src, fingerprint="0123456789abcdef", scaling_factor=1.0, **other
    )
    for name in ("other.safetensors", "old.npy"):  # today's file, and an older encode's .npy + sidecar pair
        r = run_cli(
            "recon-run", "decode", str(tmp_path / name), "-o", str(tmp_path / "dec.wav"), "--model", str(tiny_bundle)
        )
        assert r.returncode == 1 and "latents come from another model" in r.stderr, r.stderr
        assert not (tmp_path / "dec.wav").exists()


def test_bundle_missing_or_tampered(tiny_bundle: Path, tmp_path: Path) -> None:
    src = _wav(tmp_path / "a.wav", tone(0.5, 16000))
    r = run_cli("recon-run", "reconstruct", str(src), "-o", str(tmp_path / "o.wav"), "--model", str(tmp_path / "nope"))
    assert r.returncode == 1 and "no such bundle folder" in r.stderr and "recon-export" in r.stderr
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    with open(bundle / "vocoder.fp32.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    r = run_cli("recon-run", "reconstruct", str(src), "-o", str(tmp_path / "o.wav"), "--model", str(bundle))
    assert r.returncode == 1 and "vocoder.fp32.onnx: sha256" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.wav").exists()


def test_plot_without_matplotlib_is_refused_before_the_model_loads(tiny_bundle: Path, tmp_path: Path) -> None:
    """--plot without matplotlib was found out only after every file was reconstructed."""
    shadow = tmp_path / "no-matplotlib" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}  # as where the `plot` extra is not installed
    src = _wav(tmp_path / "in" / "a.wav", tone(0.3, 16000))
    out, plot = tmp_path / "out", tmp_path / "p.png"
    for model in (tmp_path / "no-bundle", tiny_bundle):  # refused before the model loads (even a missing one)
        r = run_cli(
            "recon-run", "reconstruct", str(src), "-o", str(out), "--plot", str(plot), "--model", str(model), env=env
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {plot}: --plot needs matplotlib"), r.stderr
        assert "`plot` extra" in lines[0], lines
        assert not out.exists() and not plot.exists()
    # --skip-existing that keeps an existing plot draws none: it needs no matplotlib
    plot.write_bytes(b"mine")
    r = run_cli(
        "recon-run", "reconstruct", str(src), "-o", str(out), "--plot", str(plot), "--skip-existing",
        "--model", str(tiny_bundle), "--provider", "cpu", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert plot.read_bytes() == b"mine" and (out / "a.wav").exists()


def test_metrics_and_plot_files_need_force_checked_before_the_model_loads(tiny_bundle: Path, tmp_path: Path) -> None:
    src = _wav(tmp_path / "in" / "a.wav", tone(0.3, 16000))
    metrics, plot = tmp_path / "m.json", tmp_path / "p.png"
    metrics.write_text("mine")
    plot.write_bytes(b"mine")
    for flag, path, keep in (("--metrics", metrics, "add this run's files to it"), ("--plot", plot, "keep it")):
        # the bundle does not exist: the refusal comes before the model loads
        args = [str(src), "-o", str(tmp_path / "out"), flag, str(path), "--model", str(tmp_path / "no-bundle")]
        r = run_cli("recon-run", "reconstruct", *args)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip() == f"error: {path}: exists; pass --force to overwrite it or --skip-existing to {keep}"
    assert metrics.read_text() == "mine" and plot.read_bytes() == b"mine" and not (tmp_path / "out").exists()
    # a metrics file that is not one: --skip-existing cannot add to it
    r = run_cli(
        "recon-run",
        "reconstruct",
        str(src),
        "-o",
        str(tmp_path / "out"),
        "--metrics",
        str(metrics),
        "--skip-existing",
        "--model",
        str(tiny_bundle),
    )
    assert r.returncode == 1 and f"{metrics}: cannot be read as a metrics file" in r.stderr
    assert metrics.read_text() == "mine"
    forced = run_cli(
        "recon-run",
        "reconstruct",
        str(src),
        "-o",
        str(tmp_path / "out"),
        "--metrics",
        str(metrics),
        "--force",
        "--model",
        str(tiny_bundle),
    )
    assert forced.returncode == 0, forced.stderr
    assert list(json.loads(metrics.read_text())["files"]) == [str(src)]


def test_skip_existing_keeps_the_metrics_of_the_files_it_skips(tiny_bundle: Path, tmp_path: Path) -> None:
    root, out, metrics = tmp_path / "in", tmp_path / "out", tmp_path / "m.json"
    a = _wav(root / "a.wav", tone(0.3, 16000))
    common = ["-o", str(out), "--metrics", str(metrics), "--model", str(tiny_bundle)]
    assert run_cli("recon-run", "reconstruct", str(root), *common).returncode == 0
    first = json.loads(metrics.read_text())["files"]
    b = _wav(root / "b.wav", tone(0.4, 16000, 600))
    r = run_cli("recon-run", "reconstruct", str(root), *common, "--skip-existing")
    assert r.returncode == 0 and "1 ok, 0 failed, 1 skipped" in r.stderr, r.stderr
    files = json.loads(metrics.read_text())["files"]
    assert sorted(files) == [str(a), str(b)] and files[str(a)] == first[str(a)]
    # a file done again (its output gone) gets this run's entry, not the earlier one
    (out / "a.wav").unlink()
    _wav(a, tone(0.3, 16000, 900))
    r = run_cli("recon-run", "reconstruct", str(root), *common, "--skip-existing")
    assert r.returncode == 0 and "1 ok, 0 failed, 1 skipped" in r.stderr, r.stderr
    again = json.loads(metrics.read_text())["files"]
    assert again[str(b)] == files[str(b)] and again[str(a)] != first[str(a)]


def test_plot_keeps_only_the_rows_it_draws(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from recon_runtime.cli import main
    from recon_runtime.files import plot as plot_module

    for i in range(plot_module.MAX_ROWS + 3):
        _wav(tmp_path / "in" / f"{i:02d}.wav", tone(0.2, 16000, 200 + 50 * i))
    handed: list[int] = []
    monkeypatch.setattr(plot_module, "plot_mels", lambda rows, path: handed.append(len(rows)))
    args = ["reconstruct", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--plot", str(tmp_path / "p.png")]
    result = CliRunner().invoke(main, [*args, "--model", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    assert handed == [plot_module.MAX_ROWS]  # the mels of the files not drawn were never kept


def test_skip_existing_metrics_name_files_by_resolved_path_and_say_which_have_no_entry(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """A folder run stopped before its metrics file was written, resumed from another folder with other spellings."""
    root, sub = tmp_path / "in", tmp_path / "sub"
    _wav(root / "a.wav", tone(0.3, 16000))
    sub.mkdir()
    model = os.path.relpath(tiny_bundle, tmp_path)
    # the run that was stopped: a's output written, no metrics file yet
    r = run_cli("recon-run", "reconstruct", "in/a.wav", "-o", "out/a.wav", "--model", model, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    b = _wav(root / "b.wav", tone(0.4, 16000, 600))
    args = ["in", "-o", "out", "--metrics", "m.json", "--skip-existing", "--model", model]
    r = run_cli("recon-run", "reconstruct", *args, cwd=tmp_path)
    assert r.returncode == 0 and "1 ok, 0 failed, 1 skipped" in r.stderr, r.stderr
    metrics = tmp_path / "m.json"
    assert "m.json: 1 skipped file(s) have no entry" in r.stderr, r.stderr
    data = json.loads(metrics.read_text())
    assert list(data["files"]) == [str(b.resolve())] and data["bundle"] == str(tiny_bundle.resolve())
    # from another folder: the same bundle, inputs and metrics file under other spellings
    c = _wav(root / "c.wav", tone(0.2, 16000, 800))
    args = ["../in", "-o", "../out", "--metrics", "../m.json", "--skip-existing"]
    r = run_cli("recon-run", "reconstruct", *args, "--model", os.path.relpath(tiny_bundle, sub), cwd=sub)
    assert r.returncode == 0 and "1 ok, 0 failed, 2 skipped" in r.stderr, r.stderr
    assert "../m.json: 1 skipped file(s) have no entry" in r.stderr, r.stderr  # a's, still
    files = json.loads(metrics.read_text())["files"]
    assert (
        sorted(files) == sorted(str(p.resolve()) for p in (b, c))
        and files[str(b.resolve())] == data["files"][str(b.resolve())]
    )
