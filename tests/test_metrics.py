"""Quality metrics: blockwise STFT and SI-SDR equal their one-shot definitions, in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import recon_runtime.files.metrics as metrics
from recon_runtime.contract import EXPECTED_MEL
from recon_runtime.frontend import stft_window

RATE = 16000


def _one_shot_mrstft(reference: np.ndarray, estimate: np.ndarray) -> float:
    """The definition, all frames at once: periodic Hann, zero padding n_fft // 2 at both ends."""
    total = 0.0
    for n_fft, hop in metrics.MRSTFT_RESOLUTIONS:
        window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann

        def magnitude(x: np.ndarray, n_fft: int = n_fft, hop: int = hop, window: np.ndarray = window) -> np.ndarray:
            x = np.pad(x.astype(np.float64), (n_fft // 2, n_fft // 2))
            frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
            return np.abs(np.fft.rfft(frames * window, axis=-1))

        a, b = magnitude(reference), magnitude(estimate)
        convergence = np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-8)
        total += convergence + np.mean(np.abs(np.log(a + 1e-7) - np.log(b + 1e-7)))
    return float(total / len(metrics.MRSTFT_RESOLUTIONS))


def _one_shot_si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    ref = reference.astype(np.float64) - reference.mean()
    est = estimate.astype(np.float64) - estimate.mean()
    target = ref * (np.dot(est, ref) / (np.dot(ref, ref) + 1e-8))
    noise = est - target
    return float(10 * np.log10((np.dot(target, target) + 1e-8) / (np.dot(noise, noise) + 1e-8)))


def _pair(seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    reference = (0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    estimate = (0.9 * reference + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    return reference, estimate


def test_window_is_the_front_ends_periodic_hann() -> None:
    np.testing.assert_array_equal(metrics._hann(EXPECTED_MEL.n_fft), stft_window(EXPECTED_MEL))
    assert metrics._hann(512)[0] == 0.0 and metrics._hann(512)[-1] > 0.0  # periodic, not symmetric


@pytest.mark.parametrize("block_values", [None, 3 * 2048, 5000])
@pytest.mark.parametrize("seconds", [0.01, 0.3, 1.37])
def test_blockwise_mrstft_equals_the_one_shot_definition(
    block_values: int | None, seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    if block_values is not None:  # small blocks: many block edges, a short last block
        monkeypatch.setattr(metrics, "_BLOCK_VALUES", block_values)
    reference, estimate = _pair(seconds)
    expected = _one_shot_mrstft(reference, estimate)
    assert metrics.multi_resolution_stft(reference, estimate) == pytest.approx(expected, rel=1e-6)


def test_blockwise_si_sdr_equals_the_one_shot_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, estimate = _pair(1.37, seed=3)
    expected = _one_shot_si_sdr(reference, estimate)
    assert metrics.si_sdr(reference, estimate) == pytest.approx(expected, rel=1e-9)
    monkeypatch.setattr(metrics, "_SIGNAL_BLOCK", 1000)
    assert metrics.si_sdr(reference, estimate) == pytest.approx(expected, rel=1e-9)


def test_identical_signals_score_perfectly() -> None:
    reference, _ = _pair(0.5)
    assert metrics.multi_resolution_stft(reference, reference) == 0.0
    assert metrics.si_sdr(reference, reference) > 100


def test_unequal_lengths_are_refused() -> None:
    reference, estimate = _pair(0.5)
    with pytest.raises(ValueError, match="samples"):
        metrics.multi_resolution_stft(reference, estimate[:-1])


def test_memory_stays_bounded_on_a_10_minute_input() -> None:
    rng = np.random.default_rng(1)
    reference = rng.standard_normal(600 * RATE, dtype=np.float32) * np.float32(0.1)
    estimate = reference + rng.standard_normal(reference.size, dtype=np.float32) * np.float32(0.01)
    # All at once, the finest resolution alone built one float64 array of every windowed frame.
    n_fft, hop = metrics.MRSTFT_RESOLUTIONS[0]
    all_at_once = metrics._num_frames(reference.size, n_fft, hop) * n_fft * 8
    # Per block and per signal: windowed frames (8 B a value), their rfft (complex, n_fft/2 + 1 per
    # frame: about 8 B a value) and the magnitude (4 B a value); both signals' magnitudes are held.
    block_bytes = 8 * metrics._BLOCK_VALUES
    bound = 6 * block_bytes
    assert bound < all_at_once / 4  # the bound is meaningful for this input

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        mrstft = metrics.multi_resolution_stft(reference, estimate)
        mrstft_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        sdr = metrics.si_sdr(reference, estimate)
        sdr_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(
        f"10-minute input: mrstft peak {mrstft_peak / 2**20:.1f} MiB (bound {bound / 2**20:.0f} MiB, "
        f"all at once {all_at_once / 2**20:.0f} MiB for one signal at n_fft {n_fft}); "
        f"si_sdr peak {sdr_peak / 2**20:.1f} MiB"
    )
    assert np.isfinite(mrstft) and 19 < sdr < 21  # noise 20 dB below the signal
    assert mrstft_peak < bound
    assert sdr_peak < 3 * 8 * metrics._SIGNAL_BLOCK  # two float64 blocks of 8 B a sample, plus room


@pytest.mark.parametrize("level", [0.0, 0.1, -0.7])
def test_metrics_undefined_for_a_silent_or_constant_input_are_none_with_a_reason(level: float) -> None:
    from recon_runtime.frontend import prepare_waveform

    reference, _ = prepare_waveform(np.full(2 * RATE, level, np.float32), RATE)  # zero once the mean is removed
    _, estimate = _pair(2.0)
    scores = metrics.compare(reference, estimate)
    assert scores["mel_correlation"] is None and scores["mrstft"] is None and scores["si_sdr_db"] is None, scores
    assert "input is silent" in scores[metrics.UNDEFINED_REASON]
    assert np.isfinite(scores["log_mel_l1"]) and np.isfinite(scores["log_mel_rmse"])  # distances to the floor


def test_metrics_undefined_for_a_silent_reconstruction_are_none_with_a_reason() -> None:
    reference, _ = _pair(2.0)
    scores = metrics.compare(reference, np.zeros_like(reference))
    assert scores["mel_correlation"] is None and scores["si_sdr_db"] is None, scores
    assert "reconstruction is silent" in scores[metrics.UNDEFINED_REASON]
    assert np.isfinite(scores["mrstft"])  # against the input's spectrum: defined


def test_metrics_of_sound_have_no_reason_field() -> None:
    reference, estimate = _pair(1.0)
    scores = metrics.compare(reference, estimate)
    assert metrics.UNDEFINED_REASON not in scores
    assert all(np.isfinite(v) for v in scores.values()), scores
