"""One vocoder pass over a whole log-mel, in chunks whose margins are cropped.

HiFi-GAN is convolutional all the way: an output sample depends on a fixed span of mel frames
around it (its receptive field) and on nothing else. So a long mel can be vocoded in chunks that
overlap by two margins of at least that span, each chunk keeping only the samples whose whole
field lies inside it, and the kept parts laid end to end are the one-shot output (rounding aside)::

    mel        |-------------------------------- T frames --------------------------------|
    chunk 0    |=========== kept ===========|margin|
    chunk 1                         |margin|=========== kept ===========|margin|
    chunk 2                                                     |margin|====== kept ======| + tail

No fade: both chunks compute the same samples in an overlap, so nothing is mixed. The first
chunk starts at frame 0 and the last ends at frame T, where one-shot vocoding sees the same edges;
the last chunk also keeps the vocoder's samples past the last frame (32 for HiFi-GAN), so the
result has one-shot vocoding's length. Chunk length bounds memory whatever the input's length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np

from .contract import HOP_LENGTH, N_MELS, VOCODER
from .executors.base import Executor
from .window_plan import WINDOW_STEP_FRAMES, plan_fitted_windows

VOCODER_MARGIN_FRAMES: Final = 24
"""Mel frames each chunk computes past the samples it keeps, on each side.

Measured with `receptive_field` on the exported fp32 vocoder (one perturbed frame of a random mel,
every output sample compared bit for bit): an output frame of the full-size AudioLDM2 HiFi-GAN
(upsampling 5, 4, 2, 2, 2 with kernels 16, 16, 8, 4, 4; resblocks 3, 7, 11 with dilations
1, 3, 5) changes with the 22 mel frames before it and the 23 after it; the tiny test architecture
(resblocks 3, 5) with 8 and 8. In float64 on the PyTorch module the exact field is 23 before and
22 after (the outermost frame moves the output by 1e-17, which float32 cannot show; float32's
rounding in turn shows one frame more after), and counting the layers' taps gives at most 23 on
either side. The field belongs to the architecture, which every published checkpoint shares
(docs/pipelines.md), so trained weights cannot widen it. 24 covers 23 and is a latent frame;
each chunk boundary costs 2 x 24 frames of extra work.
"""

VOCODER_CHUNK_FRAMES: Final = 2048
"""Mel frames (20.48 s) per vocoder chunk, margins included: the longest mel one graph run sees.

