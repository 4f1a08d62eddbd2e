"""The file commands as a user of DAC, EnCodec or piper expects them, through the real CLI in a subprocess:
output names and formats, pipes, channels, the encoded-audio file and bare pipeline latents,
--version, where the bundle is found, --device, the windowing options, and what a new user ran into
(unwritable outputs found late, Ctrl-C, errno texts, metrics paths, a dB mel given to vocode)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from recon_runtime.contract import read_contract
from recon_runtime.files.encoded import EncodedAudio

from .conftest import run_cli, tone
from .test_encoded import rewrite


def _wav(path: Path, audio: np.ndarray, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, subtype="FLOAT", format="WAV")
    return path


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def _run(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """recon-run with bytes on stdin and stdout kept as bytes (run_cli speaks text)."""
    exe = Path(sys.executable).with_name("recon-run")
    return subprocess.run([str(exe), *args], input=stdin, capture_output=True, env=env, timeout=600)


def _env(**changes: str) -> dict[str, str]:
    """The environment without any RECON_MODEL of the caller's, with `changes`."""
    env = {k: v for k, v in os.environ.items() if k != "RECON_MODEL"}
    return {**env, **changes}


@pytest.fixture()
def clip(tmp_path: Path) -> Path:
    return _wav(tmp_path / "in" / "a.wav", tone(1.3, 16000, 330))


