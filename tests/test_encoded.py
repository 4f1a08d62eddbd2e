"""The encoded-audio file: round trips, refusals in one line, older `.npy` + sidecar pairs, bare pipeline latents."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recon_runtime import encoded as enc
from recon_runtime.encoded import (
    ENCODED_SUFFIX,
    FIELDS,
    FORMAT_MARKER,
    SUPPORTED_VERSIONS,
    EncodedAudio,
    bare_num_samples,
    decode_encoded,
    header_name,
    max_samples,
    read_latents,
)
from recon_runtime.errors import AudioInputError, BundleError, NumericalError

FINGERPRINT = "0123456789abcdef"
OTHER = "fedcba9876543210"


def clip(channels: int = 1, frames: int = 5, **kw: Any) -> EncodedAudio:
    rng = np.random.default_rng(channels * 100 + frames)
    values: dict[str, Any] = {
        "latents": rng.standard_normal((channels, 8, frames, 16)).astype(np.float32),
        "num_samples": frames * 640 - 100,
        "gain": tuple(0.25 * (c + 1) for c in range(channels)),
        "bundle_fingerprint": FINGERPRINT,
        "input_sample_rate": 44100,
        "input_channels": channels,
        "scaling_factor": 0.4110932946205139,
        "source": "in/ä b.wav",
    }
    values.update(kw)
    return EncodedAudio(**values)


def same(a: EncodedAudio, b: EncodedAudio) -> None:
    assert np.array_equal(a.latents, b.latents) and a.latents.dtype == np.float32
    assert a.fields() == b.fields()


def one_line(e: pytest.ExceptionInfo[BaseException], *parts: str) -> str:
    text = str(e.value)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


def metadata_of(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]


def rewrite(data: bytes, **changes: str) -> bytes:
    """The file with metadata keys changed (a valid safetensors file: what a tamperer would write)."""
    from safetensors.numpy import load, save

    meta = {**metadata_of(data), **changes}
    return save(load(data), meta)


# ---------------------------------------------------------------------- the object and its file
@pytest.mark.parametrize("channels", [1, 2])
def test_save_and_load_give_back_every_field_and_the_exact_latents(tmp_path: Path, channels: int) -> None:
    a = clip(channels, sampled=True, seed=7)
    path = tmp_path / f"x{ENCODED_SUFFIX}"
    a.save(path)
    b = EncodedAudio.load(path)
    same(a, b)
    assert b.channels == channels and b.gain == a.gain and b.sampled and b.seed == 7
    assert b.source == "in/ä b.wav" and b.format_version == SUPPORTED_VERSIONS[-1]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # one file, no temporary left


def test_the_file_is_plain_safetensors_a_pipeline_host_can_open() -> None:
    from safetensors.numpy import load

    a = clip(2)
    data = a.to_bytes()
    assert np.array_equal(load(data)["latents"], a.latents)  # [channels, 8, T, 16]: pipeline latents' layout
    meta = metadata_of(data)
    assert meta["format"] == FORMAT_MARKER
    assert {k: json.loads(v) for k, v in meta.items() if k in FIELDS} == a.fields()


def test_field_names_are_the_attributes_and_the_http_headers_the_server_sends_today() -> None:
    from recon_runtime.serving import protocol

    attributes = [f.name for f in dataclasses.fields(EncodedAudio) if f.name != "latents"]
    assert sorted(FIELDS) == sorted(attributes)
    wire = {  # the headers the server has always sent: derived from the field names, spelt as before
        protocol.H_NUM_SAMPLES: "X-Recon-Num-Samples",
        protocol.H_GAIN: "X-Recon-Gain",
        protocol.H_SAMPLE_RATE: "X-Recon-Sample-Rate",
        protocol.H_INPUT_RATE: "X-Recon-Input-Sample-Rate",
        protocol.H_SAMPLED: "X-Recon-Sampled",
        protocol.H_SEED: "X-Recon-Seed",
        protocol.H_FINGERPRINT: "X-Recon-Bundle-Fingerprint",
        protocol.H_SCALING: "X-Recon-Scaling-Factor",
        protocol.H_LATENT_SHAPE: "X-Recon-Latent-Shape",
        protocol.H_CHANNELS: "X-Recon-Channels",
        protocol.H_FORMAT: "X-Recon-Sample-Format",
        protocol.H_WINDOWS: "X-Recon-Windows",
    }
    assert list(wire) == list(wire.values()) and header_name(enc.INPUT_CHANNELS) == "X-Recon-Input-Channels"
    headers = clip(1, sampled=True, seed=3).headers()
    named = {getattr(protocol, n) for n in dir(protocol) if n.startswith("H_")}
    assert set(headers) <= named and len(headers) == len(FIELDS) - 1  # every field but the source
    assert headers[protocol.H_GAIN] == "0.25" and headers[protocol.H_SAMPLED] == "true"


def test_from_fields_reads_a_mono_row_and_a_stereo_one() -> None:
    a, b = clip(1), clip(2)
    row = {**a.fields(), enc.GAIN: 0.25, "path": "x.wav", "duration_s": 1.0}  # a dataset row: scalar gain, more columns
    same(EncodedAudio.from_fields(a.latents, row), a)
    same(EncodedAudio.from_fields(b.latents, b.fields()), b)
    with pytest.raises(AudioInputError, match="lacks num_samples"):
        EncodedAudio.from_fields(a.latents, {enc.GAIN: 1.0})


def test_stack_and_split_are_inverse_and_refuse_channels_of_other_clips() -> None:
    a = clip(3)
    parts = a.split()
    assert [p.channels for p in parts] == [1, 1, 1] and [p.gain for p in parts] == [(0.25,), (0.5,), (0.75,)]
    same(EncodedAudio.stack(parts), a)
    with pytest.raises(ValueError, match="num_samples"):
        EncodedAudio.stack([parts[0], dataclasses.replace(parts[1], num_samples=10)])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"latents": np.zeros((8, 5, 16), np.float32)}, "latents must be [channels, 8, frames, 16]"),
        ({"latents": np.zeros((1, 8, 0, 16), np.float32)}, "latents must be"),
        ({"latents": np.zeros((1, 8, 5, 16), np.int32)}, "floating point"),
        ({"latents": np.full((1, 8, 5, 16), np.nan, np.float32)}, "NaN"),
        ({"gain": (1.0, 1.0)}, "2 gain(s) for 1 channel(s)"),
        ({"gain": (0.0,)}, "finite and positive"),
        ({"gain": (float("inf"),)}, "finite and positive"),
        ({"num_samples": 0}, "num_samples must be at least 1"),
        ({"num_samples": 5 * 640 + 33}, "longer than 5 latent frames decode to (at most 3232)"),
        ({"num_samples": 10.5}, "num_samples must be an integer"),
        ({"num_samples": True}, "num_samples must be an integer"),
        ({"sampled": "yes"}, "sampled must be true or false"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"scaling_factor": float("nan")}, "scaling_factor must be a finite number"),
        ({"format_version": 99}, "format version 99; this build reads version 1"),
    ],
)
def test_a_clip_with_a_bad_field_is_refused_in_one_line(change: dict[str, Any], message: str) -> None:
    with pytest.raises(AudioInputError) as e:
        clip(**change)
    one_line(e, message)


def test_the_longest_length_is_the_vocoders_last_samples() -> None:
    assert max_samples(5) == 5 * 640 + 32
    assert clip(num_samples=max_samples(5)).num_samples == 3232


# ---------------------------------------------------------------------- files that are refused
def test_an_unknown_version_is_refused_naming_the_file_and_the_versions_read(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    path.write_bytes(rewrite(clip().to_bytes(), format_version="2"))
    with pytest.raises(AudioInputError) as e:
        EncodedAudio.load(path)
    one_line(e, str(path), "format version 2", "this build reads version 1")
    path.write_bytes(rewrite(clip().to_bytes(), format_version="null"))
    with pytest.raises(AudioInputError, match="format version None"):
        EncodedAudio.load(path)


def test_every_truncation_of_a_file_is_one_line_naming_it(tmp_path: Path) -> None:
    data = clip().to_bytes()
    path = tmp_path / "cut.safetensors"
    for size in sorted({0, 1, 7, 8, 9, 50, len(data) // 2, len(data) - 1} | set(range(0, len(data), 97))):
        path.write_bytes(data[:size])
        with pytest.raises(AudioInputError) as e:
            EncodedAudio.load(path)
        one_line(e, str(path))
    path.write_bytes(data + b"\0" * 4)  # padded: the tensors no longer cover the file
    with pytest.raises(AudioInputError) as e:
        EncodedAudio.load(path)
    one_line(e, str(path), "damaged")


def test_a_changed_latent_or_field_is_refused_by_the_recorded_sha256(tmp_path: Path) -> None:
    data = bytearray(clip().to_bytes())
    data[-3] ^= 0x40  # one bit of the last latent
    with pytest.raises(AudioInputError) as e:
        EncodedAudio.from_bytes(bytes(data), "x.safetensors")
    one_line(e, "x.safetensors", "SHA-256")
    louder = rewrite(clip().to_bytes(), gain="[2.0]")  # a valid file whose gain was edited
    with pytest.raises(AudioInputError, match="SHA-256"):
        EncodedAudio.from_bytes(louder)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "not an encoded-audio file"),
        (b"\x93NUMPY\x01\x00" + b" " * 200, "not an encoded-audio file"),
        ((5).to_bytes(8, "little") + b"nope!", "header is not JSON"),
        ((2).to_bytes(8, "little") + b"[]", "without string metadata"),
        ((2**40).to_bytes(8, "little") + b"{}", "declare a 1099511627776-byte header"),
    ],
)
def test_what_is_not_an_encoded_file_is_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(AudioInputError) as e:
        EncodedAudio.from_bytes(data, "upload")
    one_line(e, "upload", message)


def test_a_safetensors_file_of_something_else_is_refused() -> None:
    from safetensors.numpy import save

    weights = save({"weight": np.zeros((2, 2), np.float32)}, {"format": "pt"})
    with pytest.raises(AudioInputError, match="not encoded audio"):
        EncodedAudio.from_bytes(weights)
    data = clip().to_bytes()
    meta = metadata_of(data)
    extra = save({"latents": clip().latents, "other": np.zeros(1, np.float32)}, meta)
    with pytest.raises(AudioInputError, match="expected only 'latents'"):
        EncodedAudio.from_bytes(extra)
    half = save({"latents": clip().latents.astype(np.float16)}, meta)
    with pytest.raises(AudioInputError, match="float16, expected float32"):
        EncodedAudio.from_bytes(half)
    bad_field = save({"latents": clip().latents}, {**meta, "num_samples": "{oops"})
    with pytest.raises(AudioInputError, match="field num_samples is not valid JSON"):
        EncodedAudio.from_bytes(bad_field)


def test_missing_and_folder_paths_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(AudioInputError, match="no such file"):
        EncodedAudio.load(tmp_path / "none.safetensors")
    with pytest.raises(AudioInputError, match="is a folder"):
        EncodedAudio.load(tmp_path)


def test_the_reader_imports_no_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from recon_runtime.encoded import EncodedAudio\n"
        "a = EncodedAudio(np.zeros((1, 8, 2, 16), np.float32), 1280, (1.0,), None)\n"
        "EncodedAudio.from_bytes(a.to_bytes())\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'fastapi', 'ray') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------- any latents file
def test_a_safetensors_file_is_read_and_checked_against_the_bundle(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    clip(2).save(path)
    (read,) = read_latents(path, FINGERPRINT)
    same(read, clip(2))
    with pytest.raises(BundleError) as e:
        read_latents(path, OTHER)
    one_line(e, str(path), "another model", FINGERPRINT, OTHER)
    with pytest.raises(AudioInputError, match="records its own length"):
        read_latents(path, FINGERPRINT, seconds=1.0)


def test_an_older_npy_and_sidecar_pair_reads_as_the_same_clip(tmp_path: Path) -> None:
    from recon_runtime.files.latents import save_latents

    z = clip().latents[0]
    npy = tmp_path / "old.npy"
    save_latents(
        npy, z, Path("in.wav"), sample_rate=16000, num_samples=3000, input_sample_rate=48000, gain=0.4,
        sample=True, seed=5, fingerprint=FINGERPRINT, scaling_factor=0.41,
    )  # fmt: skip
    (read,) = read_latents(npy, FINGERPRINT)
    assert np.array_equal(read.latents, z[None]) and read.channels == 1
    assert (read.num_samples, read.gain, read.sampled, read.seed) == (3000, (0.4,), True, 5)
    assert (read.bundle_fingerprint, read.input_sample_rate, read.source) == (FINGERPRINT, 48000, "in.wav")
    with pytest.raises(BundleError, match="another model"):
        read_latents(npy, OTHER)  # today's sidecar reader decides
    with pytest.raises(AudioInputError, match="sidecar records the length"):
        read_latents(npy, FINGERPRINT, num_samples=100)
    np.save(npy, z * 2)  # the .npy replaced after its sidecar was written
    with pytest.raises(AudioInputError, match="sidecar does not belong"):
        read_latents(npy, FINGERPRINT)


@pytest.mark.parametrize(
    "shape, clips", [((8, 6, 16), 1), ((1, 8, 6, 16), 1), ((3, 8, 6, 16), 3)], ids=["one", "batch-1", "batch-3"]
)
def test_bare_pipeline_latents_decode_to_their_whole_length_or_the_length_asked(
    tmp_path: Path, shape: tuple[int, ...], clips: int
) -> None:
    z = np.random.default_rng(0).standard_normal(shape).astype(np.float16)  # a pipeline's fp16 output
    path = tmp_path / "gen.npy"
    np.save(path, z)
    read = read_latents(path, FINGERPRINT)
    assert len(read) == clips and all(c.num_samples == 6 * 640 for c in read)
    assert all(c.gain == (1.0,) and c.bundle_fingerprint is None and c.channels == 1 for c in read)
    assert np.array_equal(np.stack([c.latents[0] for c in read]), z.reshape(clips, 8, 6, 16).astype(np.float32))
    assert [c.num_samples for c in read_latents(path, FINGERPRINT, seconds=0.2)] == [3200] * clips
    assert [c.num_samples for c in read_latents(path, FINGERPRINT, num_samples=3871)] == [3871] * clips


@pytest.mark.parametrize("shape", [(8, 6), (4, 6, 16), (8, 6, 8), (2, 3, 8, 6, 16), (8, 0, 16), ()])
def test_bare_latents_of_a_wrong_shape_say_which_shapes_decode(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, np.float32))
    with pytest.raises(AudioInputError) as e:
        read_latents(path, FINGERPRINT)
    one_line(e, str(path), "[8, frames, 16] or [batch, 8, frames, 16]", f"got {list(shape)}")


def test_other_latents_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AudioInputError, match=r"not a latents file \(expected .safetensors or .npy\)"):
        read_latents(tmp_path / "x.wav", FINGERPRINT)
    path = tmp_path / "pickle.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(AudioInputError, match="not a readable .npy"):
        read_latents(path, FINGERPRINT)


@pytest.mark.parametrize(
    "seconds, num_samples, message",
    [
        (1.0, 100, "--seconds or --num-samples, not both"),
        (0.0, None, "--seconds must be a positive number"),
        (float("nan"), None, "--seconds must be a positive number"),
        (None, 0, "--num-samples 0 is shorter than one sample"),
        (None, 6 * 640 + 33, "longer than 6 latent frames decode to (at most 3872 samples"),
        (0.25, None, "--seconds 0.25 (4000 samples) is longer"),
    ],
)
def test_a_bad_length_for_bare_latents_is_one_line(
    seconds: float | None, num_samples: int | None, message: str
) -> None:
    with pytest.raises(AudioInputError) as e:
        bare_num_samples(6, seconds, num_samples)
    one_line(e, message)


def test_seconds_are_truncated_to_samples_as_the_pipelines_do() -> None:
    assert bare_num_samples(250, 10.0, None) == 160000
    assert bare_num_samples(250, 9.99995, None) == 159999  # int(seconds * rate), not round()
    assert bare_num_samples(250, None, None) == 160000


# ---------------------------------------------------------------------- decoding a clip
def test_decode_encoded_restores_each_channels_level_and_length() -> None:
    a = clip(2)
    calls: list[tuple[Any, int]] = []

    def fake(z: np.ndarray, n: int) -> np.ndarray:
        calls.append((z.shape, n))
        return np.full(n, float(z[0, 0, 0]), np.float32)

    out = decode_encoded(a, fake)
    assert calls == [((8, 5, 16), a.num_samples)] * 2
    assert out.shape == (a.num_samples, 2) and out.dtype == np.float32
    assert np.allclose(out[0], [a.latents[0, 0, 0, 0] * 0.25, a.latents[1, 0, 0, 0] * 0.5])
    mono = decode_encoded(clip(1), fake)
    assert mono.shape == (clip(1).num_samples,)
    with pytest.raises(NumericalError, match="past float32's range"):
        decode_encoded(clip(1, gain=(1e38,)), lambda z, n: np.full(n, 10.0, np.float32))


def test_an_encoded_clip_decodes_through_a_bundle_as_the_runtime_decodes_its_latents(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from recon_runtime import Reconstructor

    from .conftest import tone

    rec = Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32")
    audio = np.stack([tone(0.7, 16000, 440, 0.3), tone(0.7, 16000, 660, 0.05)], axis=1)
    parts = []
    for c in range(2):
        feats = rec.features(audio[:, c], 16000)
        z = rec.encode_features(feats)
        parts.append(EncodedAudio(z[None], feats.num_samples, (feats.gain,), rec.contract.fingerprint))
    path = tmp_path / "stereo.safetensors"
    EncodedAudio.stack(parts).save(path)
    (read,) = read_latents(path, rec.contract.fingerprint)
    out = decode_encoded(read, lambda z, n: rec.decode(z, num_samples=n))
    assert out.shape == audio.shape
    for c, part in enumerate(parts):
        want = rec.decode(part.latents[0], num_samples=part.num_samples) * np.float32(part.gain[0])
        np.testing.assert_array_equal(out[:, c], want)
    peaks = np.abs(out).max(axis=0)
    assert peaks[0] > 2 * peaks[1]  # each channel keeps its own level


def test_a_large_safetensors_file_of_something_else_is_refused_after_its_header_alone(tmp_path: Path) -> None:
    """Model weights given to decode by mistake: refused from their header, never read into memory whole."""
    import tracemalloc

    from safetensors.numpy import save

    path = tmp_path / "unet.safetensors"
    path.write_bytes(save({"weight": np.zeros(4, np.float32)}, {"format": "pt"}))
    with open(path, "r+b") as f:
        f.truncate(64 << 20)  # 64 MiB (sparse): what follows the header is never needed
    tracemalloc.start()
    try:
        with pytest.raises(AudioInputError, match="not encoded audio"):
            EncodedAudio.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
