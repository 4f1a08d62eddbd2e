"""Audio and array files in and out: reading with libsndfile, atomic writes, input discovery."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Final

import numpy as np
import soundfile as sf
from numpy.lib import format as npy_format

from ..errors import AudioInputError, OutputError

AUDIO_EXTENSIONS: Final = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64"}
)
FLOAT32: Final = "float32"
PCM16: Final = "pcm16"
SAMPLE_FORMATS: Final = (FLOAT32, PCM16)
"""The sample formats of the audio the runtime writes (files, WAV answers, streams)."""
WAV_SUBTYPES: Final = {FLOAT32: "FLOAT", PCM16: "PCM_16"}
BYTES_PER_SAMPLE: Final = {FLOAT32: 4, PCM16: 2}


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Read any file libsndfile understands.

    Returns:
        (float32 [samples] or [samples, channels], sample_rate).
    """
    path = Path(path)
    if not path.exists():
        raise AudioInputError(f"{path}: no such file")
    if path.is_dir():
        raise AudioInputError(f"{path}: is a folder, not an audio file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise AudioInputError(f"{path}: cannot be read ({e.strerror})") from None
    if size == 0:
        raise AudioInputError(f"{path}: empty file (0 bytes)")
    return _read_checked(str(path), str(path))


def read_audio_data(data: bytes, what: str = "-") -> tuple[np.ndarray, int]:
    """Audio from a file's bytes (stdin), channels kept, with the checks of `read_audio`.

    Returns:
        (float32 [samples] or [samples, channels], sample_rate).
    """
    if not data:
        raise AudioInputError(f"{what}: empty (0 bytes)")
    return _read_checked(io.BytesIO(data), what)


def _read_checked(source: str | io.BytesIO, what: str) -> tuple[np.ndarray, int]:
    """libsndfile's read of a path or bytes, refused when unreadable, empty or not finite."""
    try:
        audio, rate = sf.read(source, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        reason = getattr(e, "error_string", None) if isinstance(source, io.BytesIO) else None
        raise AudioInputError(f"{what}: not a readable audio file ({reason or _one_line(e)})") from None
    except OSError as e:
        raise AudioInputError(f"{what}: cannot be read ({e.strerror or e})") from None
    if audio.size == 0:
        raise AudioInputError(f"{what}: contains no samples (zero-length audio)")
    if not np.isfinite(audio).all():
        raise AudioInputError(f"{what}: contains NaN or infinite samples")
    return audio, int(rate)


MAX_SAMPLE_RATE: Final = 384_000
"""Highest sample rate an uploaded file may declare (Hz); libsndfile accepts header values up to 2**31-1."""
MIN_SAMPLE_RATE: Final = 1_000
"""Lowest sample rate an uploaded file may declare (Hz)."""
MAX_CHANNELS: Final = 8
"""Most channels an uploaded file may have (7.1 surround)."""
READ_BLOCK_FRAMES: Final = 65_536


class AudioTooLarge(AudioInputError):
    """Audio that would decode to more than the caller's byte budget (a server answers 413)."""


def read_audio_bytes(
    data: bytes,
    what: str = "input",
    check: Callable[[int, int], None] | None = None,
    max_decoded_bytes: int | None = None,
) -> tuple[np.ndarray, int]:
    """Read audio from memory (an upload) in any format libsndfile understands, mixed down to mono.

    The header is checked before any sample is decoded: a sample rate outside
    [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE], more than MAX_CHANNELS channels, or frames x channels x
    4 bytes over `max_decoded_bytes` is refused. Samples are then decoded in blocks and each block
    mixed down to mono at once (as `frontend.to_mono` does: the mean in float64), so memory stays
    at one float32 per frame even when the header does not state the length.

    Args:
        what: names the input in error messages (never a server path).
        check: called with (frames, sample_rate) from the header before any sample is decoded,
            e.g. to refuse audio that is too long; it raises to refuse.
        max_decoded_bytes: budget for the decoded float32 samples of all channels.
    Returns:
        (float32 [samples], sample_rate).
    Raises:
        AudioTooLarge: over `max_decoded_bytes`.
        AudioInputError: unreadable, empty, non-finite, or an impossible rate or channel count.
    """
    if not data:
        raise AudioInputError(f"{what}: empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
            if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                raise AudioInputError(
                    f"{what}: sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
                )
            if not 1 <= channels <= MAX_CHANNELS:
                raise AudioInputError(f"{what}: {channels} channels (at most {MAX_CHANNELS})")
            known = 0 < frames < 2**62  # some formats do not state their length
            if max_decoded_bytes is not None and known and frames * channels * 4 > max_decoded_bytes:
                raise AudioTooLarge(_too_large(what, frames * channels * 4, max_decoded_bytes))
            if check is not None:
                check(frames, rate)
            parts: list[np.ndarray] = []
            decoded = 0
            for block in f.blocks(blocksize=READ_BLOCK_FRAMES, dtype="float32", always_2d=True):
                decoded += block.size * 4
                if max_decoded_bytes is not None and decoded > max_decoded_bytes:
                    raise AudioTooLarge(_too_large(what, decoded, max_decoded_bytes, "over"))
                mono = block[:, 0] if channels == 1 else block.mean(axis=1, dtype=np.float64).astype(np.float32)
                parts.append(mono)  # soundfile hands out a fresh array per block: no copy needed
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:  # libsndfile's own words, without the object's repr
        reason = getattr(e, "error_string", None) or _one_line(e)
        raise AudioInputError(f"{what}: not a readable audio file ({reason})") from None
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if audio.size == 0:
        raise AudioInputError(f"{what}: contains no samples (zero-length audio)")
    if not np.isfinite(audio).all():
        raise AudioInputError(f"{what}: contains NaN or infinite samples")
    return audio, rate


def _too_large(what: str, size: int, limit: int, qualifier: str = "") -> str:
    at = f"{qualifier} " if qualifier else ""
    return f"{what}: decodes to {at}{size / 2**20:.0f} MiB of samples, over the limit of {limit / 2**20:.0f} MiB"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


_TEMP_ATTEMPTS: Final = 100
# O_EXCL: never reuse an existing name; O_NOFOLLOW (where it exists): never write through a link.
_TEMP_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _create_temp(path: Path) -> Path:
    """Create an empty, new temporary file beside `path` with the permissions of any new file.

    tempfile.mkstemp creates its file with mode 0600, and the rename would give that mode to
    the output. Here the file is opened with mode 0666 and the kernel applies the process umask
    (and any default ACL of the folder), exactly as for a file created by `open(path, "w")`:
    0644 under umask 022, 0640 under 027. Reading the umask instead would need os.umask, which
    can only read it by setting it, process-wide, racing every other thread that creates a file.
    """
    for _ in range(_TEMP_ATTEMPTS):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.part{path.suffix}"
        try:
            fd = os.open(tmp, _TEMP_FLAGS, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary name after {_TEMP_ATTEMPTS} tries", str(path.parent))


class _Writes:
    """The atomic writes of this process: the temporary files in progress, and while a command records
    them (`recording_writes`), the outputs finished. `stop_writes` ends them all (Ctrl-C)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: set[Path] = set()
        self.finished: list[Path] | None = None
        self.stopped = False


_WRITES: Final = _Writes()


@contextlib.contextmanager
def recording_writes() -> Iterator[list[Path]]:
    """Record the outputs `atomic_path` puts in place while the block runs (for a command's last line)."""
    with _WRITES.lock:
        _WRITES.finished = []
    try:
        yield _WRITES.finished
    finally:
        with _WRITES.lock:
            _WRITES.finished = None


def stop_writes() -> list[Path]:
    """Stop every write of this process, for an interrupted command that exits at once: the temporary
    files in progress are removed, no write puts its file in place after this, and none starts.

    Returns:
        The outputs put in place since `recording_writes` began (complete files; none is partial).
    """
    with _WRITES.lock:
        _WRITES.stopped = True
        for tmp in _WRITES.active:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return list(_WRITES.finished or [])


def _interrupted(path: Path) -> OutputError:
    return OutputError(f"{path}: not written (the command was interrupted)")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The output gets the permissions any new file gets under the user's umask (0644 under umask
    022), not tempfile's 0600. If the block raises, the temporary file is removed and `path` is
    left as it was (absent, or its previous content): never a partial output. Nor after
    `stop_writes`, which removes the temporary file of every write in progress.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _WRITES.lock:
            if _WRITES.stopped:
                raise _interrupted(path)
            tmp_path = _create_temp(path)
            _WRITES.active.add(tmp_path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write output ({write_error_reason(path, e)})") from None
    try:
        yield tmp_path
        with _WRITES.lock:  # a rename and its record are one step for stop_writes
            if _WRITES.stopped:
                raise _interrupted(path)
            os.replace(tmp_path, path)
            if _WRITES.finished is not None:
                _WRITES.finished.append(path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write output ({write_error_reason(path, e)})") from None
    finally:
        with _WRITES.lock:
            _WRITES.active.discard(tmp_path)
        tmp_path.unlink(missing_ok=True)


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output `path` whose folder cannot be created or written: a
    temporary file of our own is made in the nearest folder that exists, and removed at once.

    Raises:
        OutputError: `{path}: cannot write output (why, in words)`.
    """
    path = Path(path)
    folder = _existing_ancestor(path.parent)
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        _create_temp(folder / path.name).unlink()
    except OSError as e:
        raise OutputError(f"{path}: cannot write output ({write_error_reason(path, e)})") from None


def _existing_ancestor(folder: Path) -> Path:
    """`folder` or its nearest ancestor that exists (a dangling link counts: it is in the way)."""
    folder = Path(os.path.abspath(folder))
    while not os.path.lexists(folder) and folder.parent != folder:
        folder = folder.parent
    return folder


def write_error_reason(path: Path, e: OSError) -> str:
    """Why `path` cannot be written, in words. The errno text alone misleads here: making the folder
    of `demo.wav/x.wav` where demo.wav is a file says "File exists", and a new file in /proc "No such
    file or directory"."""
    folder = _existing_ancestor(Path(path).parent)
    if not folder.is_dir():
        return f"{folder} is a file, not a folder" if folder.is_file() else f"{folder} is not a folder"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to create files in {folder}"
    if e.errno == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if e.errno == errno.ENOENT:
        return f"{folder} does not take new files (a system folder such as /proc or /sys?)"
    if e.errno == errno.ENAMETOOLONG:
        return "the file name is too long for this file system"
    return e.strerror or " ".join(str(e).split())


def _wav_samples(waveform: np.ndarray, sample_format: str) -> np.ndarray:
    data = np.asarray(waveform, dtype=np.float32)
    return np.clip(data, -1.0, 1.0) if sample_format == PCM16 else data


def wav_bytes(waveform: np.ndarray, sample_rate: int, sample_format: str = FLOAT32) -> bytes:
    """Mono audio as the bytes of a WAV file (float32 or PCM16, clipped to [-1, 1]), as `write_audio_file` writes one."""
    buf = io.BytesIO()
    sf.write(
        buf, _wav_samples(waveform, sample_format), int(sample_rate), subtype=WAV_SUBTYPES[sample_format], format="WAV"
    )
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as the bytes of a .npy file (never pickled), as `write_array` writes it."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_array(path: Path, array: np.ndarray) -> None:
    """Write an array as .npy to `path` as it is (never pickled); `save_array` for an atomic write."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def save_array(path: Path, array: np.ndarray) -> None:
    """Save an array as .npy atomically (never pickled)."""
    with atomic_path(path) as tmp:
        write_array(tmp, array)


def load_array(path: Path) -> np.ndarray:
    """Load a .npy array without pickle; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise AudioInputError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise AudioInputError(f"{path}: not a readable .npy array ({_one_line(e)})") from None


ArrayCheck = Callable[[tuple[int, ...], np.dtype], None]


def read_npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """A .npy file's (shape, fortran_order, dtype), `f` left at its data: formats 1.0 and 2.0, read
    without allocating what the header declares. The one header reader of every .npy the runtime
    takes (uploads, planning a batch's outputs, a request's declared length).

    Raises:
        ValueError (or whatever numpy's header parser raises): not a .npy header this reads.
    """
    version = npy_format.read_magic(f)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(f)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(f)
    raise ValueError(f"format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")


def read_array_bytes(data: bytes, what: str, check: ArrayCheck | None = None) -> np.ndarray:
    """A .npy array from bytes (e.g. an upload), its header checked before anything is allocated.

    `np.load` allocates what the header declares before it reads the data, so a 2 KB body that
    declares 48 GiB makes it try; here the header is read first, `check(shape, dtype)` may refuse
    the declared array (raise), and a header that declares more or fewer bytes than follow it is
    refused (AudioInputError). Object arrays (pickles) are never loaded.

    Returns:
        The array, a read-only view of `data` in the declared dtype and shape.
    """
    f = io.BytesIO(data)
    try:
        shape, fortran_order, dtype = read_npy_header(f)
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises many kinds (tokenize's too): all the body's fault
        raise AudioInputError(f"{what}: not a readable .npy array ({_one_line(e)})") from None
    if dtype.hasobject:
        raise AudioInputError(f"{what}: the .npy array holds Python objects (pickles are never loaded)")
    if any(d < 0 for d in shape):
        raise AudioInputError(f"{what}: the .npy header declares a negative dimension {list(shape)}")
    if check is not None:
        check(tuple(shape), dtype)
    count = 1
    for d in shape:
        count *= d
    offset = f.tell()
    need, have = count * dtype.itemsize, len(data) - offset
    if need != have:
        raise AudioInputError(
            f"{what}: the .npy header declares {list(shape)} {dtype} ({need} bytes) but {have} bytes follow it"
        )
    array = np.frombuffer(data, dtype, count, offset)
    return array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)


def discover(inputs: list[Path], accept: Callable[[Path], bool]) -> Iterator[tuple[Path, Path]]:
    """Expand files and folders (recursively) into (file, path relative to its root) pairs.

    A file given directly keeps only its name; a file found in a folder keeps its sub-path, so
    outputs can mirror the input tree (as DAC's CLI does). Hidden files and folders (`is_hidden`)
    are passed over. Missing paths are yielded as-is so the caller reports them with the other
    per-file errors.
    """
    for root in map(Path, inputs):
        if root.is_dir():
            if not os.access(root, os.R_OK | os.X_OK):
                raise AudioInputError(f"{root}: folder cannot be read (permission denied)")
            try:
                found = [p for p in _visible_files(root) if accept(p)]
            except OSError as e:
                raise AudioInputError(f"{root}: folder cannot be read ({e.strerror or e})") from None
            for p in found:
                yield p, p.relative_to(root)
        else:
            yield root, Path(root.name)


def is_hidden(rel: Path | PurePosixPath) -> bool:
    """A name in a folder walk that no user means as an input: a dotfile or dot-folder (macOS's
    `._x.wav` resource forks, `.DS_Store`, an editor's or this program's own temporary `.x.part.wav`)."""
    return any(part.startswith(".") for part in rel.parts)


def _visible_files(root: Path) -> list[Path]:
    """Every file under `root` that is not hidden (`is_hidden`), sorted: what a folder walk considers."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not is_hidden(p.relative_to(root)))


def skipped_note(root: Path, accept: Callable[[Path], bool]) -> str:
    """What a folder with no input holds instead, for its one-line error: the extensions passed over."""
    try:
        names = _visible_files(root)
    except OSError:
        return ""
    suffixes = sorted({p.suffix.lower() or "(none)" for p in names if not accept(p)})
    if not names:
        return " (it holds no files)"
    return f" ({len(names)} file(s) passed over by extension: {', '.join(suffixes[:8])})"


def is_audio_file(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_EXTENSIONS
