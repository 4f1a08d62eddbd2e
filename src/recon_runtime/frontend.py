"""The AudioLDM2 front end: waveform preparation and the natural-log magnitude mel it was trained on.

Not the widely copied dB recipe (power, dB, ref=max, frequency-first): see docs/front-end.md.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

import numpy as np
import soxr
from scipy.signal import get_window

from .contract import EXPECTED_MEL, PEAK_EPS, MelSpec
from .errors import AudioInputError

_FRAMES_PER_BLOCK = 4096  # frames per STFT block: bounds memory on long inputs (~32 MB in float64)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Mix to mono.

    Args:
        audio: [samples] or [samples, channels] (soundfile's layout), any float or int dtype.
    Returns:
        float32 [samples] (float32 keeps long inputs light: a 10-minute file is 38 MB).
    """
    x = np.asarray(audio)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float64)
    elif x.ndim != 1:
        raise AudioInputError(f"audio must be [samples] or [samples, channels], got shape {x.shape}")
    return x.astype(np.float32, copy=False)


def prepare_waveform(audio: np.ndarray, sample_rate: int, mel: MelSpec = EXPECTED_MEL) -> tuple[np.ndarray, float]:
    """Mono, 16 kHz, mean removed, peak at 0.5: the waveform AudioLDM2 sees.

    Args:
        audio: [samples] or [samples, channels], any sample rate.
        sample_rate: rate of `audio` in Hz.
    Returns:
        (waveform float32 [samples_16k] in [-1, 1], gain) where `waveform * gain` restores the
        input level (the removed mean is not restored).
    """
    if sample_rate <= 0:
        raise AudioInputError(f"sample rate must be positive, got {sample_rate}")
    x = to_mono(audio)
    if x.size == 0:
        raise AudioInputError("audio has zero samples")
    if not np.isfinite(x).all():
        raise AudioInputError("audio contains NaN or infinite samples")
    level = 1.0  # the input is centred at 1/level: only samples near float32's limit need it
    y = _resample_and_centre(x, sample_rate, mel)  # a new array: the caller's audio is never modified
    if not np.isfinite(y).all():  # such samples overflowed the resampling filter or the mean removal
        level = float(np.abs(x).max())
        y = _resample_and_centre(x / np.float32(level), sample_rate, mel)
    x = y
    scale = float(np.abs(x).max()) * level + PEAK_EPS
    x *= np.float32(mel.peak_level * level / scale)
    np.clip(x, -1.0, 1.0, out=x)
    return x, scale / mel.peak_level


def _resample_and_centre(x: np.ndarray, sample_rate: int, mel: MelSpec) -> np.ndarray:
    """float32 mono at `mel.sample_rate` with its mean removed (a new array)."""
    if sample_rate != mel.sample_rate:
        x = soxr.resample(x, sample_rate, mel.sample_rate, quality="HQ").astype(np.float32, copy=False)
    return x - np.float32(x.mean(dtype=np.float64))


@lru_cache(maxsize=4)
def mel_basis(mel: MelSpec = EXPECTED_MEL) -> np.ndarray:
    """librosa's slaney mel filterbank, float64 [n_mels, n_fft // 2 + 1]."""
    import librosa  # imported lazily: librosa's import is slow and only this needs it

    return librosa.filters.mel(
        sr=mel.sample_rate,
        n_fft=mel.n_fft,
        n_mels=mel.n_mels,
        fmin=mel.f_min,
        fmax=mel.f_max,
        htk=mel.mel_scale == "htk",
        norm=mel.mel_norm,
        dtype=np.float64,
    )


@lru_cache(maxsize=4)
def stft_window(mel: MelSpec = EXPECTED_MEL) -> np.ndarray:
    """Periodic Hann window, float64 [win_length] (equals torch.hann_window)."""
    return get_window("hann", mel.win_length, fftbins=True).astype(np.float64)


def num_frames(num_samples: int, mel: MelSpec = EXPECTED_MEL) -> int:
    """Mel frames produced for `num_samples` samples at 16 kHz (never less than one)."""
    return max(1, mel.num_frames(num_samples))


def log_mel(waveform: np.ndarray, mel: MelSpec = EXPECTED_MEL) -> np.ndarray:
    """Natural-log magnitude mel spectrogram, time first.

    Args:
        waveform: float [samples] at `mel.sample_rate` (output of `prepare_waveform`).
        mel: front-end parameters; `mel.framing` picks the inference (pad 512, T = 1 + N // 160)
            or training (pad 432, T = N // 160) framing.
    Returns:
        float32 [T, n_mels], ln(max(mel, 1e-5)); silence is ln(1e-5) = -11.5129.
    """
    x = np.asarray(waveform)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if x.ndim != 1:
        raise AudioInputError(f"waveform must be 1-D, got shape {x.shape}")
    shortest = mel.n_fft - 2 * mel.pad + mel.hop_length  # so that at least one frame exists
    if x.size < shortest:
        x = np.pad(x, (0, shortest - x.size))
    padded = np.pad(x, (mel.pad, mel.pad), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, mel.n_fft)[:: mel.hop_length]
    frames = frames[: num_frames(x.size, mel)]
    window, basis = stft_window(mel), mel_basis(mel)
    out = np.empty((frames.shape[0], mel.n_mels), dtype=np.float32)
    for start in range(0, frames.shape[0], _FRAMES_PER_BLOCK):
        block = frames[start : start + _FRAMES_PER_BLOCK] * window  # float64 from here on
        magnitude = np.abs(np.fft.rfft(block, n=mel.n_fft, axis=-1))
        out[start : start + block.shape[0]] = np.log(np.maximum(magnitude @ basis.T, mel.mel_floor))
    return out


LOG_MEL_FLOOR_MARGIN: Final = 1.0
"""Nats below the floor (ln(mel_floor), -11.51) that a log-mel from elsewhere may still reach
(rounding, an edit) before it cannot be this front end's: its values never go below the floor."""


def log_mel_range_problem(mel: np.ndarray, spec: MelSpec = EXPECTED_MEL) -> str | None:
    """Why `mel` cannot be a log-mel of this front end, or None when its range is plausible.

    The front end takes ln(max(mel, 1e-5)), so its values never go below ln(1e-5) = -11.51; a mel
    in decibels (librosa.power_to_db: values down to -80 or -100, or further without top_db) goes
    far below it. The vocoder still runs on such a mel; its audio is then noise.
    """
    low = float(np.min(mel)) if np.size(mel) else 0.0
    if low >= spec.silence - LOG_MEL_FLOOR_MARGIN:
        return None
    return (
        f"log-mel values go down to {low:.1f}, below ln({spec.mel_floor:g}) = {spec.silence:.2f}, the floor of "
        "AudioLDM2's natural-log mel: this looks like a mel in dB (librosa.power_to_db); vocode expects "
        "the front end of docs/front-end.md (README: how to make one), so the audio will be noise"
    )