# ---------------------------------------------------------------------- pipes
def test_a_pipe_in_and_out_gives_what_the_file_path_gives(tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    model = ["--model", str(tiny_bundle)]
    by_path = tmp_path / "by-path.wav"
    assert run_cli("recon-run", "reconstruct", str(clip), "-o", str(by_path), *model).returncode == 0
    piped = _run("reconstruct", "-", "-o", "-", *model, stdin=clip.read_bytes())
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout[:4] == b"RIFF" and b"reconstruct: 1 ok" in piped.stderr  # summary on stderr only
    from_pipe, rate = sf.read(io.BytesIO(piped.stdout), dtype="float32")
    expected, _ = sf.read(str(by_path), dtype="float32")
    assert rate == 16000 and np.array_equal(from_pipe, expected)
    raw = _run("reconstruct", "-", "-o", "-", "--output-raw", *model, stdin=clip.read_bytes())
    assert raw.returncode == 0, raw.stderr
    assert np.array_equal(np.frombuffer(raw.stdout, "<f4"), expected)
    # a file in, stdout out; and stdin to a named file
    from_file = _run("reconstruct", str(clip), "-o", "-", *model).stdout  # a float WAV's PEAK chunk has a timestamp
    assert np.array_equal(sf.read(io.BytesIO(from_file), dtype="float32")[0], expected)
    named = tmp_path / "named.flac"
    assert _run("reconstruct", "-", "-o", str(named), *model, stdin=clip.read_bytes()).returncode == 0
    assert sf.info(str(named)).format == "FLAC"


def test_pipes_refuse_what_they_cannot_do_in_one_line(tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    model = ["--model", str(tiny_bundle)]
    cases = [
        (["reconstruct", "-", str(clip), "-o", str(tmp_path / "o")], "- (stdin) must be the only input"),
        (["reconstruct", "-", "-o", str(tmp_path / "o") + "/"], "- (stdin) has no file name to put in a folder"),
        (["reconstruct", str(clip), str(clip), "-o", "-"], "-o - (stdout) takes exactly one input file"),
        (["reconstruct", str(clip), "-o", str(tmp_path / "x.wav"), "--output-raw"], "goes to stdout only"),
        (["reconstruct", "-", "-o", "-"], "stdin was empty"),
        (["reconstruct", "-", "-o", "-", "--server", "http://127.0.0.1:9"], "runs locally only"),
    ]
    for args, text in cases:
        r = _run(*args, *model)
        err = r.stderr.decode()
        assert r.returncode != 0 and text in err and "Traceback" not in err, (args, err)
        assert r.stdout == b"", args
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.wav").exists()


# ---------------------------------------------------------------------- output names and formats
def test_an_output_file_takes_its_extensions_format(tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    model = ["--model", str(tiny_bundle)]
    for name, fmt, subtype in (("o.wav", "WAV", "FLOAT"), ("o.flac", "FLAC", "PCM_24"), ("o.ogg", "OGG", "VORBIS")):
        out = tmp_path / name
        r = run_cli("recon-run", "reconstruct", str(clip), "-o", str(out), *model)
        assert r.returncode == 0, r.stderr
        info = sf.info(str(out))
        assert out.is_file() and (info.format, info.subtype) == (fmt, subtype), (name, info)
    r = run_cli("recon-run", "reconstruct", str(clip), "-o", str(tmp_path / "p.flac"), "--format", "pcm16", *model)
    assert r.returncode == 0 and sf.info(str(tmp_path / "p.flac")).subtype == "PCM_16", r.stderr
    wav, _ = sf.read(str(tmp_path / "o.wav"), dtype="float32")
    flac, _ = sf.read(str(tmp_path / "o.flac"), dtype="float32")
    np.testing.assert_allclose(flac, wav, atol=2**-22)  # 24 bits of the same samples


def test_folders_take_format_and_unknown_names_are_refused(tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    model = ["--model", str(tiny_bundle)]
    other = _wav(tmp_path / "in" / "sub" / "b.wav", tone(0.4, 16000, 600))
    out = tmp_path / "out"
    r = run_cli("recon-run", "reconstruct", str(tmp_path / "in"), "-o", str(out), "--format", "flac", *model)
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")) == ["a.flac", "sub/b.flac"]
    assert sf.info(str(out / "sub" / "b.flac")).frames == sf.info(str(other)).frames
    # one input into a folder named with a trailing slash (a dot in its name is no extension then)
    r = run_cli("recon-run", "reconstruct", str(clip), "-o", str(tmp_path / "v1.2") + "/", *model)
    assert r.returncode == 0 and (tmp_path / "v1.2" / "a.wav").is_file(), r.stderr
    refused = [
        ([str(clip), "-o", str(tmp_path / "x.xyz")], "unknown output extension '.xyz'"),
        ([str(clip), "-o", str(tmp_path / "x.mp3")], "cannot write .mp3 files"),
        ([str(clip), str(other), "-o", str(tmp_path / "x.wav")], "several inputs (or a folder) write into a folder"),
        ([str(clip), "-o", str(tmp_path / "x.wav"), "--format", "flac"], "the name says wav, --format says flac"),
        ([str(clip), "-o", "-", "--output-raw", "--format", "pcm16"], "--output-raw writes f32le (float32)"),
        ([str(clip), "-o", "-", "--output-raw", "--sample-format", "pcm16"], "--output-raw writes f32le (float32)"),
        ([str(clip), "-o", str(tmp_path / "x.ogg"), "--sample-format", "pcm16"], "ogg (Vorbis) is lossy"),
    ]
    for args, text in refused:
        r = run_cli("recon-run", "reconstruct", *args, *model)
        assert r.returncode == 1 and _errors(r.stderr) == [_errors(r.stderr)[0]] and text in r.stderr, (args, r.stderr)
    assert not any((tmp_path / n).exists() for n in ("x.xyz", "x.mp3", "x.wav", "x.ogg"))  # no folder x.wav either


# ---------------------------------------------------------------------- channels
def test_channels_each_keeps_two_channels_equal_to_mono_runs(tiny_bundle: Path, tmp_path: Path) -> None:
    model = ["--model", str(tiny_bundle)]
    left, right = tone(0.9, 22050, 300, 0.4), tone(0.9, 22050, 900, 0.05)  # a quiet channel stays quiet
    stereo = _wav(tmp_path / "st.wav", np.stack([left, right], 1), 22050)
    r = run_cli("recon-run", "reconstruct", str(stereo), "-o", str(tmp_path / "each.wav"), "--channels", "each", *model)
    assert r.returncode == 0 and "mixed" not in r.stderr, r.stderr
    each, rate = sf.read(str(tmp_path / "each.wav"), dtype="float32")
    assert each.shape[1] == 2 and rate == 16000
    for c, channel in enumerate((left, right)):
        mono = _wav(tmp_path / f"mono{c}.wav", channel, 22050)
        assert run_cli("recon-run", "reconstruct", str(mono), "-o", str(tmp_path / f"m{c}.wav"), *model).returncode == 0
        np.testing.assert_allclose(each[:, c], sf.read(str(tmp_path / f"m{c}.wav"), dtype="float32")[0], atol=1e-6)
    mixed = run_cli("recon-run", "reconstruct", str(stereo), "-o", str(tmp_path / "mix.wav"), *model)
    assert mixed.returncode == 0 and sf.info(str(tmp_path / "mix.wav")).channels == 1
    assert "1 ok, 0 failed, 1 mixed to mono" in mixed.stderr, mixed.stderr
    # encode of each: one latent and gain per channel, decoded back to two channels
    lat = tmp_path / "st.safetensors"
    r = run_cli("recon-run", "encode", str(stereo), "-o", str(lat), "--channels", "each", *model)
    assert r.returncode == 0, r.stderr
    encoded = EncodedAudio.load(lat)
    assert encoded.channels == 2 and encoded.gain[1] < encoded.gain[0] and encoded.input_channels == 2
    r = run_cli("recon-run", "decode", str(lat), "-o", str(tmp_path / "dec.wav"), *model)
    assert r.returncode == 0 and sf.info(str(tmp_path / "dec.wav")).channels == 2, r.stderr


def test_channels_each_metrics_of_a_half_silent_file_are_defined_where_every_channel_defines_them(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """--channels each --metrics: a silent channel leaves the file's correlation, STFT distance and
    SI-SDR null with that channel's reason (a mean over the other channel would pass for the file's),
    the L1 is the mean over both; no error, the output written."""
    stereo = _wav(tmp_path / "half.wav", np.stack([tone(0.9, 16000, 300), np.zeros(14400, np.float32)], 1))
    out, metrics = tmp_path / "h.wav", tmp_path / "m.json"
    r = run_cli(
        "recon-run", "reconstruct", str(stereo), "-o", str(out), "--channels", "each", "--metrics", str(metrics),
        "--model", str(tiny_bundle),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sf.info(str(out)).channels == 2
    (scores,) = json.loads(metrics.read_text())["files"].values()
    left, right = scores["channels"]
    assert left["mel_correlation"] is not None and right["mel_correlation"] is None
    assert scores["mel_correlation"] is None and scores["si_sdr_db"] is None and scores["mrstft"] is None
    assert scores["undefined_reason"].startswith("channel 1: the input is silent")
    assert scores["log_mel_l1"] == pytest.approx((left["log_mel_l1"] + right["log_mel_l1"]) / 2)


# ---------------------------------------------------------------------- encode and decode
def test_safetensors_round_trip_equals_an_older_npy_and_sidecar_pair(
    tiny_bundle: Path, clip: Path, tmp_path: Path
) -> None:
    from recon_runtime.files.latents import save_latents

    model = ["--model", str(tiny_bundle)]
    lat = tmp_path / "a.safetensors"
    r = run_cli("recon-run", "encode", str(clip), "-o", str(lat), *model)
    assert r.returncode == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "in"], r.stderr
    e = EncodedAudio.load(lat)
    pair = tmp_path / "old" / "a.npy"  # what encode wrote before: the same latents, length and level
    pair.parent.mkdir()
    c = read_contract(tiny_bundle)
    save_latents(
        pair, e.latents[0], clip, sample_rate=16000, num_samples=e.num_samples, input_sample_rate=16000,
        gain=e.gain[0], sample=False, seed=0, fingerprint=c.fingerprint, scaling_factor=c.scaling_factor,
    )  # fmt: skip
    outs = []
    for src in (lat, pair):
        out = tmp_path / f"{src.suffix[1:]}.wav"
        r = run_cli("recon-run", "decode", str(src), "-o", str(out), *model)
        assert r.returncode == 0, r.stderr
        outs.append(sf.read(str(out), dtype="float32")[0])
    assert outs[0].size == e.num_samples == sf.info(str(clip)).frames and np.array_equal(outs[0], outs[1])
    # through pipes: the encoded file's bytes on stdout, decoded from stdin
    encoded = _run("encode", "-", "-o", "-", *model, stdin=clip.read_bytes())
    assert encoded.returncode == 0, encoded.stderr
    piped = EncodedAudio.from_bytes(encoded.stdout)
    assert np.array_equal(piped.latents, e.latents) and piped.source is None  # stdin has no path to record
    decoded = _run("decode", "-", "-o", "-", "--output-raw", *model, stdin=encoded.stdout)
    assert decoded.returncode == 0 and np.array_equal(np.frombuffer(decoded.stdout, "<f4"), outs[0])


def test_bare_pipeline_latents_decode_a_batch_to_one_file_each(tiny_bundle: Path, tmp_path: Path) -> None:
    model = ["--model", str(tiny_bundle)]
    batch = np.random.default_rng(0).standard_normal((3, 8, 20, 16)).astype(np.float32)
    np.save(tmp_path / "gen.npy", batch)
    (tmp_path / "gen.json").write_text('{"prompt": "jazz", "seed": 0}')  # a pipeline's notes: no sidecar
    out = tmp_path / "out"
    r = run_cli("recon-run", "decode", str(tmp_path / "gen.npy"), "-o", str(out), "--seconds", "0.5", *model)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gen-0.wav", "gen-1.wav", "gen-2.wav"]
    from recon_runtime import Reconstructor

    rec = Reconstructor.load(tiny_bundle, provider="cpu")
    for i in range(3):
        wave, _ = sf.read(str(out / f"gen-{i}.wav"), dtype="float32")
        assert wave.size == 8000
        np.testing.assert_allclose(wave, rec.decode(batch[i], num_samples=8000), atol=1e-6)
    one = tmp_path / "one.npy"
    np.save(one, batch[0])  # [8, T, 16]: one clip, its whole length without --seconds
    r = run_cli("recon-run", "decode", str(one), "-o", str(tmp_path / "one.wav"), *model)
    assert r.returncode == 0 and sf.info(str(tmp_path / "one.wav")).frames == 20 * 640, r.stderr
    r = run_cli("recon-run", "decode", str(one), "-o", str(tmp_path / "n.wav"), "--num-samples", "1234", *model)
    assert r.returncode == 0 and sf.info(str(tmp_path / "n.wav")).frames == 1234, r.stderr
    # a batch from stdin to a named file: its clips named like a file's
    piped = _run("decode", "-", "-o", str(tmp_path / "p.flac"), *model, stdin=(tmp_path / "gen.npy").read_bytes())
    assert piped.returncode == 0, piped.stderr
    assert sorted(p.name for p in tmp_path.glob("p-*.flac")) == ["p-0.flac", "p-1.flac", "p-2.flac"]


def test_a_npy_header_that_lies_about_its_batch_is_one_line_without_planning_its_outputs(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """A 200-byte .npy whose header declares [50_000_000, 8, 1, 16]: planning names one output, not
    fifty million (it checks the header against the file's size), and the read refuses it in one line."""
    from numpy.lib import format as npy_format

    from recon_runtime.files.encoded import clip_count

    lie = tmp_path / "lie.npy"
    with open(lie, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (50_000_000, 8, 1, 16)})
        f.write(b"\0" * 64)
    honest = tmp_path / "ok.npy"
    np.save(honest, np.zeros((3, 8, 2, 16), np.float32))
    assert (clip_count(lie), clip_count(honest)) == (1, 3)
    r = subprocess.run(
        [str(Path(sys.executable).with_name("recon-run")), "decode", str(lie), "-o", str(tmp_path / "d"),
         "--model", str(tiny_bundle)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr and str(lie) in r.stderr, r.stderr
    assert len(_errors(r.stderr)) == 1 and not list((tmp_path / "d").glob("*.wav")), r.stderr


def test_a_batch_with_one_bad_clip_writes_none_of_its_files(tiny_bundle: Path, tmp_path: Path) -> None:
    """Bare [B, 8, T, 16] latents whose second clip decodes to non-finite audio: one line, and no
    file of the batch is left (the first clip's would look like a finished job to --skip-existing)."""
    batch = np.random.default_rng(1).standard_normal((2, 8, 6, 16)).astype(np.float32)
    batch[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "gen.npy", batch)
    out = tmp_path / "out"
    r = run_cli("recon-run", "decode", str(tmp_path / "gen.npy"), "-o", str(out), "--model", str(tiny_bundle))
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(_errors(r.stderr)) == 1, r.stderr
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_wrong_latents_and_unknown_versions_are_one_line_each(tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    model = ["--model", str(tiny_bundle)]
    np.save(tmp_path / "shape.npy", np.zeros((2, 8, 5, 15), np.float32))
    lat = tmp_path / "a.safetensors"
    assert run_cli("recon-run", "encode", str(clip), "-o", str(lat), *model).returncode == 0
    (tmp_path / "v2.safetensors").write_bytes(rewrite(lat.read_bytes(), format_version="2"))
    cases = [
        (tmp_path / "shape.npy", [], "latents must be [8, frames, 16] or [batch, 8, frames, 16], got [2, 8, 5, 15]"),
        (tmp_path / "v2.safetensors", [], "encoded-audio format version 2; this build reads version 1"),
        (lat, ["--seconds", "1"], "records its own length"),
        (tmp_path / "shape.npy", ["--seconds", "1", "--num-samples", "5"], "give the length once"),
    ]
    for src, extra, text in cases:
        r = run_cli("recon-run", "decode", str(src), "-o", str(tmp_path / "x.wav"), *extra, *model)
        err = r.stderr.strip().splitlines()
        assert r.returncode != 0 and "Traceback" not in r.stderr and not (tmp_path / "x.wav").exists(), r.stderr
        assert [ln for ln in err if text in ln], (src, r.stderr)


# ---------------------------------------------------------------------- --version, the default bundle
def test_version_of_both_commands(tiny_bundle: Path, tmp_path: Path) -> None:
    r = run_cli("recon-run", "--version", env=_env(RECON_MODEL=str(tiny_bundle)))
    assert r.returncode == 0, r.stderr
    c = read_contract(tiny_bundle)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("recon-run 0.1.0 (audioldm2-recon, Python ") and "onnxruntime" in r.stdout
    assert lines[-1] == f"bundle {tiny_bundle}: digest {c.digest}, fingerprint {c.fingerprint} (from $RECON_MODEL)"
    none = run_cli("recon-run", "--version", env=_env(XDG_DATA_HOME=str(tmp_path / "data")), cwd=tmp_path)
    assert none.returncode == 0 and none.stdout.splitlines()[-1].startswith("no default bundle: no bundle found")
    export = run_cli("recon-export", "--version")
    assert export.returncode == 0 and export.stdout.startswith("recon-export 0.1.0 (audioldm2-recon, Python ")
    assert "torch " in export.stdout and "diffusers " in export.stdout, export.stdout


def test_the_bundle_is_found_by_recon_model_or_in_the_per_user_folder(
    tiny_bundle: Path, clip: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = tmp_path / "data"
    by_env = run_cli(
        "recon-run", "reconstruct", str(clip), "-o", "env.wav",
        env=_env(RECON_MODEL=str(tiny_bundle), XDG_DATA_HOME=str(data)), cwd=elsewhere,
    )  # fmt: skip
    assert by_env.returncode == 0 and f"bundle {tiny_bundle} (from $RECON_MODEL)" in by_env.stderr, by_env.stderr
    missing = run_cli("recon-run", "info", env=_env(XDG_DATA_HOME=str(data)), cwd=elsewhere)
    user = data / "audioldm2-recon" / "models" / "audioldm2-music"
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    (line,) = missing.stderr.strip().splitlines()
    assert line.startswith("error: no bundle found; looked in: $RECON_MODEL (not set); ") and f"{user} (absent)" in line
    assert "recon-export" in line and "--model DIR" in line, line
    shutil.copytree(tiny_bundle, user)
    found = run_cli(
        "recon-run", "reconstruct", str(clip), "-o", "user.wav", env=_env(XDG_DATA_HOME=str(data)), cwd=elsewhere
    )
    assert found.returncode == 0 and f"bundle {user} (from the per-user folder)" in found.stderr, found.stderr
    assert (elsewhere / "env.wav").is_file() and (elsewhere / "user.wav").is_file()
    info = run_cli("recon-run", "info", env=_env(XDG_DATA_HOME=str(data)), cwd=elsewhere)
    assert info.returncode == 0 and f"bundle       {user}" in info.stdout, info.stderr


# ---------------------------------------------------------------------- --device, windows
def test_device_reaches_the_cuda_provider_options(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: CUDA is made to look available, and the executor options it gets are recorded."""
    from recon_runtime.errors import ProviderError
    from recon_runtime.executors import onnxruntime as ort_exec
    from recon_runtime.options import LoadOptions

    seen = []

    def record(bundle_dir, contract, provider, precision, options):  # type: ignore[no-untyped-def]
        seen.append((provider, options))
        raise ProviderError("CUDA did not start (recorded)")

    monkeypatch.setattr(ort_exec, "cuda_available", lambda: True)
    monkeypatch.setattr(ort_exec, "create_executor", record)
    for device, device_id in (("1", 1), ("cuda:3", 3), ("cuda", 0)):
        with pytest.raises(ProviderError, match="recorded"):  # a GPU named: CUDA or an error, never the CPU
            LoadOptions(tiny_bundle, device=device).load()
        provider, options = seen.pop()
        assert provider == "cuda" and options.device_id == device_id
        cuda, _ = ort_exec.SessionConfig.from_options(provider, options).providers()
        assert cuda[0] == "CUDAExecutionProvider" and cuda[1]["device_id"] == str(device_id)
    with pytest.raises(ProviderError, match="openvino backend runs on the CPU"):
        LoadOptions(tiny_bundle, backend="openvino", device="1").load()


def test_device_on_the_command_line(tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    model = ["--model", str(tiny_bundle)]
    out = str(tmp_path / "x.wav")
    usage = [
        (["--device", "gpu1"], "Invalid value for '--device'"),
        (["--device", "1", "--provider", "cpu"], "--device 1 runs on cuda, --provider says cpu; give one"),
        (["--overlap-frames", "1024"], "--overlap-frames (1024) must be at least 0 and less than --window-frames"),
        (["--window-frames", "250"], "--window-frames must be a multiple of 4"),
    ]
    for args, text in usage:
        r = run_cli("recon-run", "reconstruct", str(clip), "-o", out, *args, *model)
        assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    cpu = run_cli("recon-run", "reconstruct", str(clip), "-o", out, "--device", "cpu", *model)
    assert cpu.returncode == 0, cpu.stderr
    if not _has_cuda():
        gpu = run_cli("recon-run", "reconstruct", str(clip), "-o", str(tmp_path / "g.wav"), "--device", "1", *model)
        assert gpu.returncode == 1 and len(_errors(gpu.stderr)) == 1 and "CUDA provider" in gpu.stderr, gpu.stderr


def _has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_the_server_reads_its_device_from_recon_device() -> None:
    pytest.importorskip("fastapi", reason="the server needs the `serve` extra")
    from recon_runtime.serving.config import ServerConfig

    config = ServerConfig.from_env({"RECON_DEVICE": "cuda:1", "RECON_WINDOW_FRAMES": "512"})
    assert (config.device_id, config.load_kwargs()["provider"], config.window_frames) == (1, "cuda", 512)


def test_window_options_reach_the_reconstructor(tiny_bundle: Path, tmp_path: Path) -> None:
    from recon_runtime import Reconstructor

    long = _wav(tmp_path / "long.wav", tone(4.0, 16000, 500))
    out = tmp_path / "w.wav"
    args = ["--window-frames", "128", "--overlap-frames", "32", "--model", str(tiny_bundle)]
    r = run_cli("recon-run", "reconstruct", str(long), "-o", str(out), *args)
    assert r.returncode == 0, r.stderr
    windowed = Reconstructor.load(tiny_bundle, provider="cpu", window_frames=128, overlap_frames=32)
    default = Reconstructor.load(tiny_bundle, provider="cpu")
    audio = tone(4.0, 16000, 500)
    got = sf.read(str(out), dtype="float32")[0]
    np.testing.assert_allclose(got, windowed.reconstruct(audio, 16000), atol=1e-6)
    assert not np.allclose(got, default.reconstruct(audio, 16000), atol=1e-4)  # 4 s is one default window


# ---------------------------------------------------------------------- what a new user ran into
def test_an_unwritable_output_folder_is_refused_before_the_model_loads(tiny_bundle: Path, tmp_path: Path) -> None:
    """(a) two inputs into a folder nobody may create: refused per file before any work. The bundle
    does not exist, so an error about it would mean the model was loaded first."""
    a, b = _wav(tmp_path / "a.wav", tone(0.3, 16000)), _wav(tmp_path / "b.wav", tone(0.3, 16000, 600))
    r = run_cli(
        "recon-run", "reconstruct", str(a), str(b), "-o", "/sys/recon-test-out", "--model", str(tmp_path / "none")
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    errors = _errors(r.stderr)
    assert len(errors) == 2 and all("/sys/recon-test-out/" in e and "cannot write output" in e for e in errors), errors
    assert "bundle" not in r.stderr and "0 ok, 2 failed" in r.stderr, r.stderr
    assert not Path("/sys/recon-test-out").exists()


def test_an_unwritable_metrics_or_plot_file_is_refused_before_the_model_loads(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """(b) found before the model loads, not after the summary."""
    a = _wav(tmp_path / "a.wav", tone(0.3, 16000))
    for flag in ("--metrics", "--plot"):
        args = [
            str(a),
            "-o",
            str(tmp_path / "o.wav"),
            flag,
            "/sys/recon-test/m.json",
            "--model",
            str(tmp_path / "none"),
        ]
        r = run_cli("recon-run", "reconstruct", *args)
        assert r.returncode == 1 and not (tmp_path / "o.wav").exists(), r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith(f"error: {flag} /sys/recon-test/m.json: cannot write output ("), line


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_exits_130_at_once_naming_the_complete_files_kept(
    tiny_bundle: Path, tmp_path: Path, sig: int, status: int
) -> None:
    """(c) SIGINT (or SIGTERM: `timeout`, a container stopping) while the second file runs: one line,
    exit 130 (143), the first file kept, nothing partial (a temporary file left would be a hidden
    `.b.wav....part.wav` that a later folder run takes for an input)."""
    a = _wav(tmp_path / "a.wav", tone(0.3, 16000))
    b = _wav(tmp_path / "b.wav", tone(300.0, 16000, 250))  # minutes of windows: still running when stopped
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("recon-run")
    args = [str(exe), "reconstruct", str(a), str(b), "-o", str(out), "--model", str(tiny_bundle)]
    with open(tmp_path / "err.txt", "wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not (out / "a.wav").exists():  # wait on the state, bounded
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()
                time.sleep(0.05)
            proc.send_signal(sig)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "err.txt").read_text()
    assert code == status, stderr
    assert "Aborted!" not in stderr and "Traceback" not in stderr
    (line,) = _errors(stderr)
    assert (
        line
        == f"error: interrupted: reconstruct stopped; kept the 1 file(s) it finished ({out / 'a.wav'}), nothing partial"
    )
    assert sorted(p.name for p in out.iterdir()) == ["a.wav"]  # b's temporary file removed


def test_write_errors_say_what_is_wrong(tiny_bundle: Path, tmp_path: Path) -> None:
    """(d) not the errno text ("File exists", "No such file or directory") but the cause."""
    a = _wav(tmp_path / "a.wav", tone(0.3, 16000))
    demo = _wav(tmp_path / "demo.wav", tone(0.3, 16000))
    model = ["--model", str(tiny_bundle)]
    for out, cause in (
        (demo / "x.wav", f"{demo} is a file, not a folder"),
        (Path("/proc/x.wav"), "/proc does not take new files"),
    ):
        r = run_cli("recon-run", "reconstruct", str(a), "-o", str(out), *model)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        (line,) = _errors(r.stderr)
        assert f"{out}: cannot write output ({cause}" in line, line
        assert "File exists" not in line and "No such file or directory" not in line, line


def test_write_error_reasons_by_errno(tmp_path: Path) -> None:
    import errno

    from recon_runtime.files.audio import write_error_reason

    out = tmp_path / "x.wav"
    assert (
        write_error_reason(out, OSError(errno.EROFS, "Read-only file system"))
        == f"{tmp_path} is on a read-only file system"
    )
    assert (
        write_error_reason(out, OSError(errno.EACCES, "Permission denied"))
        == f"no permission to create files in {tmp_path}"
    )
    assert write_error_reason(out, OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert (
        write_error_reason(tmp_path / "link" / "x.wav", OSError(errno.EEXIST, "File exists"))
        == f"{tmp_path / 'link'} is not a folder"
    )


def test_metrics_name_inputs_and_outputs_by_absolute_path(tiny_bundle: Path, tmp_path: Path) -> None:
    """(e) one style for both: a relative -o was recorded as typed, beside absolute keys."""
    _wav(tmp_path / "in" / "a.wav", tone(0.3, 16000))
    model = os.path.relpath(tiny_bundle, tmp_path)
    r = run_cli("recon-run", "reconstruct", "in", "-o", "out", "--metrics", "m.json", "--model", model, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = json.loads((tmp_path / "m.json").read_text())["files"]
    key = str((tmp_path / "in" / "a.wav").resolve())
    assert list(files) == [key] and files[key]["output"] == str((tmp_path / "out" / "a.wav").resolve())


def test_vocode_warns_of_a_mel_in_db(tiny_bundle: Path, tmp_path: Path) -> None:
    from recon_runtime import Reconstructor

    rec = Reconstructor.load(tiny_bundle, provider="cpu")
    mel = rec.features(tone(0.5, 16000), 16000).log_mel
    np.save(tmp_path / "nat.npy", mel)
    np.save(tmp_path / "db.npy", 10 * np.log10(np.exp(2 * mel)))  # power in dB: down to -100
    model = ["--model", str(tiny_bundle)]
    r = run_cli(
        "recon-run", "vocode", str(tmp_path / "nat.npy"), str(tmp_path / "db.npy"), "-o", str(tmp_path / "out"), *model
    )
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and str(tmp_path / "db.npy") in warnings[0] and "dB" in warnings[0], r.stderr
    assert "below ln(1e-05) = -11.51" in warnings[0], warnings


def test_stdout_to_a_terminal_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    """-o - with stdout a terminal: one line, nothing written to it (binary audio would be garbage)."""
    import pty

    clip = _wav(tmp_path / "a.wav", tone(0.3, 16000))
    exe = str(Path(sys.executable).with_name("recon-run"))
    for command in ("reconstruct", "encode"):
        leader, follower = pty.openpty()
        try:
            r = subprocess.run(
                [exe, command, str(clip), "-o", "-", "--model", str(tmp_path / "no-bundle")],
                stdout=follower, stderr=subprocess.PIPE, text=True, timeout=120,
            )  # fmt: skip
        finally:
            os.close(follower)
            os.close(leader)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert _errors(r.stderr) == [
            "error: -o -: stdout is a terminal; pipe it on (e.g. ... -o - | ffplay -) or name a file"
        ]
