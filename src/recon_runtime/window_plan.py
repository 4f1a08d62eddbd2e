"""Windows sized to the input, and the log-mel join of decoded windows.

The previous plan (`old_plan_windows`, kept in benchmarks/long_audio.py to compare against) cut a
long input into full 1024-frame windows, the last aligned to the end, so a 12 s clip (1204 frames)
cost two full windows: 2048 frames, +70 %. The plan here keeps the number of windows (the fewest
that cover the input with the overlap) and shrinks them all to one length, just long enough to
cover the input::

    previous plan        |=========1024=========|           12 s: 2 x 1024 = 2048 frames
                                       |=========1024=========|
    plan_fitted_windows  |=====640=====|                     12 s: 2 x 640 = 1280 frames
                                  |=====640=====|
                                  |ovl|  (at least the overlap; what rounding leaves is spread evenly)

The window length is rounded up to WINDOW_STEP_FRAMES so that inputs of nearby lengths share a
window shape (see the constant for what that costs and buys). An input that fits one window is
one window of its own length, exactly as the previous plan gave it. A plan is `(start, end)`
pairs, which `windows.join_windows` and `WindowJob` take.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np

from .windows import join_windows

WINDOW_STEP_FRAMES: Final = 16
"""Window lengths of a multi-window plan are multiples of this many mel frames (0.16 s, 4 latent frames).

What it buys: a multi-window plan has windows of 548 to 1024 frames, so this step leaves 28 window
shapes (a step of 4, the least the VAE needs, leaves 112), and two inputs whose lengths differ by
less than about one step per window run windows of the same shape: they batch together across
requests, and a GPU's captured graphs and tuned kernels are reused instead of built per length.
What it costs, against the exact fit (step 4), measured over every input from 10.92 s to 10 min
(tests/test_window_plan.py): 0.55 % more frames on average, 2.1 % at worst; from about 60 windows
(10 minutes) on the rounding reaches the 1024-frame cap and the plan is the previous plan's full windows
(+7.5 % there, against +6.7 % exactly fitted). Every plan stays within 1.07 x T + one window.
"""


def windows_needed(total: int, window: int, overlap: int) -> int:
    """The fewest windows of at most `window` units that cover `total` units with `overlap` between neighbours.

    One window up to `window + overlap` units (splitting would cost a
    second window to save less than one overlap).
    """
    if total <= window + overlap:
        return 1
    return -(-(total - overlap) // (window - overlap))


def plan_fitted_windows(
    total: int, window: int, overlap: int, multiple: int = 1, step: int = WINDOW_STEP_FRAMES
) -> list[tuple[int, int]]:
    """Split [0, total) into the fewest equal windows, each just long enough to cover it with `overlap`.

    Args:
        total: input length in units (mel frames, or latent frames with `window`, `overlap` and
            `step` divided by 4); a multiple of `multiple`.
        window: the longest window (the VAE's 1024-frame training window).
        overlap: the least overlap between neighbouring windows.
        multiple: starts and lengths are multiples of this (4 for mel frames: one latent frame).
        step: the window length is rounded up to a multiple of this (at most to `window`); a
            multiple of `multiple`.
    Returns:
        `(start, end)` per window: `[(0, total)]` up to `window + overlap` units (as the previous
        plan), otherwise n windows of one
        length L <= `window` with n * L - (n - 1) * overlap >= total, starts spread evenly (each
        overlap at least `overlap`), the first at 0 and the last ending at `total`.
    """
    for name, value in (("window", window), ("overlap", overlap), ("step", step), ("total", total)):
        if value % multiple:
            raise ValueError(f"{name} {value} must be a multiple of {multiple}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap {overlap} must be in [0, window {window})")
    if step < 1:
        raise ValueError(f"step must be positive, got {step}")
    if total < 1:
        raise ValueError(f"total must be positive, got {total}")
    n = windows_needed(total, window, overlap)
    if n == 1:
        return [(0, total)]
    shortest = -(-(total + (n - 1) * overlap) // n)  # n windows of this length cover total with the overlap
    length = min(-(-shortest // step) * step, window)
    # starts k * multiple spread evenly over [0, total - length]: each gap is at most
    # ceil(q / (n - 1)) * multiple <= length - overlap, since (n - 1) * (length - overlap) >= total - length
    q = (total - length) // multiple
    starts = [multiple * (i * q // (n - 1)) for i in range(n)]
    return [(s, s + length) for s in starts]


def frames_computed(spans: Sequence[tuple[int, int]]) -> int:
    """Units of input the windows of a plan run through the graphs, all windows together."""
    return sum(e - s for s, e in spans)


def join_mel_windows(total: int, spans: Sequence[tuple[int, int]], mels: Sequence[np.ndarray]) -> np.ndarray:
    """Cross-fade decoded log-mel windows into one log-mel, in the log domain.

    The decoder emits natural-log mel and the vocoder reads it, so the join stays there: where
    neighbours agree the join is exact in any domain, and where they differ a weighted mean of
    logs is a weighted geometric mean of magnitudes, which keeps a quiet window's floor from being
    lifted by a louder neighbour as an arithmetic mean of magnitudes would, and is the weighted
    mean that minimises the squared log-mel error the VAE was trained on. No exp/log round trip.
    The weights are `windows`'s (the far window gets none at the overlap's edges), so the join of
    mels and the old join of waveforms fade over the same frames.

    Args:
        total: input length in mel frames.
        spans: the windows, as `plan_fitted_windows` returns them.
        mels: one decoded log-mel per window, [..., end - start, 64] (time on the second-last axis).
    Returns:
        The joined log-mel [..., total, 64]; with one window, that window's array itself.
    """
    return join_windows(total, spans, mels, 1.0, axis=-2)
