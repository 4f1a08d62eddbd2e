"""recon-run's per-file job handling: output clashes, any per-file failure, resuming, vocode, pinning."""

from __future__ import annotations

import contextlib
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from recon_runtime.cli import main
from recon_runtime.contract import read_contract

from .conftest import run_cli, tone


def _wav(path: Path, audio: np.ndarray, rate: int = 16000, fmt: str = "WAV") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, format=fmt)
    return path


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_same_name_outputs_from_two_folders_are_refused_not_overwritten(tiny_bundle: Path, tmp_path: Path) -> None:
    a = _wav(tmp_path / "a" / "x.wav", tone(0.4, 16000, 300))
    b = _wav(tmp_path / "b" / "x.wav", tone(0.4, 16000, 900))
    ok = _wav(tmp_path / "b" / "y.wav", tone(0.3, 16000))
    out = tmp_path / "out"
    r = run_cli("recon-run", "reconstruct", str(a), str(b), str(ok), "-o", str(out), "--model", str(tiny_bundle))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    errors = _errors(r.stderr)
    assert len(errors) == 2
    assert any(str(a) in e and str(b) in e and "would also be written" in e for e in errors)
    assert sorted(p.name for p in out.iterdir()) == ["y.wav"]
    assert "1 ok, 2 failed" in r.stderr


