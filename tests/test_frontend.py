"""The front end equals AudioLDM2's: checked against an independent torch reimplementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf

from recon_runtime.contract import FRAMING_TRAINING, MelSpec
from recon_runtime.frontend import log_mel, prepare_waveform

from .conftest import tone

torch = pytest.importorskip("torch", reason="the reference front end is written in torch")
librosa = pytest.importorskip("librosa")

MAX_ABS_DIFF = 1e-4  # log-mel units (nats)


def torch_reference_log_mel(wave: np.ndarray, pad: int = 512) -> np.ndarray:
    """AudioLDM2's STFT as the official code computes it: conv1d with a windowed Fourier basis.

    Written independently of recon_runtime: its own window, basis and framing.
    """
    n_fft, hop = 1024, 160
    x = torch.from_numpy(wave.astype(np.float64))[None, None]
    x = torch.nn.functional.pad(x, (pad, pad), mode="reflect")
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    real = (torch.cos(2 * math.pi * k * n / n_fft) * window)[:, None, :]
    imag = (-torch.sin(2 * math.pi * k * n / n_fft) * window)[:, None, :]
    re = torch.nn.functional.conv1d(x, real, stride=hop)
    im = torch.nn.functional.conv1d(x, imag, stride=hop)
    magnitude = torch.sqrt(re**2 + im**2)[0]  # [513, T]
    basis = torch.from_numpy(librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0, fmax=8000))
    mel = torch.matmul(basis.double(), magnitude)
    return torch.log(torch.clamp(mel, min=1e-5)).T.numpy()  # [T, 64]


def db_recipe(wave: np.ndarray) -> np.ndarray:
    """The widely copied, wrong recipe: power mel in dB with ref=max, frequency first."""
    s = librosa.feature.melspectrogram(y=wave, sr=16000, n_fft=1024, hop_length=160, n_mels=64, fmax=8000)
    return librosa.power_to_db(s, ref=np.max)  # [64, T]


def _signals() -> dict[str, np.ndarray]:
    from recon_export.signals import test_signal

    return {kind: test_signal(kind, 2.0, seed=7) for kind in ("speech", "music", "noise", "sweep")}


@pytest.fixture(scope="module")
def generated() -> dict[str, np.ndarray]:
    pytest.importorskip("recon_export.signals")
    return _signals()


def test_matches_torch_reference_on_generated_audio(generated: dict[str, np.ndarray]) -> None:
    for name, wave in generated.items():
        ours, ref = log_mel(wave), torch_reference_log_mel(wave)
        assert ours.shape == ref.shape == (1 + wave.size // 160, 64), name
        assert ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= MAX_ABS_DIFF, name


def test_matches_torch_reference_on_real_audio(real_speech, real_stereo) -> None:
    for path in (real_speech, real_stereo):
        audio, rate = sf.read(str(path), dtype="float32")
        wave, _ = prepare_waveform(audio, rate)
        ours, ref = log_mel(wave), torch_reference_log_mel(wave)
        assert np.abs(ours - ref).max() <= MAX_ABS_DIFF, path
        assert ours.max() > -5 and ours.min() >= math.log(1e-5) - 1e-6


def test_training_framing_uses_432_padding(generated: dict[str, np.ndarray]) -> None:
    wave = generated["music"]
    spec = MelSpec(framing=FRAMING_TRAINING)
    ours = log_mel(wave, spec)
    ref = torch_reference_log_mel(wave, pad=432)
    assert ours.shape[0] == wave.size // 160
    assert np.abs(ours - ref[: ours.shape[0]]).max() <= MAX_ABS_DIFF
    # the two framings differ by half a hop: not interchangeable
    assert np.abs(ours - log_mel(wave)[: ours.shape[0]]).max() > 0.1


def test_db_recipe_is_rejected_by_the_comparison(generated: dict[str, np.ndarray]) -> None:
    wave = generated["speech"]
    ref = torch_reference_log_mel(wave)
    wrong = db_recipe(wave)
    assert wrong.shape == ref.T.shape  # frequency-first: not even the right orientation
    assert np.abs(wrong.T - ref).max() > 100 * MAX_ABS_DIFF
    # even in natural-log units, power-with-ref-max is far off
    assert np.abs(wrong.T / (10 / math.log(10)) - ref).mean() > 1.0


def test_ten_seconds_give_1025_frames() -> None:
    assert log_mel(np.zeros(163840, np.float32)).shape == (1025, 64)


def test_silence_is_the_floor() -> None:
    mel = log_mel(np.zeros(16000, np.float32))
    assert np.allclose(mel, math.log(1e-5))


def test_prepare_waveform_mixes_resamples_and_normalises() -> None:
    rate = 44100
    left = tone(1.0, rate, 440, 0.8)
    stereo = np.stack([left, 0.5 * left], axis=1) + 0.1  # DC offset
    wave, gain = prepare_waveform(stereo, rate)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - 16000) <= 1
    assert np.abs(wave).max() == pytest.approx(0.5, abs=1e-3)
    assert abs(wave.mean()) < 1e-3
    restored = wave * gain
    assert np.abs(restored).max() == pytest.approx(np.abs(0.75 * left).max(), rel=0.02)


def test_prepare_waveform_keeps_silence_silent() -> None:
    wave, gain = prepare_waveform(np.zeros(1600, np.float32), 16000)
    assert np.all(wave == 0) and np.isfinite(gain)


@pytest.mark.parametrize(
    "bad", [np.array([np.nan, 0.0], np.float32), np.zeros(0, np.float32), np.zeros((2, 2, 2), np.float32)]
)
def test_prepare_waveform_rejects_bad_arrays(bad: np.ndarray) -> None:
    from recon_runtime.errors import AudioInputError

    with pytest.raises(AudioInputError):
        prepare_waveform(bad, 16000)
