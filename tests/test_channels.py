"""`--channels mix|each`: splitting, per-channel work, stacking back, one encoded clip per input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from recon_runtime.channels import (
    EACH,
    MIX,
    channel_count,
    decode_audio,
    encode_audio,
    encode_channels,
    is_mixed,
    map_channels,
    reconstruct_audio,
    split_channels,
    stack_channels,
)
from recon_runtime.encoded import EncodedAudio, decode_encoded
from recon_runtime.errors import AudioInputError

from .conftest import tone


def stereo(seconds: float = 0.5) -> np.ndarray:
    return np.stack([tone(seconds, 16000, 440, 0.4), tone(seconds, 16000, 880, 0.05)], axis=1)


def test_split_and_stack_are_inverse_in_soundfiles_layout() -> None:
    audio = np.stack([tone(0.1, freq=f) for f in (200, 300, 400)], axis=1)
    parts = split_channels(audio)
    assert [p.shape for p in parts] == [(1600,)] * 3 and all(p.flags.c_contiguous for p in parts)
    assert np.array_equal(stack_channels(parts), audio)
    mono = tone(0.1)
    assert np.array_equal(stack_channels(split_channels(mono)), mono)
    assert [channel_count(a) for a in (mono, audio, mono[:, None])] == [1, 3, 1]
    with pytest.raises(AudioInputError, match=r"\[samples\] or \[samples, channels\]"):
        channel_count(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="different lengths"):
        stack_channels([mono, mono[:-1]])


def test_mix_hands_over_the_whole_input_and_each_keeps_the_channel_count() -> None:
    audio = stereo()
    seen: list[tuple[int, ...]] = []

    def process(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        return (x.mean(axis=1) if x.ndim == 2 else x) * 2

    mixed = map_channels(audio, MIX, process)
    assert seen == [audio.shape] and mixed.shape == (audio.shape[0],)
    seen.clear()
    each = map_channels(audio, EACH, process)
    assert seen == [(audio.shape[0],)] * 2 and each.shape == audio.shape
    assert np.allclose(each, audio * 2)
    assert is_mixed(audio, MIX) and not is_mixed(audio, EACH) and not is_mixed(tone(0.1), MIX)
    with pytest.raises(ValueError, match="unknown channel mode 'both'; use mix, each"):
        map_channels(audio, "both", process)


def fake_encode(x: np.ndarray) -> EncodedAudio:
    """A stand-in encoder: the latent holds the channel's peak; the gain is 0.5 / peak (as prepare_waveform)."""
    x = x.mean(axis=1) if x.ndim == 2 else x
    peak = float(np.abs(x).max())
    return EncodedAudio(
        np.full((1, 8, -(-x.size // 640), 16), peak, np.float32), x.size, (0.5 / peak,), "f" * 16, input_channels=1
    )


def test_encode_each_writes_one_latent_per_channel_in_one_clip(tmp_path: Path) -> None:
    audio = stereo()
    clip = encode_channels(audio, EACH, fake_encode)
    assert clip.channels == 2 and clip.input_channels == 2 and len(clip.gain) == 2
    assert np.allclose(clip.latents[:, 0, 0, 0], [0.4, 0.05], atol=1e-3)
    path = tmp_path / "x.safetensors"
    clip.save(path)
    back = EncodedAudio.load(path)
    out = decode_encoded(back, lambda z, n: np.full(n, 0.5, np.float32))
    assert out.shape == audio.shape
    assert np.allclose(np.abs(out).max(axis=0), [0.5 / 0.4 * 0.5, 0.5 / 0.05 * 0.5], rtol=1e-2)
    mixed = encode_channels(audio, MIX, fake_encode)
    assert mixed.channels == 1 and mixed.input_channels == 2  # the summary can count it as mixed


def test_each_through_a_bundle_runs_every_channel_on_its_own(tiny_bundle: Path, tmp_path: Path) -> None:
    from recon_runtime import Reconstructor

    rec = Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32")
    path = tmp_path / "st.wav"
    sf.write(str(path), stereo(0.8), 16000, subtype="FLOAT")
    audio, rate = sf.read(str(path), dtype="float32")
    out = reconstruct_audio(rec, audio, rate, EACH)
    assert out.shape == audio.shape
    for c in range(2):
        np.testing.assert_array_equal(out[:, c], rec.reconstruct(audio[:, c], rate))
    peaks = np.abs(out).max(axis=0)
    assert peaks[0] > 2 * peaks[1]  # the quiet channel stays quiet (mixing would give both one level)
    np.testing.assert_array_equal(reconstruct_audio(rec, audio, rate, MIX), rec.reconstruct(audio, rate))

    clip = encode_audio(rec, audio, rate, EACH, sample=True, seed=4, source=str(path))
    assert (clip.channels, clip.input_channels, clip.input_sample_rate) == (2, 2, 16000)
    assert (clip.sampled, clip.seed, clip.bundle_fingerprint) == (True, 4, rec.contract.fingerprint)
    for c in range(2):
        np.testing.assert_array_equal(clip.latents[c], rec.encode(audio[:, c], rate, sample=True, seed=4))
    clip.save(tmp_path / "st.safetensors")
    back = decode_audio(rec, EncodedAudio.load(tmp_path / "st.safetensors"))
    assert back.shape == audio.shape
    mixed = encode_audio(rec, audio, rate)
    assert mixed.channels == 1 and mixed.input_channels == 2 and mixed.seed is None
    np.testing.assert_array_equal(mixed.latents[0], rec.encode(audio, rate))
    wave = decode_audio(rec, mixed)
    assert wave.shape == (audio.shape[0],)
    np.testing.assert_array_equal(
        wave, rec.decode(mixed.latents[0], num_samples=audio.shape[0]) * np.float32(mixed.gain[0])
    )
