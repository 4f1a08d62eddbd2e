"""Reconstruction quality metrics between an input and its reconstruction, both at 16 kHz."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Final

import numpy as np
from scipy.signal import get_window

from ..contract import EXPECTED_MEL, MelSpec
from ..frontend import log_mel

MRSTFT_RESOLUTIONS: Final = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop)
_EPS: Final = 1e-8
_LOG_FLOOR: Final = 1e-7
# Samples of framed signal per STFT block (frames per block = this // n_fft). Each block holds, per
# signal, the windowed frames (8 bytes a value), their spectrum (complex, half as many values) and
# its magnitude, so a block costs a few tens of MB whatever the input length; all at once, a
# 10-minute input took about 1 GB over the three resolutions.
_BLOCK_VALUES: Final = 1 << 20
_SIGNAL_BLOCK: Final = 1 << 20  # samples per block for SI-SDR's sums
UNDEFINED_REASON: Final = "undefined_reason"  # why compare() left metrics None (only then present)


@lru_cache(maxsize=8)
def _hann(n_fft: int) -> np.ndarray:
    """Periodic Hann window, float64 [n_fft]: the window of the front end (frontend.stft_window)."""
    window = get_window("hann", n_fft, fftbins=True).astype(np.float64)
    window.flags.writeable = False
    return window


def _num_frames(num_samples: int, n_fft: int, hop: int) -> int:
    """Frames of a signal zero-padded by n_fft // 2 on both sides (and to at least n_fft)."""
    padded = max(num_samples + 2 * (n_fft // 2), n_fft)
    return 1 + (padded - n_fft) // hop


def _stft_block(x: np.ndarray, n_fft: int, hop: int, first: int, count: int) -> np.ndarray:
    """|STFT| of frames [first, first + count) of `x` zero-padded by n_fft // 2 on both sides.

    Only this block's samples are copied (in float64), never the whole padded signal.

    Returns:
        float64 [count, n_fft // 2 + 1].
    """
    pad = n_fft // 2
    start = first * hop - pad  # in `x`'s coordinates; may be negative (left padding)
    length = (count - 1) * hop + n_fft
    segment = np.zeros(length, dtype=np.float64)
    lo, hi = max(start, 0), min(start + length, x.size)
    if hi > lo:
        segment[lo - start : hi - start] = x[lo:hi]
    frames = np.lib.stride_tricks.sliding_window_view(segment, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * _hann(n_fft), axis=-1))


def _stft_distance(reference: np.ndarray, estimate: np.ndarray, n_fft: int, hop: int) -> float:
    """Spectral convergence + mean log-magnitude L1 at one resolution, accumulated over blocks."""
    total = _num_frames(reference.size, n_fft, hop)
    per_block = max(1, _BLOCK_VALUES // n_fft)
    diff_sq = ref_sq = log_l1 = 0.0
    for first in range(0, total, per_block):
        count = min(per_block, total - first)
        a = _stft_block(reference, n_fft, hop, first, count)
        b = _stft_block(estimate, n_fft, hop, first, count)
        diff_sq += float(np.sum(np.square(a - b)))
        ref_sq += float(np.sum(np.square(a)))
        np.add(a, _LOG_FLOOR, out=a)
        np.add(b, _LOG_FLOOR, out=b)
        np.log(a, out=a)
        np.log(b, out=b)
        np.subtract(a, b, out=a)
        log_l1 += float(np.sum(np.abs(a, out=a)))
    convergence = np.sqrt(diff_sq) / (np.sqrt(ref_sq) + _EPS)
    return float(convergence + log_l1 / (total * (n_fft // 2 + 1)))


def multi_resolution_stft(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean over resolutions of spectral convergence + log-magnitude L1 (lower is better).

    Periodic Hann windows, frames zero-padded by n_fft // 2 at both ends; computed in blocks of
    frames, so memory does not grow with the input's length.

    Args:
        reference, estimate: float [samples] at 16 kHz, equal length.
    """
    reference, estimate = np.asarray(reference).ravel(), np.asarray(estimate).ravel()
    if reference.size != estimate.size:
        raise ValueError(f"reference has {reference.size} samples, estimate {estimate.size}")
    total = sum(_stft_distance(reference, estimate, n_fft, hop) for n_fft, hop in MRSTFT_RESOLUTIONS)
    return float(total / len(MRSTFT_RESOLUTIONS))


def _centred_block(x: np.ndarray, start: int, mean: float) -> np.ndarray:
    """float64 copy of x[start : start + _SIGNAL_BLOCK] with `mean` removed."""
    block = x[start : start + _SIGNAL_BLOCK].astype(np.float64)
    block -= mean
    return block


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (higher is better).

    Means removed; sums taken in float64 over blocks of samples (no whole-signal float64 copies).
    """
    reference, estimate = np.asarray(reference).ravel(), np.asarray(estimate).ravel()
    if reference.size != estimate.size:
        raise ValueError(f"reference has {reference.size} samples, estimate {estimate.size}")
    ref_mean, est_mean = float(reference.mean()), float(estimate.mean())
    starts = range(0, reference.size, _SIGNAL_BLOCK)
    ref_energy = cross = 0.0
    for s in starts:
        ref, est = _centred_block(reference, s, ref_mean), _centred_block(estimate, s, est_mean)
        ref_energy += float(np.dot(ref, ref))
        cross += float(np.dot(est, ref))
        del ref, est  # freed before the next block is made
    alpha = cross / (ref_energy + _EPS)
    noise_energy = 0.0
    for s in starts:
        ref, est = _centred_block(reference, s, ref_mean), _centred_block(estimate, s, est_mean)
        est -= np.multiply(ref, alpha, out=ref)  # est - target: the noise
        noise_energy += float(np.dot(est, est))
        del ref, est
    target_energy = alpha * alpha * ref_energy
    return float(10 * np.log10((target_energy + _EPS) / (noise_energy + _EPS)))


def _silent(log_mel_image: np.ndarray, mel: MelSpec) -> bool:
    """True when a log-mel is at the front end's floor everywhere: what the model sees is silence.

    A prepared waveform of an all-zero or constant input is zero (its mean is removed), and an input
    so quiet that no mel bin rises above the floor has no spectrum or energy worth comparing either.
    """
    return bool(log_mel_image.max() <= np.float32(np.log(mel.mel_floor)))


def compare(reference: np.ndarray, estimate: np.ndarray, mel: MelSpec = EXPECTED_MEL) -> dict[str, float | str | None]:
    """All metrics for two 16 kHz waveforms of equal length.

    Metrics that are undefined for the pair are None, and UNDEFINED_REASON says why: for a silent
    reference (its log-mel at the floor everywhere, as for an all-zero or constant input) the mel
    correlation (no variance), the STFT distance (its spectral convergence divides by the
    reference's spectrum) and SI-SDR (no reference energy); for a silent estimate the mel
    correlation and SI-SDR. The log-mel L1 and RMSE are always defined.

    Returns:
        log_mel_l1 and log_mel_rmse (nats), mel_correlation (Pearson, on log-mel),
        mrstft (lower is better), si_sdr_db; UNDEFINED_REASON only when one of them is None.
    """
    n = min(reference.size, estimate.size)
    reference, estimate = reference[:n], estimate[:n]
    ma, mb = log_mel(reference, mel), log_mel(estimate, mel)
    diff = ma - mb
    scores: dict[str, float | str | None] = {
        "log_mel_l1": float(np.mean(np.abs(diff))),
        "log_mel_rmse": float(np.sqrt(np.mean(diff**2))),
        "mel_correlation": None,
        "mrstft": None,
        "si_sdr_db": None,
    }
    if _silent(ma, mel):
        scores[UNDEFINED_REASON] = (
            "the input is silent (its log-mel is at the floor everywhere): mel_correlation, mrstft and "
            "si_sdr_db compare with its variance, spectrum and energy, which are zero"
        )
        return scores
    scores["mrstft"] = multi_resolution_stft(reference, estimate)
    if _silent(mb, mel):
        scores[UNDEFINED_REASON] = (
            "the reconstruction is silent (its log-mel is at the floor everywhere): mel_correlation and "
            "si_sdr_db need its variance and energy, which are zero"
        )
        return scores
    da, db = ma - ma.mean(), mb - mb.mean()
    scores["mel_correlation"] = float(np.sum(da * db) / (np.sqrt(np.sum(da * da) * np.sum(db * db)) + _EPS))
    scores["si_sdr_db"] = si_sdr(reference, estimate)
    return scores


def mean_over_channels(each: Sequence[Mapping[str, float | str | None]]) -> dict[str, float | str | None]:
    """One file's metrics from its channels' (`--channels each`): the mean of each metric, None where
    any channel leaves it undefined (a mean over the rest would pass for the file's), with the
    undefined channels' reasons, each prefixed by its channel number."""
    scores: dict[str, float | str | None] = {}
    for key in each[0]:
        if key == UNDEFINED_REASON:
            continue
        values = [c.get(key) for c in each]
        scores[key] = None if any(v is None for v in values) else float(np.mean(values))
    reasons = [f"channel {i}: {c[UNDEFINED_REASON]}" for i, c in enumerate(each) if c.get(UNDEFINED_REASON)]
    if reasons:
        scores[UNDEFINED_REASON] = "; ".join(reasons)
    return scores
