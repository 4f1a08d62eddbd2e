"""Windows over long inputs: the windows of one input (`WindowJob`) and their one cross-faded join.

The VAE's attention is quadratic in length and it was trained on 10.24 s, so long audio runs in
windows of at most that length, all of one length (`window_plan.plan_fitted_windows` plans them),
which keeps shapes fixed for the GPU. Neighbouring windows overlap; in the overlap the
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

Where two neighbours overlap their two weights sum to 1. A plan whose window overlaps more than
one earlier window (an end-aligned last window) is joined as well: the join divides by the summed
weights at every sample, and a signal all windows agree on passes unchanged whatever the overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

EDGE_FRACTION: Final = 0.25  # share of the overlap at each end that gets no weight from the far window


@dataclass(frozen=True)
class Features:
    """A prepared input: its log-mel and what is needed to give the output back at its level."""

    log_mel: np.ndarray  # float32 [T, 64]
    gain: float  # multiply the 16 kHz output by this to restore the input level
    num_samples: int  # length at 16 kHz
    waveform: np.ndarray  # float32 [num_samples], the prepared 16 kHz input


@dataclass(frozen=True)
class WindowJob:
    """One input cut into windows: the stages to run, one graph input per window, and how to join.

    Windows of equal shape from any number of jobs (and callers) can run as one batch with
    `Reconstructor.run_windows`; `Reconstructor.join` then cross-fades one job's outputs.
    """

    roles: tuple[str, ...]
    windows: tuple[np.ndarray, ...]
    """Graph inputs without the batch axis: [1, T, 64] (encoder), [8, T/4, 16] (decoder), [T, 64] (vocoder)."""
    spans: tuple[tuple[int, int], ...]
    """[start, end) of each window, in input units (mel frames, or latent frames for the decoder)."""
    total: int
    """Input length in input units."""
    scale: float
    """Output units per input unit on the joined axis (samples per frame, or latent frames per frame)."""
    axis: int
    """The joined axis of each per-window output (the batch axis removed)."""
    tail: int = 0
    """Decoding: samples of the vocoder's output past the last frame that the joined waveform keeps
    (up to 32; asked for by a length past 640 samples per latent frame, see `Reconstructor.decode`)."""
    vocoder_tail: int | None = None
    """None: the joined output is the result. A number: the windows end at the decoder, their joined
    output is a log-mel [1, frames, 64] that one chunked vocoder pass turns into the waveform
    (`Reconstructor.vocoder_pass`), keeping this many samples past its last frame."""

    def key(self, i: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Windows with equal keys can share a batch."""
        return self.roles, tuple(self.windows[i].shape)

    def streaming_join(self) -> StreamingJoin:
        """The join of this job's outputs (one output of the last stage), window by window (`Reconstructor.join`
        all at once)."""
        return StreamingJoin(self.total, self.spans, self.scale, self.axis, self.tail)


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


class StreamingJoin:
    """The cross-fade of `join_windows`, one window at a time and in order: each window's output is
    added as it arrives, and the part of the joined output that no later window touches is returned
    at once (a server streams a decode window by window with it; `join_windows` is all windows at once).

    Every later window starts at or after the next window's start (any plan with ordered starts), so once window i
    is added the output before window i+1's start is final: divided (in place) by its summed weights
    there, it is exactly what the whole join gives, the same float32 sums in the same order.
    """

    def __init__(self, total: int, spans: Sequence[tuple[int, int]], scale: float, axis: int = -1, tail: int = 0):
        """Args: as `join_windows`."""
        if not spans:
            raise ValueError("no windows to join")
        self.spans = list(spans)
        self.scale = scale
        self.axis = axis
        self.tail = tail
        self.length = int(round(total * scale))
        self._weights = window_weights(self.spans, scale) if len(self.spans) > 1 else []
        self._weight_sum = np.zeros(self.length if len(self.spans) > 1 else 0, dtype=np.float32)
        self._out: np.ndarray | None = None
        self._tail: np.ndarray | None = None
        self._next = 0
        self._done = 0

    def add(self, piece: np.ndarray) -> np.ndarray:
        """Add the next window's output; returns the joined output that is final now (possibly empty;
        a view the join no longer changes), and with the last window the rest, followed by `tail`
        units of its output past its span."""
        i = self._next
        if i >= len(self.spans):
            raise ValueError(f"{i + 1} outputs for {len(self.spans)} windows")
        self._next += 1
        ax = self.axis % piece.ndim
        if len(self.spans) == 1:  # one window: its output as it is, to the length (and the tail)
            self._out = _take(piece, ax, 0, self.length + self.tail)
            return self._out
        w = self._weights[i]
        if self._out is None:
            shape = list(piece.shape)
            shape[ax] = self.length
            self._out = np.zeros(shape, dtype=np.float32)
        o0 = int(round(self.spans[i][0] * self.scale))
        bshape = [1] * piece.ndim
        bshape[ax] = w.size
        _take(self._out, ax, o0, o0 + w.size)[...] += _take(piece, ax, 0, w.size) * w.reshape(bshape)
        self._weight_sum[o0 : o0 + w.size] += w
        done = int(round(self.spans[i + 1][0] * self.scale)) if i + 1 < len(self.spans) else self.length
        start, self._done = self._done, max(self._done, done)
        sums = self._weight_sum[start : self._done]
        if not (sums > 0).all():  # a plan covers every unit; this guards a broken one
            raise ValueError("windows leave part of the output without weight")
        bshape[ax] = sums.size
        part = _take(self._out, ax, start, self._done)
        part /= sums.reshape(bshape)
        if i + 1 == len(self.spans) and self.tail:
            self._tail = _take(piece, ax, w.size, w.size + self.tail)
            return np.concatenate([part, self._tail], axis=ax)
        return part

    def joined(self) -> np.ndarray:
        """The whole joined output, once every window was added: int(total * scale) + tail units on the axis."""
        if self._out is None or self._next < len(self.spans):
            raise ValueError(f"{self._next} outputs for {len(self.spans)} windows")
        if self._tail is None:
            return self._out
        return np.concatenate([self._out, self._tail], axis=self.axis % self._out.ndim)


def _take(array: np.ndarray, axis: int, start: int, end: int) -> np.ndarray:
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, end)
    return array[tuple(index)]


def join_windows(
    total: int,
    spans: Sequence[tuple[int, int]],
    pieces: Sequence[np.ndarray],
    scale: float,
    axis: int = -1,
    tail: int = 0,
) -> np.ndarray:
    """Cross-fade per-window outputs into one array, normalised by the summed weights (`StreamingJoin`
    over all windows at once).

    Args:
        total: input length in input units (mel frames or latent frames).
        spans: the windows, as `window_plan.plan_fitted_windows` returns them.
        pieces: one output per window, at least (end - start) * scale units long on `axis`.
        scale: output units per input unit (160 samples per mel frame, 1/4 latent frame per frame).
        tail: units of the last window's output past its span to keep after the joined output (a
            decoding's vocoder samples past the last frame, `WindowJob.tail`).
    Returns:
        The joined output, int(total * scale) + tail units long on `axis`.
    """
    if len(spans) != len(pieces) or not spans:
        raise ValueError(f"{len(pieces)} outputs for {len(spans)} windows")
    join = StreamingJoin(total, spans, scale, axis, tail)
    for piece in pieces:
        join.add(piece)
    return join.joined()
