"""Where a command's outputs go and in what format: output naming rules, pipes, writes in wav, flac or ogg.

The rules, as pure functions (the CLI only calls them):

- one input file with `-o out.flac` writes that file, in the format of its extension (wav, flac,
  ogg, through libsndfile); an audio extension libsndfile cannot write here (.mp3, .opus, ...)
  or an unknown one is refused in one line, since a folder `out.flac/` is never what was meant;
- several inputs, a folder input, an existing folder or a name that ends in `/` (or has no
  extension) make `-o` a folder; files in it take `--format` (default wav) and mirror the inputs;
- `-o -` writes the one output to stdout: WAV (or the `--format` asked), or raw little-endian
  float32 with `raw` (piper's `--output-raw`); `-` as the input reads it from stdin. Progress and
  summaries then go to stderr only;
- nothing is overwritten that this run did not write unless `force`, and nothing this run wrote
  is overwritten at all (`check_output`).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
import soundfile as sf

from ..errors import AudioInputError, OutputError
from .audio import AUDIO_EXTENSIONS, FLOAT32, PCM16, SAMPLE_FORMATS, atomic_path
from .encoded import ENCODED_SUFFIX

STDIO: Final = "-"
"""As an input: read stdin; as `-o`: write stdout."""
WAV: Final = "wav"
FLAC: Final = "flac"
OGG: Final = "ogg"
CONTAINERS: Final = {WAV: "WAV", FLAC: "FLAC", OGG: "OGG"}
"""The audio formats written (libsndfile's names); the keys are also their file extensions."""
DEFAULT_CONTAINER: Final = WAV
SUBTYPES: Final = {
    (WAV, FLOAT32): "FLOAT",
    (WAV, PCM16): "PCM_16",
    (FLAC, FLOAT32): "PCM_24",  # FLAC holds integers only: 24 bits is the closest to float32 it has
    (FLAC, PCM16): "PCM_16",
    (OGG, FLOAT32): "VORBIS",  # lossy: the sample format does not apply
    (OGG, PCM16): "VORBIS",
}
FORMAT_CHOICES: Final = (*CONTAINERS, *SAMPLE_FORMATS)
"""What `--format` accepts: a container, or (as before containers) a WAV sample format."""
RAW_FORMAT: Final = "f32le"
"""Raw stdout: interleaved little-endian float32, no header (the server's stream speaks the same)."""

FILE: Final = "file"
FOLDER: Final = "folder"
STDOUT: Final = "stdout"


@dataclass(frozen=True)
class Target:
    """Where outputs go: one file, a folder that mirrors the inputs, or stdout."""

    kind: str
    """FILE, FOLDER or STDOUT."""
    path: Path | None
    """The file or folder (None for stdout)."""
    suffix: str
    """The extension of the files written ('.flac', '.safetensors'); for stdout what it would be."""
    raw: bool = False
    """stdout only: raw float32 instead of a container."""

    @property
    def container(self) -> str | None:
        """The audio format written (a CONTAINERS key), None for encoded outputs or raw stdout."""
        name = self.suffix.lstrip(".")
        return name if name in CONTAINERS and not self.raw else None


def resolve_format(value: str | None, sample_format: str | None = None) -> tuple[str | None, str]:
    """`--format` and `--sample-format` as (container or None when not given, sample format).

    `--format float32|pcm16` keeps its earlier meaning (WAV with that sample format).
    """
    if sample_format is not None and sample_format not in SAMPLE_FORMATS:
        raise OutputError(f"unknown sample format {sample_format!r}; use {', '.join(SAMPLE_FORMATS)}")
    if value is None:
        return None, sample_format or FLOAT32
    value = value.lower()
    if value in SAMPLE_FORMATS:
        if sample_format is not None and sample_format != value:
            raise OutputError(f"--format {value} and --sample-format {sample_format} disagree; give one")
        return WAV, value
    if value not in CONTAINERS:
        raise OutputError(f"unknown format {value!r}; use {', '.join(CONTAINERS)}")
    return value, sample_format or FLOAT32


def _looks_like_folder(out: str) -> bool:
    return out.endswith(("/", os.sep)) or Path(out).is_dir() or not Path(out).suffix


def _refuse_suffix(out: str, suffix: str, wanted: Sequence[str]) -> OutputError:
    names = ", ".join(wanted)
    if suffix in AUDIO_EXTENSIONS:
        return OutputError(f"{out}: cannot write {suffix} files; name a {names} file, or a folder (end it with /)")
    return OutputError(f"{out}: unknown output extension {suffix!r}; name a {names} file, or a folder (end it with /)")


def _check_stdio_inputs(inputs: Sequence[str]) -> bool:
    """True when the input is stdin (then it is the only input)."""
    if STDIO not in inputs:
        return False
    if len(inputs) != 1:
        raise AudioInputError("- (stdin) must be the only input")
    return True


def _refuse_terminal() -> None:
    """-o - with stdout a terminal: binary audio would scroll past as garbage (and can hang a
    terminal that waits on it), so it is refused before anything runs, as piper's users expect."""
    if sys.stdout.isatty():
        raise OutputError("-o -: stdout is a terminal; pipe it on (e.g. ... -o - | ffplay -) or name a file")


def _single_file(inputs: Sequence[str]) -> bool:
    return len(inputs) == 1 and (inputs[0] == STDIO or not Path(inputs[0]).is_dir())


def audio_target(inputs: Sequence[str], out: str, container: str | None = None, raw: bool = False) -> Target:
    """Where audio outputs go (reconstruct, decode, vocode): see the module's rules.

    Args:
        inputs: the inputs as given (`-` for stdin).
        out: `-o` as given (a trailing `/` makes it a folder).
        container: `--format` as resolved (`resolve_format`), None when not given.
        raw: raw float32 to stdout (only with `-o -`).
    Raises:
        OutputError: the combination cannot be honoured (one line saying what to change).
    """
    stdin = _check_stdio_inputs(inputs)
    if raw and out != STDIO:
        raise OutputError("raw output (--output-raw) goes to stdout only: use -o -")
    if out == STDIO:
        if not _single_file(inputs):
            raise OutputError("-o - (stdout) takes exactly one input file")
        _refuse_terminal()
        if raw and container is not None:
            raise OutputError(f"--output-raw writes {RAW_FORMAT} without a container; drop --format {container}")
        return Target(STDOUT, None, "." + (container or DEFAULT_CONTAINER), raw)
    suffix = Path(out).suffix.lower()
    if _single_file(inputs) and not _looks_like_folder(out):
        name = suffix.lstrip(".")
        if name not in CONTAINERS:
            raise _refuse_suffix(out, suffix, [f".{c}" for c in CONTAINERS])
        if container is not None and container != name:
            raise OutputError(f"{out}: the name says {name}, --format says {container}; give one")
        return Target(FILE, Path(out), suffix)
    if stdin:
        raise OutputError(f"{out}: - (stdin) has no file name to put in a folder; name the output file, or use -o -")
    if suffix.lstrip(".") in CONTAINERS and not Path(out).is_dir():
        raise OutputError(
            f"{out}: several inputs (or a folder) write into a folder, and this names a file; "
            f"use a folder and --format {suffix.lstrip('.')}"
        )
    return Target(FOLDER, Path(out), "." + (container or DEFAULT_CONTAINER))


def check_sample_format(target: Target, sample_format: str, given: bool) -> None:
    """Refuse a sample format the target cannot honour, rather than write another one without a word:
    raw output is float32 only, and Ogg (Vorbis, lossy) has no sample format.

    Args:
        given: the user named one (`--sample-format`, or `--format float32|pcm16`).
    """
    if target.raw and sample_format != FLOAT32:
        raise OutputError(f"--output-raw writes {RAW_FORMAT} (float32); drop the sample format {sample_format}")
    if given and target.suffix == f".{OGG}":
        raise OutputError(f"ogg (Vorbis) is lossy and has no sample format; drop {sample_format}, or write wav/flac")


def encoded_target(inputs: Sequence[str], out: str) -> Target:
    """Where encode's outputs go: as `audio_target`, with `.safetensors` files (stdout: the file's bytes)."""
    stdin = _check_stdio_inputs(inputs)
    if out == STDIO:
        if not _single_file(inputs):
            raise OutputError("-o - (stdout) takes exactly one input file")
        _refuse_terminal()
        return Target(STDOUT, None, ENCODED_SUFFIX)
    suffix = Path(out).suffix.lower()
    if _single_file(inputs) and not _looks_like_folder(out):
        if suffix != ENCODED_SUFFIX:
            raise _refuse_suffix(out, suffix, [ENCODED_SUFFIX])
        return Target(FILE, Path(out), suffix)
    if stdin:
        raise OutputError(f"{out}: - (stdin) has no file name to put in a folder; name the output file, or use -o -")
    if suffix == ENCODED_SUFFIX and not Path(out).is_dir():
        raise OutputError(f"{out}: several inputs (or a folder) write into a folder, and this names a file")
    return Target(FOLDER, Path(out), ENCODED_SUFFIX)


def output_path(target: Target, relative: Path, index: int | None = None, count: int = 1) -> Path | None:
    """The output of one input: the target file, or `relative` (the input's path under its root)
    under the target folder with the target's extension; None for stdout.

    Args:
        index, count: the item's place in an input that holds `count` clips (a bare latents batch
            [B, 8, T, 16]): with count > 1 the name gets `-{index}`, zero-padded to count's width.
    """
    if target.path is None:  # stdout
        return None
    base = target.path if target.kind == FILE else target.path / Path(relative).with_suffix(target.suffix)
    if count > 1:
        if index is None or not 0 <= index < count:
            raise ValueError(f"index must be in 0..{count - 1}, got {index}")
        base = base.with_name(f"{base.stem}-{index:0{len(str(count - 1))}d}{base.suffix}")
    return base


def check_output(path: Path, force: bool, written: Collection[str] = ()) -> None:
    """Refuse to write `path` over what this program did not write (without `force`) or over what this
    run wrote already (even with `force`); a folder is never replaced.

    Args:
        written: resolved paths (os.path.normcase(str(p.resolve()))) of the files this run wrote.
    """
    if path.is_dir():
        raise OutputError(f"{path}: is a folder")
    if os.path.normcase(str(path.resolve())) in written:
        raise OutputError(f"{path}: already written by this run; not overwriting it")
    if path.exists() and not force:
        raise OutputError(f"{path}: exists; pass --force to overwrite or --skip-existing to keep it")


# ---------------------------------------------------------------------- audio bytes
def _frames(waveform: np.ndarray, subtype: str) -> np.ndarray:
    """float32 [samples] or [samples, channels]; clipped to [-1, 1] for integer and lossy formats."""
    data = np.asarray(waveform, dtype=np.float32)
    if data.ndim not in (1, 2) or data.size == 0:
        raise OutputError(f"audio to write must be [samples] or [samples, channels], got {list(data.shape)}")
    return data if subtype == "FLOAT" else np.clip(data, -1.0, 1.0)


def audio_bytes(
    waveform: np.ndarray, sample_rate: int, container: str = DEFAULT_CONTAINER, sample_format: str = FLOAT32
) -> bytes:
    """Audio as a file's bytes (for stdout or an HTTP body).

    Args:
        waveform: float32 [samples] or [samples, channels].
    """
    subtype = SUBTYPES[container, sample_format]
    buf = io.BytesIO()
    try:
        sf.write(buf, _frames(waveform, subtype), int(sample_rate), subtype=subtype, format=CONTAINERS[container])
    except (sf.LibsndfileError, RuntimeError) as e:
        raise OutputError(f"cannot encode {container} audio ({' '.join(str(e).split())})") from None
    return buf.getvalue()


def raw_bytes(waveform: np.ndarray) -> bytes:
    """Audio as raw interleaved little-endian float32 (RAW_FORMAT), no header."""
    return np.ascontiguousarray(waveform, dtype="<f4").tobytes()


def write_audio_file(
    path: Path, waveform: np.ndarray, sample_rate: int, container: str | None = None, sample_format: str = FLOAT32
) -> None:
    """Write audio atomically (no partial file on failure) in `container` (default: from the extension).

    Args:
        waveform: float32 [samples] or [samples, channels].
    """
    path = Path(path)
    container = container or path.suffix.lower().lstrip(".")
    if container not in CONTAINERS:
        raise _refuse_suffix(str(path), path.suffix, [f".{c}" for c in CONTAINERS])
    subtype = SUBTYPES[container, sample_format]
    data = _frames(waveform, subtype)
    with atomic_path(path) as tmp:
        try:
            sf.write(str(tmp), data, int(sample_rate), subtype=subtype, format=CONTAINERS[container])
        except (sf.LibsndfileError, RuntimeError) as e:  # libsndfile reports a failed write without errno
            raise OutputError(
                f"{path}: cannot write output ({' '.join(str(e).split())}: disk full or file size limit?)"
            ) from None


def write_stdout(data: bytes, stream: BinaryIO | None = None) -> None:
    """Write bytes to stdout (binary); a reader that went away is one OutputError, not a traceback."""
    out = stream if stream is not None else sys.stdout.buffer
    view = memoryview(data)
    try:
        while view:  # a pipe can take part of a large write (one whose reader goes away, too)
            written = out.write(view)
            if not written:
                raise OSError("stdout took no bytes")
            view = view[written:]
        out.flush()
    except BrokenPipeError:
        # keep Python's exit-time flush of stdout from raising again (and printing a traceback)
        if stream is None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        raise OutputError("stdout: the reader closed the pipe before all the output was written") from None
    except OSError as e:
        raise OutputError(f"stdout: cannot write output ({e.strerror or e})") from None


def read_stdin(stream: BinaryIO | None = None) -> bytes:
    """Everything on stdin (binary); empty or a terminal is one AudioInputError."""
    source = stream if stream is not None else sys.stdin.buffer
    if stream is None and sys.stdin.isatty():
        raise AudioInputError("-: stdin is a terminal; pipe audio in (e.g. sox in.flac -t wav - | ...)")
    try:
        data = source.read()
    except OSError as e:
        raise AudioInputError(f"-: stdin cannot be read ({e.strerror or e})") from None
    if not data:
        raise AudioInputError("-: stdin was empty (0 bytes)")
    return data
