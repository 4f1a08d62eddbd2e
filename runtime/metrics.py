"""Reconstruction quality metrics between an input and its reconstruction, both at 16 kHz."""

from __future__ import annotations

from typing import Final

import numpy as np

from .contract import EXPECTED_MEL, MelSpec
from .frontend import log_mel

MRSTFT_RESOLUTIONS: Final = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop)
_EPS: Final = 1e-8


def _stft_magnitude(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    x = np.pad(x.astype(np.float64), (n_fft // 2, n_fft // 2), mode="constant")
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=-1))


def multi_resolution_stft(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean over resolutions of spectral convergence + log-magnitude L1 (lower is better)."""
    total = 0.0
    for n_fft, hop in MRSTFT_RESOLUTIONS:
        a, b = _stft_magnitude(reference, n_fft, hop), _stft_magnitude(estimate, n_fft, hop)
        convergence = np.linalg.norm(a - b) / (np.linalg.norm(a) + _EPS)
        log_l1 = np.mean(np.abs(np.log(a + 1e-7) - np.log(b + 1e-7)))
        total += convergence + log_l1
    return float(total / len(MRSTFT_RESOLUTIONS))


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (higher is better)."""
    ref = reference.astype(np.float64) - reference.mean()
    est = estimate.astype(np.float64) - estimate.mean()
    target = ref * (np.dot(est, ref) / (np.dot(ref, ref) + _EPS))
    noise = est - target
    return float(10 * np.log10((np.dot(target, target) + _EPS) / (np.dot(noise, noise) + _EPS)))


def compare(reference: np.ndarray, estimate: np.ndarray, mel: MelSpec = EXPECTED_MEL) -> dict[str, float]:
    """All metrics for two 16 kHz waveforms of equal length.

    Returns:
        log_mel_l1 and log_mel_rmse (nats), mel_correlation (Pearson, on log-mel),
        mrstft (lower is better), si_sdr_db.
    """
    n = min(reference.size, estimate.size)
    reference, estimate = reference[:n], estimate[:n]
    ma, mb = log_mel(reference, mel), log_mel(estimate, mel)
    diff = ma - mb
    da, db = ma - ma.mean(), mb - mb.mean()
    corr = float(np.sum(da * db) / (np.sqrt(np.sum(da * da) * np.sum(db * db)) + _EPS))
    return {
        "log_mel_l1": float(np.mean(np.abs(diff))),
        "log_mel_rmse": float(np.sqrt(np.mean(diff**2))),
        "mel_correlation": corr,
        "mrstft": multi_resolution_stft(reference, estimate),
        "si_sdr_db": si_sdr(reference, estimate),
    }