The full-size vocoder's memory while it runs grows with the chunk (onnxruntime on the CPU, peak
RSS above the 347 MB after load: 276 MB at 1024 frames, 371 MB at 2048, 483 MB at 4096), while
the margins cost 2 x 24 frames per chunk boundary (4.9 % of the work at 1024 frames, 2.4 % at
2048, 1.2 % at 4096). 2048 frames keeps both small, and memory stays flat with length: 10 minutes
in chunks peaks where one chunk does, plus the mel and the waveform (docs/long-audio.md).
"""

VocoderRun = Callable[[np.ndarray], np.ndarray]
"""Vocode one log-mel [frames, 64] to a waveform [hop * frames + extra] (the same `extra` for any length)."""


@dataclass(frozen=True)
class ReceptiveField:
    """The mel frames an output frame of the vocoder depends on: [j - before, j + after] for output frame j."""

    before: int
    """Mel frames before an output frame that change it (a chunk's left margin must cover them)."""
    after: int
    """Mel frames after an output frame that change it (a chunk's right margin must cover them)."""
    probe_frames: int
    """Length of the random mel the field was measured on."""
    noise_floor: float
    """Largest difference between two runs of the unperturbed mel (0.0: the engine is deterministic)."""

    @property
    def margin(self) -> int:
        """The least margin, in mel frames, that makes chunked vocoding equal one-shot vocoding."""
        return max(self.before, self.after)


def receptive_field(run: VocoderRun, frames: int = 256, hop: int = HOP_LENGTH, seed: int = 0) -> ReceptiveField:
    """Measure the vocoder's receptive field from the graph itself.

    Vocodes a random log-mel of `frames` frames, then the same mel with its middle frame
    perturbed, and finds the first and last output samples that changed (by more than two runs of
    the same mel differ). Output frame j is samples [hop * j, hop * (j + 1)).

    Args:
        run: vocodes [frames, 64] -> [hop * frames + extra] (e.g. `executor_vocoder_run`).
        frames: probe length; doubled until the changed samples stay clear of both ends.
    Returns:
        The field, in mel frames on each side.
    """
    rng = np.random.default_rng(seed)
    while True:
        mel = rng.normal(-5.0, 2.0, (frames, N_MELS)).astype(np.float32)
        base = run(mel)
        noise = float(np.abs(run(mel) - base).max())
        probe = frames // 2
        perturbed = mel.copy()
        perturbed[probe] += rng.normal(0.0, 1.0, N_MELS).astype(np.float32)
        changed = np.flatnonzero(np.abs(run(perturbed) - base) > noise)
        if changed.size == 0:
            raise ValueError("perturbing a mel frame changed no output sample: this is not a vocoder")
        first, last = int(changed[0]), int(changed[-1])
        if first >= hop and last < hop * (frames - 1):  # clear of both edges: the field is all inside
            return ReceptiveField(probe - first // hop, last // hop - probe, frames, noise)
        frames *= 2


@dataclass(frozen=True)
class VocoderChunk:
    """One vocoder run of a chunked pass: the mel frames it reads and the output frames it keeps."""

    start: int
    """First mel frame the chunk reads."""
    end: int
    """One past the last mel frame it reads."""
    keep_start: int
    """First output frame it keeps (frames [keep_start, keep_end) are hop samples each)."""
    keep_end: int
    """One past the last output frame it keeps."""
    tail: bool
    """The last chunk: it also keeps the vocoder's samples past its last frame."""

    def kept(self, output: np.ndarray, hop: int = HOP_LENGTH) -> np.ndarray:
        """The samples of this chunk's vocoder output [hop * (end - start) + extra] that it contributes."""
        first = (self.keep_start - self.start) * hop
        return output[first:] if self.tail else output[first : (self.keep_end - self.start) * hop]


def plan_chunks(
    total: int,
    chunk_frames: int = VOCODER_CHUNK_FRAMES,
    margin: int = VOCODER_MARGIN_FRAMES,
    step: int = WINDOW_STEP_FRAMES,
) -> list[VocoderChunk]:
    """Cut a `total`-frame mel into the fewest equal chunks of at most `chunk_frames` frames.

    Neighbouring chunks overlap by at least 2 * `margin` frames; the boundary between their kept
    frames is the middle of the overlap, so every kept frame has `margin` frames of context on
    both sides (or the mel's own edge). Chunk lengths are rounded up to `step` frames
    (`window_plan.plan_fitted_windows`); `step=chunk_frames` gives every chunk of every long input
    the one shape `chunk_frames` (what a GPU batching chunks across inputs wants) at the cost of up
    to one chunk of extra frames per input. A mel up to `chunk_frames + 2 * margin` frames is one
    chunk, which is one-shot vocoding.

    Returns:
        The chunks in order; their kept frames partition [0, total).
    """
    if margin < 0 or chunk_frames <= 2 * margin:
        raise ValueError(f"chunk_frames ({chunk_frames}) must exceed two margins ({margin} frames each)")
    spans = plan_fitted_windows(total, chunk_frames, 2 * margin, 1, step)
    bounds = [0] + [(spans[i + 1][0] + spans[i][1]) // 2 for i in range(len(spans) - 1)] + [total]
    return [VocoderChunk(s, e, bounds[i], bounds[i + 1], i + 1 == len(spans)) for i, (s, e) in enumerate(spans)]


def vocode_chunked(
    mel: np.ndarray,
    run: VocoderRun,
    chunk_frames: int = VOCODER_CHUNK_FRAMES,
    margin: int = VOCODER_MARGIN_FRAMES,
    step: int = WINDOW_STEP_FRAMES,
    hop: int = HOP_LENGTH,
) -> np.ndarray:
    """Vocode a log-mel [T, 64] in chunks (`plan_chunks`) and return what `run(mel)` returns.

    Args:
        mel: float32 [T, 64], the whole input.
        run: vocodes one chunk, [frames, 64] -> [hop * frames + extra].
        margin: at least the vocoder's `receptive_field(...).margin`, or the result is not one-shot's.
    Returns:
        float32 [hop * T + extra], equal to `run(mel)` up to rounding, computed one chunk at a time.
    """
    if mel.ndim != 2 or mel.shape[1] != N_MELS or mel.shape[0] < 1:
        raise ValueError(f"log-mel must be [frames, {N_MELS}], got {list(mel.shape)}")
    total = mel.shape[0]
    chunks = plan_chunks(total, chunk_frames, margin, step)
    if len(chunks) == 1:
        return run(mel)
    out: np.ndarray | None = None
    for c in chunks:
        y = run(mel[c.start : c.end])
        extra = y.shape[-1] - hop * (c.end - c.start)
        if extra < 0:
            raise ValueError(f"the vocoder returned {y.shape[-1]} samples for {c.end - c.start} frames")
        if out is None:  # one array for the whole output: the pieces are never held twice
            out = np.empty(hop * total + extra, dtype=y.dtype)
        part = c.kept(y, hop)
        at = c.keep_start * hop
        if at + part.size > out.size or (c.tail and at + part.size != out.size):
            raise ValueError(
                f"the vocoder returned {y.shape[-1]} samples for {c.end - c.start} frames (not hop * frames + a fixed extra)"
            )
        out[at : at + part.size] = part
    assert out is not None
    return out


def executor_vocoder_run(executor: Executor) -> VocoderRun:
    """A `VocoderRun` over an executor's vocoder graph (its whole output, extra samples included)."""

    def run(mel: np.ndarray) -> np.ndarray:
        return executor.run((VOCODER,), mel[None])[0][0]

    return run


@dataclass(frozen=True)
class ChunkJob:
    """One log-mel vocoded in chunks (`plan_chunks`): graph inputs a batcher runs, and their join.

    The chunks of one job have one length, so they run as one batch, and chunks of the same
    length from other inputs (or other callers, in a server) batch with them. The join is
    `vocode_chunked`'s: each chunk's kept samples laid end to end, nothing faded. Use it where a
    `windows.WindowJob` is used (`Reconstructor.run_jobs`, `Reconstructor.join`, a server's batcher).
    """

    windows: tuple[np.ndarray, ...]
    """One vocoder input [frames, 64] per chunk (views of the mel)."""
    chunks: tuple[VocoderChunk, ...]
    total: int
    """Mel frames of the whole input."""
    tail: int = 0
    """Samples of the vocoder's output past the last frame that the result keeps (at most its extra, 32)."""
    hop: int = HOP_LENGTH
    roles: tuple[str, ...] = (VOCODER,)

    @classmethod
    def over(
        cls,
        mel: np.ndarray,
        tail: int = 0,
        chunk_frames: int = VOCODER_CHUNK_FRAMES,
        margin: int = VOCODER_MARGIN_FRAMES,
    ) -> "ChunkJob":
        """The chunks of a log-mel [T, 64] (`plan_chunks` with the product's chunk length and margin)."""
        chunks = tuple(plan_chunks(mel.shape[0], chunk_frames, margin))
        return cls(tuple(mel[c.start : c.end] for c in chunks), chunks, mel.shape[0], tail)

    @property
    def length(self) -> int:
        """Samples of the joined output: hop per mel frame, then `tail`."""
        return self.hop * self.total + self.tail

    def key(self, i: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Chunks with equal keys can share a batch (as `WindowJob.key`)."""
        return self.roles, tuple(self.windows[i].shape)

    def streaming_join(self) -> "ChunkJoin":
        """The join, one chunk at a time and in order."""
        return ChunkJoin(self)

    def join(self, outputs: list[np.ndarray]) -> np.ndarray:
        """Every chunk's vocoder output (in order, the extra samples included) -> the waveform [length]."""
        join = self.streaming_join()
        for output in outputs:
            join.add(output)
        return join.joined()


class ChunkJoin:
    """`ChunkJob.join`, chunk by chunk: each chunk's kept samples are final as soon as it is done."""

    def __init__(self, job: ChunkJob):
        self.job = job
        self._out: np.ndarray | None = None
        self._next = 0

    def add(self, output: np.ndarray) -> np.ndarray:
        """Add the next chunk's vocoder output [hop * frames + extra]; returns its kept samples (a view
        of the joined output), the last chunk's cut to `tail` samples past the last frame."""
        job, i = self.job, self._next
        if i >= len(job.chunks):
            raise ValueError(f"{i + 1} outputs for {len(job.chunks)} chunks")
        c = job.chunks[i]
        extra = output.shape[-1] - job.hop * (c.end - c.start)
        if extra < job.tail:
            raise ValueError(f"the vocoder returned {output.shape[-1]} samples for {c.end - c.start} frames")
        if self._out is None:
            self._out = np.empty(job.length, dtype=np.float32)
        at = c.keep_start * job.hop
        part = c.kept(output, job.hop)[: job.length - at]
        self._out[at : at + part.size] = part
        self._next += 1
        return self._out[at : at + part.size]

    def joined(self) -> np.ndarray:
        """The whole waveform, once every chunk was added."""
        if self._out is None or self._next < len(self.job.chunks):
            raise ValueError(f"{self._next} outputs for {len(self.job.chunks)} chunks")
        return self._out