def test_same_stem_in_one_folder_clashes_too(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    _wav(root / "x.wav", tone(0.4, 16000))
    _wav(root / "x.flac", tone(0.4, 16000, 800), fmt="FLAC")
    _wav(root / "z.wav", tone(0.3, 16000))
    r = run_cli("recon-run", "encode", str(root), "-o", str(tmp_path / "lat"), "--model", str(tiny_bundle))
    assert r.returncode == 1 and len(_errors(r.stderr)) == 2
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["z.safetensors"]


def test_a_full_disk_fails_one_file_and_the_batch_goes_on(tiny_bundle: Path, tmp_path: Path) -> None:
    """`ulimit -f`: Python ignores SIGXFSZ, so writes past the limit fail like a full disk."""
    small = _wav(tmp_path / "in" / "small.wav", tone(0.3, 16000))  # ~19 kB of float32 output
    big = _wav(tmp_path / "in" / "big.wav", tone(4.0, 16000))  # ~256 kB of float32 output
    out = tmp_path / "out"
    limit = 100_000

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    import subprocess
    import sys

    exe = Path(sys.executable).with_name("recon-run")
    args = [str(exe), "reconstruct", str(big), str(small), "-o", str(out), "--model", str(tiny_bundle)]
    r = subprocess.run(args, capture_output=True, text=True, preexec_fn=cap, timeout=600)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    (line,) = _errors(r.stderr)
    assert f"{out / 'big.wav'}: cannot write output" in line and "file size limit" in line
    assert sorted(p.name for p in out.iterdir()) == ["small.wav"]  # no partial file for the big one
    assert "1 ok, 1 failed" in r.stderr


def test_any_per_file_exception_is_one_line_and_the_batch_goes_on(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recon_runtime.reconstructor import Reconstructor

    inputs = [_wav(tmp_path / "in" / f"{n}.wav", tone(s, 16000)) for n, s in (("a", 0.3), ("bad", 0.5), ("c", 0.4))]
    real = Reconstructor.reconstruct_features

    def flaky(self, feats):  # type: ignore[no-untyped-def]
        if any(f.num_samples == 8000 for f in feats):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated\nsecond line")
        return real(self, feats)

    monkeypatch.setattr(Reconstructor, "reconstruct_features", flaky)
    args = ["reconstruct", *map(str, inputs), "-o", str(tmp_path / "out"), "--model", str(tiny_bundle)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    (line,) = _errors(result.output)
    assert str(inputs[1]) in line and "RuntimeError: [ONNXRuntimeError]" in line and "second line" in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.wav", "c.wav"]
    debug = CliRunner().invoke(main, ["--debug", *args[:-4], "-o", str(tmp_path / "out2"), *args[-2:]])
    assert "Traceback" in debug.output and debug.exit_code == 1


def test_out_of_memory_is_one_line(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recon_runtime.reconstructor import Reconstructor

    src = _wav(tmp_path / "a.wav", tone(0.3, 16000))

    def oom(self, *a, **k):  # type: ignore[no-untyped-def]
        raise MemoryError

    monkeypatch.setattr(Reconstructor, "encode_features", oom)
    result = CliRunner().invoke(main, ["encode", str(src), "-o", str(tmp_path / "z"), "--model", str(tiny_bundle)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert _errors(result.output) == [
        f"error: {src}: out of memory; try --threads 1, fewer files at once, or a machine with more memory"
    ]


def test_skip_existing_resumes_a_folder_run(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    for name in ("a", "b"):
        _wav(root / f"{name}.wav", tone(0.3, 16000))
    out = tmp_path / "out"
    model = ["--model", str(tiny_bundle)]
    assert run_cli("recon-run", "reconstruct", str(root / "a.wav"), "-o", str(out / "a.wav"), *model).returncode == 0
    stamp = (out / "a.wav").stat().st_mtime_ns
    resumed = run_cli("recon-run", "reconstruct", str(root), "-o", str(out), "--skip-existing", *model)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 ok, 0 failed, 1 skipped" in resumed.stderr
    assert (out / "a.wav").stat().st_mtime_ns == stamp  # kept, not rewritten
    assert (out / "b.wav").is_file()
    again = run_cli("recon-run", "reconstruct", str(root), "-o", str(out), *model)
    assert again.returncode == 1 and "0 ok, 2 failed" in again.stderr
    assert "exists; pass --force" in again.stderr and "--skip-existing" in again.stderr
    done = run_cli("recon-run", "reconstruct", str(root), "-o", str(out), "--skip-existing", *model)
    assert done.returncode == 0 and "0 ok, 0 failed, 2 skipped" in done.stderr
    forced = run_cli("recon-run", "reconstruct", str(root), "-o", str(out), "--force", *model)
    assert forced.returncode == 0 and "2 ok, 0 failed" in forced.stderr


def test_vocode_cli_turns_a_log_mel_into_audio(tiny_bundle: Path, tmp_path: Path) -> None:
    from recon_runtime import Reconstructor

    rec = Reconstructor.load(tiny_bundle, provider="cpu")
    mel = rec.features(tone(0.8, 16000), 16000).log_mel
    np.save(tmp_path / "m.npy", mel)
    np.save(tmp_path / "bad.npy", mel[:, :10])
    out = tmp_path / "out"
    r = run_cli(
        "recon-run",
        "vocode",
        str(tmp_path / "m.npy"),
        str(tmp_path / "bad.npy"),
        "-o",
        str(out),
        "--model",
        str(tiny_bundle),
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = _errors(r.stderr)
    assert "bad.npy" in line and "log-mel must be" in line
    wave, rate = sf.read(str(out / "m.wav"), dtype="float32")
    assert rate == 16000 and wave.size == mel.shape[0] * 160
    np.testing.assert_allclose(wave, rec.vocode(mel), atol=1e-5)


def test_expect_digest_on_the_cli(tiny_bundle: Path, tmp_path: Path) -> None:
    src = _wav(tmp_path / "a.wav", tone(0.3, 16000))
    fp = read_contract(tiny_bundle).digest
    model = ["--model", str(tiny_bundle)]
    ok = run_cli("recon-run", "encode", str(src), "-o", str(tmp_path / "a.safetensors"), "--expect-digest", fp, *model)
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "b.safetensors"
    bad = run_cli("recon-run", "encode", str(src), "-o", str(out), "--expect-digest", "f" * 16, *model)
    assert bad.returncode == 1 and len(_errors(bad.stderr)) == 1 and "not the bundle you pinned" in bad.stderr
    assert not out.exists()


def test_an_output_that_would_replace_an_input_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    import hashlib

    root = tmp_path / "in"
    files = [_wav(root / f"{n}.wav", tone(0.3, 16000, 200 + 300 * i)) for i, n in enumerate("ab")]
    digests = [hashlib.md5(p.read_bytes()).hexdigest() for p in files]
    model = ["--model", str(tiny_bundle)]
    for flags in (["--force"], ["--skip-existing"]):
        r = run_cli("recon-run", "reconstruct", str(root), "-o", str(root), *flags, *model)
        assert r.returncode == 1 and len(_errors(r.stderr)) == 2 and "would replace an input" in r.stderr
    single = run_cli("recon-run", "reconstruct", str(files[0]), "-o", str(files[0]), "--force", *model)
    assert single.returncode == 1 and "would replace an input" in single.stderr
    assert [hashlib.md5(p.read_bytes()).hexdigest() for p in files] == digests


def test_encode_writes_one_file_and_leaves_a_json_beside_it_alone(tiny_bundle: Path, tmp_path: Path) -> None:
    """Since the encoded-audio file, encode writes no sidecar: a .json of the user's is neither an
    output nor touched; the .safetensors is the one output --force and --skip-existing speak of."""
    src = _wav(tmp_path / "in" / "x.wav", tone(0.3, 16000))
    out = tmp_path / "lat"
    out.mkdir()
    (out / "x.json").write_text("mine")
    model = ["--model", str(tiny_bundle)]
    r = run_cli("recon-run", "encode", str(tmp_path / "in"), "-o", str(out), *model)
    assert r.returncode == 0, r.stderr
    assert (out / "x.json").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "x.json",
        "x.safetensors",
    ]
    again = run_cli("recon-run", "encode", str(tmp_path / "in"), "-o", str(out), *model)
    assert again.returncode == 1 and f"{out / 'x.safetensors'}: exists" in again.stderr
    skipped = run_cli("recon-run", "encode", str(tmp_path / "in"), "-o", str(out), "--skip-existing", *model)
    assert skipped.returncode == 0 and "0 ok, 0 failed, 1 skipped" in skipped.stderr
    forced = run_cli("recon-run", "encode", str(src), "-o", str(out / "x.safetensors"), "--force", *model)
    assert forced.returncode == 0 and (out / "x.json").read_text() == "mine"


def test_flag_clash_and_empty_folder_are_one_line_errors(tiny_bundle: Path, tmp_path: Path) -> None:
    src = _wav(tmp_path / "a.wav", tone(0.3, 16000))
    both = run_cli("recon-run", "reconstruct", str(src), "-o", str(tmp_path / "o"), "--force", "--skip-existing")
    assert both.returncode == 2 and "--force and --skip-existing exclude each other" in both.stderr
    for command in (["encode"], ["dataset", "encode"]):  # a seed that changes nothing is refused, not dropped
        r = run_cli("recon-run", *command, str(src), "-o", str(tmp_path / "s"), "--seed", "3")
        assert r.returncode == 2 and "--seed seeds the posterior draw of --sample" in r.stderr, (command, r.stderr)
    (tmp_path / "empty").mkdir()
    r = run_cli("recon-run", "encode", str(tmp_path / "empty"), "-o", str(tmp_path / "z"), "--model", str(tiny_bundle))
    assert r.returncode == 1 and _errors(r.stderr) == [
        f"error: {tmp_path / 'empty'}: no input files found in this folder (it holds no files)"
    ]
    # a folder of other formats says what it passed over; hidden files (macOS's ._x.wav) are no inputs
    music = tmp_path / "music"
    for name in ("a.m4a", "b.M4A", "c.aac", "notes.txt", "._x.wav", ".hidden.wav", ".cache/y.wav"):
        (music / name).parent.mkdir(parents=True, exist_ok=True)
        (music / name).write_bytes(b"not decoded")
    r = run_cli("recon-run", "encode", str(music), "-o", str(tmp_path / "z"), "--model", str(tiny_bundle))
    assert r.returncode == 1 and _errors(r.stderr) == [
        f"error: {music}: no input files found in this folder (4 file(s) passed over by extension: .aac, .m4a, .txt)"
    ], r.stderr
    _wav(music / "real.wav", tone(0.3, 16000))
    r = run_cli("recon-run", "encode", str(music), "-o", str(tmp_path / "z"), "--model", str(tiny_bundle))
    assert r.returncode == 0 and sorted(p.name for p in (tmp_path / "z").rglob("*")) == ["real.safetensors"], r.stderr


def test_a_failed_batch_is_retried_file_by_file(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several files per batch (as on a GPU), one bad member must not sink the others."""
    from recon_runtime import reconstructor
    from recon_runtime.reconstructor import Reconstructor

    monkeypatch.setattr(reconstructor, "CPU_MAX_BATCH", 4)
    inputs = [_wav(tmp_path / "in" / f"{n}.wav", tone(0.3, 16000, 300 + 100 * i)) for i, n in enumerate("abcd")]
    real = Reconstructor.reconstruct_features
    calls: list[int] = []

    def flaky(self, feats):  # type: ignore[no-untyped-def]
        calls.append(len(feats))
        if any(np.allclose(f.waveform, 0) for f in feats):
            raise RuntimeError("simulated engine failure")
        return real(self, feats)

    monkeypatch.setattr(Reconstructor, "reconstruct_features", flaky)
    _wav(inputs[2], np.zeros(4800, np.float32))  # c.wav: silence triggers the simulated failure
    result = CliRunner().invoke(
        main, ["reconstruct", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_bundle)]
    )
    assert result.exit_code == 1
    assert calls[0] == 4 and calls[1:] == [1, 1, 1, 1]  # one batch of four, then each file alone
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.wav", "b.wav", "d.wav"]
    (line,) = _errors(result.output)
    assert "c.wav" in line and "simulated engine failure" in line


def test_encode_force_whose_write_fails_keeps_the_old_file(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from recon_runtime.files import audio as audio_io

    src = _wav(tmp_path / "x.wav", tone(0.3, 16000))
    out = tmp_path / "lat"
    model = ["--model", str(tiny_bundle)]
    assert CliRunner().invoke(main, ["encode", str(src), "-o", str(out), *model]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["x.safetensors"]
    _wav(src, tone(0.5, 16000, 900))  # other audio: a forced encode would write another file
    real = audio_io.atomic_path

    @contextlib.contextmanager
    def full(path: Path):  # type: ignore[no-untyped-def]  # the disk fills up while the file is written
        with real(path) as tmp:
            yield tmp
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("recon_runtime.files.encoded.atomic_path", full)
    result = CliRunner().invoke(main, ["encode", str(src), "-o", str(out), "--force", *model])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = _errors(result.output)
    assert f"{out / 'x.safetensors'}: cannot write output (No space left on device)" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old file, whole; no temporaries


def test_metrics_and_plot_files_never_name_an_input_an_output_or_each_other(tiny_bundle: Path, tmp_path: Path) -> None:
    """Refused before the model loads (the bundle does not exist), --force or not: nothing replaced."""
    clip = _wav(tmp_path / "clip.wav", tone(0.3, 16000))
    folder = _wav(tmp_path / "in" / "sub" / "x.wav", tone(0.3, 16000, 500)).parents[1]
    before = clip.read_bytes()
    no_model = ["--model", str(tmp_path / "no-bundle")]
    o2, o3, out = tmp_path / "o2.wav", tmp_path / "o3.wav", tmp_path / "out"
    cases = [
        (
            [str(clip), "-o", str(o2), "--metrics", str(clip), "--force"],
            f"{clip}: --metrics names an input of this run",
        ),
        ([str(clip), "-o", str(o3), "--plot", str(o3)], f"{o3}: --plot names the output of {clip}"),
        ([str(clip), "-o", str(o3), "--plot", str(o3), "--force"], f"{o3}: --plot names the output of {clip}"),
        (
            [str(folder), "-o", str(out), "--metrics", str(out / "sub" / "x.wav")],
            f"{out / 'sub' / 'x.wav'}: --metrics names the output of {folder / 'sub' / 'x.wav'}",
        ),
        (
            [str(clip), "-o", str(o2), "--metrics", str(tmp_path / "r"), "--plot", str(tmp_path / "r")],
            f"{tmp_path / 'r'}: --metrics and --plot name the same file",
        ),
    ]
    for args, message in cases:
        r = run_cli("recon-run", "reconstruct", *args, *no_model)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith(f"error: {message}"), (args, line)
    assert clip.read_bytes() == before
    assert not any(p.exists() for p in (o2, o3, out, tmp_path / "r"))


def test_metrics_and_plot_never_replace_a_file_of_the_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    """--metrics BUNDLE/recon.json --force would replace the contract of the bundle this run loads."""
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    clip = _wav(tmp_path / "clip.wav", tone(0.3, 16000))
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    for option, name in (("--metrics", "recon.json"), ("--plot", "new.png")):
        target = bundle / name
        r = run_cli(
            "recon-run", "reconstruct", str(clip), "-o", str(tmp_path / "o.wav"), option, str(target), "--force",
            "--model", str(bundle),
        )  # fmt: skip
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"error: {target}: {option} names a file inside the bundle {bundle}" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    assert not (tmp_path / "o.wav").exists()


def test_decode_refuses_a_sidecar_of_another_npy(tiny_bundle: Path, tmp_path: Path) -> None:
    """An older encode's pair, its encode --force stopped between its two renames: the new sidecar beside the old .npy."""
    import json

    from recon_runtime import Reconstructor
    from recon_runtime.files.latents import save_latents

    rec = Reconstructor.load(tiny_bundle, provider="cpu")
    model = ["--model", str(tiny_bundle)]
    lat = tmp_path / "x.npy"

    def encode_pair(audio: np.ndarray) -> None:  # what encode wrote before the encoded-audio file
        feats = rec.features(audio, 16000)
        z = rec.encode_features(feats)
        facts = dict(sample_rate=16000, num_samples=feats.num_samples, input_sample_rate=16000, gain=feats.gain)
        save_latents(lat, z, tmp_path / "in.wav", sample=False, seed=0, fingerprint=rec.contract.fingerprint,
                     scaling_factor=rec.contract.scaling_factor, **facts)  # fmt: skip

    encode_pair(tone(0.5, 16000))
    old_npy = lat.read_bytes()
    encode_pair(tone(1.5, 16000, 300))
    new_npy = lat.read_bytes()
    sidecar = lat.with_suffix(".json")
    lat.write_bytes(old_npy)  # the old .npy, the new sidecar
    out = tmp_path / "x.wav"
    r = run_cli("recon-run", "decode", str(lat), "-o", str(out), *model)
    assert r.returncode == 1 and not out.exists() and "Traceback" not in r.stderr, r.stderr
    (line,) = _errors(r.stderr)
    assert line.startswith(f"error: {sidecar}: sidecar does not belong to this .npy; encode again ("), line
    # a sidecar written before npy_sha256 was recorded: still read, its latent_shape compared
    side = json.loads(sidecar.read_text())
    del side["npy_sha256"]
    sidecar.write_text(json.dumps(side))
    r = run_cli("recon-run", "decode", str(lat), "-o", str(out), *model)
    assert r.returncode == 1 and not out.exists()
    (line,) = _errors(r.stderr)
    assert "sidecar does not belong to this .npy; encode again" in line and "latent_shape" in line, line
    lat.write_bytes(new_npy)
    r = run_cli("recon-run", "decode", str(lat), "-o", str(out), *model)
    assert r.returncode == 0, r.stderr
    assert sf.info(str(out)).frames == side["num_samples"] == 24000


def test_an_empty_input_is_refused_while_planning_before_any_model_loads(tmp_path: Path) -> None:
    """A 0-byte input needs no model to be refused: the one line comes at once (no bundle is even
    found here), and a decode of an empty latents file likewise."""
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "empty.npy").write_bytes(b"")
    no_model = ["--model", str(tmp_path / "no-bundle")]
    for command, src, out in (("reconstruct", "empty.wav", "o.wav"), ("decode", "empty.npy", "d.wav")):
        r = run_cli("recon-run", command, str(tmp_path / src), "-o", str(tmp_path / out), *no_model)
        assert r.returncode == 1 and _errors(r.stderr) == [f"error: {tmp_path / src}: empty file (0 bytes)"], r.stderr
        assert not (tmp_path / out).exists()
