"""Output naming rules, formats written through libsndfile, stdin and stdout."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from recon_runtime.errors import AudioInputError, OutputError
from recon_runtime.outputs import (
    FILE,
    FOLDER,
    STDOUT,
    Target,
    audio_bytes,
    audio_target,
    check_output,
    encoded_target,
    output_path,
    raw_bytes,
    read_audio_data,
    read_stdin,
    resolve_format,
    write_audio_file,
    write_stdout,
)

from .conftest import tone


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, str]:
    """An audio file and a folder of them, in a folder of their own (no -o name collides with them)."""
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a.wav", "sub/b.flac"):
        sf.write(str(tmp_path / "in" / name), tone(0.1), 16000)
    os.chdir(tmp_path)
    return {"file": str(tmp_path / "in" / "a.wav"), "folder": str(tmp_path / "in")}


def one_line(e: pytest.ExceptionInfo[BaseException], *parts: str) -> None:
    text = str(e.value)
    assert "\n" not in text and all(p in text for p in parts), text


# ---------------------------------------------------------------------- naming
@pytest.mark.parametrize("name, suffix", [("out.flac", ".flac"), ("out.WAV", ".wav"), ("x/y/out.ogg", ".ogg")])
def test_one_input_and_an_audio_name_write_that_file_in_that_format(
    inputs: dict[str, str], name: str, suffix: str
) -> None:
    t = audio_target([inputs["file"]], name)
    assert (t.kind, t.path, t.suffix, t.container) == (FILE, Path(name), suffix, suffix[1:])
    assert output_path(t, Path("a.wav")) == Path(name)


@pytest.mark.parametrize(
    "name, message",
    [
        ("out.mp3", "cannot write .mp3 files; name a .wav, .flac, .ogg file, or a folder (end it with /)"),
        ("out.opus", "cannot write .opus files"),
        ("out.npy", "unknown output extension '.npy'"),
        ("out.v2", "unknown output extension '.v2'"),
    ],
)
def test_one_input_and_an_extension_not_written_is_refused(inputs: dict[str, str], name: str, message: str) -> None:
    with pytest.raises(OutputError) as e:
        audio_target([inputs["file"]], name)
    one_line(e, name, message)


def test_a_folder_target_is_named_by_a_slash_no_extension_or_an_existing_folder(
    inputs: dict[str, str], tmp_path: Path
) -> None:
    for out in ("out.v2/", "out", "x/out"):
        t = audio_target([inputs["file"]], out)
        assert t.kind == FOLDER and t.suffix == ".wav", out
        assert output_path(t, Path("a.wav")) == Path(out) / "a.wav"
    (tmp_path / "made.flac").mkdir()  # a folder that happens to have an audio name stays a folder
    t = audio_target([inputs["file"]], "made.flac", "ogg")
    assert (t.kind, output_path(t, Path("a.wav"))) == (FOLDER, Path("made.flac/a.ogg"))


def test_several_inputs_or_a_folder_take_format_and_mirror_the_tree(inputs: dict[str, str]) -> None:
    for given in ([inputs["folder"]], [inputs["file"], inputs["file"]]):
        t = audio_target(given, "out", "flac")
        assert (t.kind, t.suffix, t.container) == (FOLDER, ".flac", "flac")
    assert output_path(t, Path("sub/b.flac")) == Path("out/sub/b.flac")
    assert output_path(audio_target([inputs["folder"]], "out"), Path("sub/b.flac")) == Path("out/sub/b.wav")
    with pytest.raises(OutputError) as e:  # today this made a folder out.flac/
        audio_target([inputs["folder"]], "out.flac")
    one_line(e, "out.flac", "names a file", "use a folder and --format flac")


def test_format_and_a_file_name_must_agree(inputs: dict[str, str]) -> None:
    assert audio_target([inputs["file"]], "o.flac", "flac").kind == FILE
    with pytest.raises(OutputError) as e:
        audio_target([inputs["file"]], "o.flac", "ogg")
    one_line(e, "o.flac", "the name says flac, --format says ogg")


def test_resolve_format_keeps_the_sample_format_values_of_before() -> None:
    assert resolve_format(None) == (None, "float32")
    assert resolve_format("FLAC") == ("flac", "float32")
    assert resolve_format("ogg", "pcm16") == ("ogg", "pcm16")
    assert resolve_format("pcm16") == ("wav", "pcm16")  # `--format pcm16` as before: 16-bit WAV
    with pytest.raises(OutputError, match="unknown format 'mp3'; use wav, flac, ogg"):
        resolve_format("mp3")
    with pytest.raises(OutputError, match="disagree"):
        resolve_format("float32", "pcm16")
    with pytest.raises(OutputError, match="unknown sample format"):
        resolve_format(None, "int8")


def test_stdout_and_stdin(inputs: dict[str, str]) -> None:
    t = audio_target([inputs["file"]], "-")
    assert (t.kind, t.path, t.container, output_path(t, Path("a.wav"))) == (STDOUT, None, "wav", None)
    assert audio_target(["-"], "-", "flac").container == "flac"
    raw = audio_target(["-"], "-", raw=True)
    assert raw.raw and raw.container is None
    assert audio_target(["-"], "out.ogg").kind == FILE
    for given, out, raw_flag, message in [
        ([inputs["folder"]], "-", False, "-o - (stdout) takes exactly one input file"),
        ([inputs["file"], inputs["file"]], "-", False, "exactly one input file"),
        ([inputs["file"]], "out.wav", True, "goes to stdout only: use -o -"),
        (["-"], "out/", False, "- (stdin) has no file name to put in a folder"),
    ]:
        with pytest.raises(OutputError) as e:
            audio_target(given, out, raw=raw_flag)
        one_line(e, message)
    with pytest.raises(AudioInputError, match=r"- \(stdin\) must be the only input"):
        audio_target(["-", inputs["file"]], "out")
    with pytest.raises(OutputError, match="drop --format flac"):
        audio_target(["-"], "-", "flac", raw=True)


def test_encode_targets_name_safetensors_files(inputs: dict[str, str]) -> None:
    t = encoded_target([inputs["file"]], "z.safetensors")
    assert (t.kind, t.path) == (FILE, Path("z.safetensors"))
    assert output_path(encoded_target([inputs["folder"]], "z"), Path("sub/b.flac")) == Path("z/sub/b.safetensors")
    assert encoded_target(["-"], "-").kind == STDOUT
    with pytest.raises(OutputError, match=r"unknown output extension '.npy'; name a .safetensors file"):
        encoded_target([inputs["file"]], "z.npy")
    with pytest.raises(OutputError, match="names a file"):
        encoded_target([inputs["folder"]], "z.safetensors")


def test_a_batch_of_clips_is_named_by_a_zero_padded_index() -> None:
    folder = Target(FOLDER, Path("out"), ".wav")
    assert output_path(folder, Path("gen.npy"), 0, 1) == Path("out/gen.wav")  # one clip: its plain name
    names = [output_path(folder, Path("gen.npy"), i, 12) for i in (0, 11)]
    assert names == [Path("out/gen-00.wav"), Path("out/gen-11.wav")]
    assert output_path(Target(FILE, Path("x.flac"), ".flac"), Path("gen.npy"), 2, 3) == Path("x-2.flac")
    with pytest.raises(ValueError):
        output_path(folder, Path("gen.npy"), 3, 3)


def test_nothing_the_run_did_not_write_is_overwritten_without_force(tmp_path: Path) -> None:
    old = tmp_path / "old.wav"
    old.write_bytes(b"the user's")
    with pytest.raises(OutputError) as e:
        check_output(old, force=False)
    one_line(e, str(old), "exists; pass --force to overwrite or --skip-existing to keep it")
    check_output(old, force=True)
    check_output(tmp_path / "new.wav", force=False)
    with pytest.raises(OutputError, match="already written by this run"):
        check_output(old, force=True, written={os.path.normcase(str(old.resolve()))})
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path, force=True)
    assert old.read_bytes() == b"the user's"


# ---------------------------------------------------------------------- formats
@pytest.mark.parametrize(
    "container, sample_format, subtype, tolerance",
    [
        ("wav", "float32", "FLOAT", 0.0),
        ("wav", "pcm16", "PCM_16", 1 / 2**15),
        ("flac", "float32", "PCM_24", 1 / 2**23),
        ("flac", "pcm16", "PCM_16", 1 / 2**15),
        ("ogg", "float32", "VORBIS", None),
    ],
)
@pytest.mark.parametrize("channels", [1, 2])
def test_files_are_written_in_their_format_with_their_channels(
    tmp_path: Path, container: str, sample_format: str, subtype: str, tolerance: float | None, channels: int
) -> None:
    wave = np.stack([tone(0.5, 16000, 440 * (c + 1), 0.4) for c in range(channels)], axis=1)
    wave = wave[:, 0] if channels == 1 else wave
    path = tmp_path / f"o.{container}"
    write_audio_file(path, wave, 16000, sample_format=sample_format)
    info = sf.info(str(path))
    assert (info.format, info.subtype, info.channels, info.samplerate) == (container.upper(), subtype, channels, 16000)
    back, _ = sf.read(str(path), dtype="float32")
    assert back.shape == wave.shape
    if tolerance is not None:
        assert np.abs(back - wave).max() <= tolerance
    else:  # lossy: the tone is still there
        assert np.corrcoef(back.ravel(), wave.ravel())[0, 1] > 0.9
    assert audio_bytes(wave, 16000, container, sample_format)[:4] == path.read_bytes()[:4]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written atomically: no temporary left


def test_integer_formats_clip_and_float_keeps_the_level(tmp_path: Path) -> None:
    loud = np.array([1.5, -2.0, 0.5], np.float32)
    write_audio_file(tmp_path / "f.wav", loud, 16000)
    write_audio_file(tmp_path / "i.flac", loud, 16000, sample_format="pcm16")
    assert np.array_equal(sf.read(str(tmp_path / "f.wav"), dtype="float32")[0], loud)
    assert np.abs(sf.read(str(tmp_path / "i.flac"), dtype="float32")[0]).max() <= 1.0


def test_an_unwritable_output_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OutputError) as e:
        write_audio_file(tmp_path / "x.mp3", tone(0.1), 16000)
    one_line(e, "x.mp3", "cannot write .mp3")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OutputError) as e:
        write_audio_file(tmp_path / "file" / "x.wav", tone(0.1), 16000)  # a file where a folder should be
    one_line(e, "x.wav", "cannot write output")
    with pytest.raises(OutputError, match=r"must be \[samples\] or \[samples, channels\]"):
        write_audio_file(tmp_path / "y.wav", np.zeros((2, 2, 2), np.float32), 16000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_raw_output_is_interleaved_little_endian_float32() -> None:
    wave = np.array([[0.5, -0.25], [1.0, 0.0]], np.float32)
    assert raw_bytes(wave) == struct.pack("<4f", 0.5, -0.25, 1.0, 0.0)


# ---------------------------------------------------------------------- pipes
def wav_data(audio: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def test_audio_from_stdin_keeps_its_channels_and_rate() -> None:
    stereo = np.stack([tone(0.2, 22050), tone(0.2, 22050, 300)], axis=1)
    audio, rate = read_audio_data(wav_data(stereo, 22050))
    assert audio.shape == stereo.shape and rate == 22050
    assert read_audio_data(read_stdin(io.BytesIO(wav_data(tone(0.1)))))[0].ndim == 1


def test_a_wav_streamed_without_its_length_is_read_whole() -> None:
    """A WAV written to a pipe cannot go back to fill in its sizes: ffmpeg leaves 0xFFFFFFFF there."""
    data = bytearray(wav_data(tone(0.3)))
    assert data[36:40] == b"data"
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"
    audio, rate = read_audio_data(bytes(data))
    assert audio.shape == (round(0.3 * 16000),) and rate == 16000


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "-: empty (0 bytes)"),
        (b"not audio at all", "-: not a readable audio file"),
        (wav_data(np.zeros(0, np.float32)), "-: contains no samples"),
    ],
)
def test_bad_stdin_is_one_line(data: bytes, message: str) -> None:
    with pytest.raises(AudioInputError) as e:
        read_audio_data(data)
    one_line(e, message)
    with pytest.raises(AudioInputError, match="stdin was empty"):
        read_stdin(io.BytesIO(b""))


def test_nan_audio_from_stdin_is_refused() -> None:
    buf = io.BytesIO()
    sf.write(buf, np.array([0.1, np.nan], np.float32), 16000, subtype="FLOAT", format="WAV")
    with pytest.raises(AudioInputError, match="NaN"):
        read_audio_data(buf.getvalue())


def test_stdout_is_written_whole_and_a_closed_pipe_is_one_line() -> None:
    """`... -o - | head -c 100`: the reader goes away; the writer says so in one line, no traceback."""
    code = textwrap.dedent("""
        import sys
        from recon_runtime.errors import OutputError
        from recon_runtime.outputs import write_stdout
        try:
            write_stdout(b"x" * (16 << 20))
        except OutputError as e:
            print(e, file=sys.stderr)
            sys.exit(1)
    """)
    whole = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert whole.returncode == 0 and len(whole.stdout) == 16 << 20
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 1
    assert err.strip() == "stdout: the reader closed the pipe before all the output was written", err
    sink = io.BytesIO()
    write_stdout(b"abc", sink)
    assert sink.getvalue() == b"abc"
