"""Windows over long inputs and their cross-faded overlap-add.

The VAE's attention is quadratic in length and it was trained on 10.24 s, so long audio runs in
windows of about that length. Windows all have the same length (the last one is aligned to the
end), which keeps shapes fixed for the GPU. Neighbouring windows overlap; in the overlap the
earlier window fades out and the later one fades in over the middle half only, so the few
frames next to each window edge (where the model sees a boundary) get no weight::

    window i     ──────────────────────┐
                                        ╲
    weight 1 ···························╲·········  0
                               |  edge | fade | edge |
    window i+1                          ╱──────────────────
                                       ╱
    weight 0 ·························╱············  1
                               |<------ overlap ---->|

Where two neighbours overlap their two weights sum to 1. The last window is aligned to the end,
so it can overlap more than one earlier window; the join therefore divides by the summed weights
at every sample, and a signal all windows agree on passes unchanged whatever the overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import numpy as np

EDGE_FRACTION: Final = 0.25  # share of the overlap at each end that gets no weight from the far window


def plan_windows(total: int, window: int, overlap: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Split [0, total) into equal windows of `window` units overlapping by at least `overlap`.

    Starts are multiples of `multiple`. A total up to `window + overlap` is one window: splitting
    it would cost a second full window to save less than one overlap (a 10.24 s clip is 1025
    frames under the inference framing, one more than the 1024-frame window).
    """
    if window % multiple or overlap % multiple:
        raise ValueError(f"window {window} and overlap {overlap} must be multiples of {multiple}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap {overlap} must be in [0, window {window})")
    if total % multiple:
        raise ValueError(f"total {total} must be a multiple of {multiple}")
    if total <= window + overlap:
        return [(0, total)]
    starts = [*range(0, total - window, window - overlap), total - window]
    return [(s, s + window) for s in starts]


def _ramp(length: int) -> np.ndarray:
    """Fade-in over the middle half of `length` samples: 0 for the first quarter, 1 for the last."""
    edge = int(round(length * EDGE_FRACTION))
    fade = length - 2 * edge
    ramp = np.zeros(length, dtype=np.float32)
    if fade > 0:
        ramp[edge : edge + fade] = (np.arange(fade, dtype=np.float32) + 0.5) / fade
    ramp[edge + max(fade, 0) :] = 1.0
    return ramp


def window_weights(spans: list[tuple[int, int]], scale: float) -> list[np.ndarray]:
    """Per-window weights at output resolution (`scale` output units per input unit)."""
    weights = []
    for i, (s, e) in enumerate(spans):
        w = np.ones(int(round((e - s) * scale)), dtype=np.float32)
        if i > 0:
            n = int(round((spans[i - 1][1] - s) * scale))
            w[:n] *= _ramp(n)
        if i + 1 < len(spans):
            n = int(round((e - spans[i + 1][0]) * scale))
            w[w.size - n :] *= 1.0 - _ramp(n)
        weights.append(w)
    return weights


def join_windows(
    total: int,
    spans: Sequence[tuple[int, int]],
    pieces: Sequence[np.ndarray],
    scale: float,
    axis: int = -1,
) -> np.ndarray:
    """Cross-fade per-window outputs into one array, normalised by the summed weights.

    Args:
        total: input length in input units (mel frames or latent frames).
        spans: the windows, as `plan_windows` returns them.
        pieces: one output per window, at least (end - start) * scale units long on `axis`.
        scale: output units per input unit (160 samples per mel frame, 1/4 latent frame per frame).
    Returns:
        The joined output, int(total * scale) units long on `axis`.
    """
    if len(spans) != len(pieces) or not spans:
        raise ValueError(f"{len(pieces)} outputs for {len(spans)} windows")
    if len(spans) == 1:
        return pieces[0]
    weights = window_weights(list(spans), scale)
    length = int(round(total * scale))
    out: np.ndarray | None = None
    weight_sum = np.zeros(length, dtype=np.float32)
    ax = 0
    for (s, _), w, piece in zip(spans, weights, pieces):
        ax = axis % piece.ndim
        if out is None:
            shape = list(piece.shape)
            shape[ax] = length
            out = np.zeros(shape, dtype=np.float32)
        o0 = int(round(s * scale))
        bshape = [1] * piece.ndim
        bshape[ax] = w.size
        index = [slice(None)] * piece.ndim
        index[ax] = slice(o0, o0 + w.size)
        crop = [slice(None)] * piece.ndim
        crop[ax] = slice(0, w.size)
        out[tuple(index)] += piece[tuple(crop)] * w.reshape(bshape)
        weight_sum[o0 : o0 + w.size] += w
    assert out is not None
    if not (weight_sum > 0).all():  # plan_windows covers every unit; this guards a broken plan
        raise ValueError("windows leave part of the output without weight")
    bshape = [1] * out.ndim
    bshape[ax] = length
    out /= weight_sum.reshape(bshape)
    return out


def overlap_add(
    total: int,
    window: int,
    overlap: int,
    run: Callable[[int, int], np.ndarray],
    scale: float,
    axis: int = -1,
    multiple: int = 1,
) -> np.ndarray:
    """Run `run(start, end)` on each window of `plan_windows(total, ...)` and join the pieces."""
    spans = plan_windows(total, window, overlap, multiple)
    return join_windows(total, spans, [run(s, e) for s, e in spans], scale, axis)
