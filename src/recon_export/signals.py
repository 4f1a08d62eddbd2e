"""Generated test audio: realistic spectra for validation and calibration, no files needed."""

from __future__ import annotations

from typing import Final

import numpy as np

from recon_runtime.contract import SAMPLE_RATE

SIGNAL_KINDS: Final = ("speech", "music", "noise", "sweep", "silence")


def _speech_like(n: int, rng: np.random.Generator) -> np.ndarray:
    """Voiced syllables: a gliding harmonic source shaped by moving formants, with pauses."""
    t = np.arange(n) / SAMPLE_RATE
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t) + 15 * rng.standard_normal()
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    out = np.zeros(n)
    for k in range(1, 30):
        f = k * f0
        formants = sum(np.exp(-((f - c) ** 2) / (2 * 120.0**2)) for c in (500 + 200 * np.sin(3 * t), 1500, 2500))
        out += (formants + 0.02) / k * np.sin(k * phase)
    syllables = 0.5 * (1 + np.sign(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6))))
    return out * syllables + 0.01 * rng.standard_normal(n)


def _music_like(n: int, rng: np.random.Generator) -> np.ndarray:
    """Plucked notes of a chord progression with decaying harmonics, and a soft beat."""
    t = np.arange(n) / SAMPLE_RATE
    out = np.zeros(n)
    note_len = int(0.25 * SAMPLE_RATE)
    for start in range(0, n, note_len):
        f = 220.0 * 2 ** (rng.integers(0, 24) / 12)
        seg = slice(start, min(n, start + 4 * note_len))
        tt = t[seg] - t[start]
        env = np.exp(-3.0 * tt)
        out[seg] += env * sum(np.sin(2 * np.pi * k * f * tt) / k**1.5 for k in range(1, 8))
    beat = (np.sin(2 * np.pi * 2 * t) > 0.95) * rng.standard_normal(n) * 0.3
    return out + beat


def _pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    return np.fft.irfft(spectrum / np.sqrt(freqs), n)


def _sweep(n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    duration = max(t[-1], 1e-3)
    f0, f1 = 50.0, 7500.0
    phase = 2 * np.pi * f0 * duration / np.log(f1 / f0) * (np.exp(t / duration * np.log(f1 / f0)) - 1)
    return np.sin(phase) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t))


def test_signal(kind: str, seconds: float, seed: int = 0) -> np.ndarray:
    """One generated 16 kHz signal of `seconds` seconds, peak 0.5, float32 [samples]."""
    n = max(1, int(round(seconds * SAMPLE_RATE)))
    rng = np.random.default_rng(seed)
    makers = {"speech": _speech_like, "music": _music_like, "noise": _pink_noise, "sweep": _sweep}
    if kind == "silence":
        return np.zeros(n, dtype=np.float32)
    if kind not in makers:
        raise ValueError(f"unknown signal kind {kind!r}; choose from {SIGNAL_KINDS}")
    x = makers[kind](n, rng)
    x = x - x.mean()
    return (0.5 * x / (np.abs(x).max() + 1e-8)).astype(np.float32)


def _main() -> None:
    """`python -m recon_export.signals KIND SECONDS OUT.wav`: write a generated test clip."""
    import sys

    import soundfile as sf

    if len(sys.argv) != 4 or sys.argv[1] not in SIGNAL_KINDS:
        sys.exit(f"usage: python -m recon_export.signals {{{','.join(SIGNAL_KINDS)}}} SECONDS OUT.wav")
    sf.write(sys.argv[3], test_signal(sys.argv[1], float(sys.argv[2])), SAMPLE_RATE, subtype="FLOAT")


if __name__ == "__main__":
    _main()
