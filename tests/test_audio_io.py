"""Output files: written atomically, with the permissions any new file gets under the umask."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recon_runtime.errors import OutputError
from recon_runtime.files.audio import atomic_path, save_array, write_audio

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Set the process umask for one test and restore the previous one afterwards."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


def _reference_mode(folder: Path) -> int:
    """What a plain open() gives a new file here (umask and any default ACL of the folder)."""
    probe = folder / "probe"
    probe.write_bytes(b"")
    mode = _mode(probe)
    probe.unlink()
    return mode


def test_outputs_get_the_umask_permissions(umask: int, tmp_path: Path) -> None:
    expected = 0o666 & ~umask  # 0644 under 022, 0640 under 027
    assert _reference_mode(tmp_path) == expected
    audio, npy, text = tmp_path / "a" / "out.wav", tmp_path / "b" / "z.npy", tmp_path / "c" / "m.json"

    write_audio(audio, np.zeros(1600, dtype=np.float32), 16000)
    save_array(npy, np.ones((8, 4, 16), dtype=np.float32))
    with atomic_path(text) as tmp:
        tmp.write_text("{}")

    assert {p.name: oct(_mode(p)) for p in (audio, npy, text)} == {p.name: oct(expected) for p in (audio, npy, text)}
    for p in (audio, npy, text):
        assert _leftovers(p.parent) == []


def test_pcm16_output_and_replacing_a_file_also_get_the_umask_permissions(umask: int, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    out.write_bytes(b"old")
    out.chmod(0o600)  # a replaced output takes the new file's mode, like any freshly written file
    write_audio(out, np.zeros(160, dtype=np.float32), 16000, "pcm16")
    assert _mode(out) == 0o666 & ~umask


def test_a_failing_block_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_block_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    out.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert out.read_text() == "previous"
    assert _leftovers(tmp_path) == []


def test_failing_audio_and_array_writes_leave_no_file(tmp_path: Path) -> None:
    wav, npy = tmp_path / "bad.wav", tmp_path / "bad.npy"
    with pytest.raises(Exception):  # noqa: B017 - libsndfile's own error type for a rate of 0
        write_audio(wav, np.zeros(160, dtype=np.float32), 0)
    with pytest.raises(ValueError):  # object arrays would need pickle, which save_array refuses
        save_array(npy, np.array([{"a": 1}], dtype=object))
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_output_folder_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write output"):
        write_audio(blocker / "x.wav", np.zeros(160, dtype=np.float32), 16000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_temporary_names_never_collide(tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    with atomic_path(out) as first, atomic_path(out) as second:
        assert first != second and first.exists() and second.exists()
        first.write_text("1")
        second.write_text("2")
    assert out.read_text() == "1"  # the outer block finished last
    assert _leftovers(tmp_path) == []


def test_array_bytes_are_checked_from_the_header_before_anything_is_allocated() -> None:
    import io

    from numpy.lib import format as npy_format

    from recon_runtime.errors import AudioInputError
    from recon_runtime.files.audio import read_array_bytes

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    a = np.arange(24, dtype=">f8").reshape(2, 3, 4)
    for arr in (a, np.asfortranarray(a), a.astype(np.float16)):
        got = read_array_bytes(npy(arr), "x")
        assert got.dtype == arr.dtype and np.array_equal(got, arr)
    seen: list[tuple] = []

    def refuse(shape: tuple[int, ...], dtype: np.dtype) -> None:
        seen.append((shape, dtype.str))
        raise ValueError("too big")

    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (8, 10**9, 16)})
    with pytest.raises(ValueError, match="too big"):  # the check sees the declared shape; nothing is read
        read_array_bytes(buf.getvalue(), "x", refuse)
    assert seen == [((8, 10**9, 16), "<f4")]
    with pytest.raises(AudioInputError, match="declares .* but 0 bytes follow"):
        read_array_bytes(buf.getvalue(), "x")
    with pytest.raises(AudioInputError, match="x: not a readable .npy array"):
        read_array_bytes(b"PK\x03\x04 a zip", "x")
    head = b"{'descr': '<f4', 'fortran_order': (\n"  # an open bracket: numpy's parser raised tokenize's TokenError
    cut = b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head
    with pytest.raises(AudioInputError, match="x: not a readable .npy array"):
        read_array_bytes(cut, "x")
    with pytest.raises(AudioInputError, match="objects"):
        read_array_bytes(npy(np.zeros(3)).replace(b"'<f8'", b"'|O' "), "x")
