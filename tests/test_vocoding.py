"""Chunked vocoding (`vocoding`): the measured receptive field, the chunk plan, and chunked == one-shot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recon_runtime import Reconstructor
from recon_runtime.contract import HOP_LENGTH, N_MELS, VOCODER, VOCODER_EXTRA_SAMPLES
from recon_runtime.vocoding import (
    VOCODER_CHUNK_FRAMES,
    VOCODER_MARGIN_FRAMES,
    VocoderRun,
    executor_vocoder_run,
    plan_chunks,
    receptive_field,
    vocode_chunked,
)

from .conftest import torch_missing

REL_L2 = 1e-5  # chunked vs one-shot, fp32
FULL_FIELD_FRAMES = 23  # the full-size vocoder's widest side (docs/long-audio.md); its test below checks it


@pytest.fixture(scope="module")
def tiny_run(tiny_bundle: Path) -> VocoderRun:
    rec = Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32", stages=(VOCODER,))
    return executor_vocoder_run(rec.executor)


def _mel(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(-5.0, 2.0, (frames, N_MELS)).astype(np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_chunked(run: VocoderRun, frames: int, chunk_frames: int, margin: int = VOCODER_MARGIN_FRAMES) -> int:
    """chunked == one-shot over the whole output and over the first and the last chunk's samples; returns chunks."""
    mel = _mel(frames, seed=frames)
    one = run(mel)
    chunked = vocode_chunked(mel, run, chunk_frames, margin)
    assert chunked.shape == one.shape == (HOP_LENGTH * frames + VOCODER_EXTRA_SAMPLES,)
    chunks = plan_chunks(frames, chunk_frames, margin)
    first = slice(0, chunks[0].keep_end * HOP_LENGTH)
    last = slice(chunks[-1].keep_start * HOP_LENGTH, None)
    for part in (slice(None), first, last):
        assert _rel(chunked[part], one[part]) <= REL_L2, (frames, part)
    return len(chunks)


def test_the_margin_covers_the_tiny_vocoders_measured_field(tiny_run: VocoderRun) -> None:
    field = receptive_field(tiny_run)
    print(f"tiny vocoder: {field}")
    assert 0 < field.before <= VOCODER_MARGIN_FRAMES and 0 < field.after <= VOCODER_MARGIN_FRAMES
    # the tiny architecture has smaller kernels than the full one, so its field is smaller
    assert field.margin < FULL_FIELD_FRAMES <= VOCODER_MARGIN_FRAMES


@pytest.mark.parametrize(
    ("frames", "chunks"),
    [
        (1, 1),
        (300, 1),
        (256 + 2 * VOCODER_MARGIN_FRAMES, 1),  # the longest one-chunk mel
        (256 + 2 * VOCODER_MARGIN_FRAMES + 1, 2),  # just over one chunk
        (1001, 5),
        (2777, 14),
    ],
)
def test_chunked_vocoding_equals_one_shot(tiny_run: VocoderRun, frames: int, chunks: int) -> None:
    assert _check_chunked(tiny_run, frames, chunk_frames=256) == chunks


def test_chunked_vocoding_at_the_default_chunk(tiny_run: VocoderRun) -> None:
    assert _check_chunked(tiny_run, VOCODER_CHUNK_FRAMES + 2 * VOCODER_MARGIN_FRAMES + 1, VOCODER_CHUNK_FRAMES) == 2


def test_the_equality_comes_from_the_margin(tiny_run: VocoderRun) -> None:
    """Without margins the chunk edges show; with exactly the measured field (chunk lengths not
    rounded up, so no extra context) chunked vocoding is one-shot vocoding."""
    field = receptive_field(tiny_run)
    mel = _mel(1001)
    one = tiny_run(mel)
    assert _rel(vocode_chunked(mel, tiny_run, 256, margin=0, step=1), one) > 100 * REL_L2
    assert _rel(vocode_chunked(mel, tiny_run, 256, margin=field.margin, step=1), one) <= REL_L2


def test_chunks_partition_the_output_with_a_margin_of_context() -> None:
    for total in [*range(1, 700), 2113, 5000, 60_004]:
        for chunk_frames, step in ((256, 16), (VOCODER_CHUNK_FRAMES, 16), (VOCODER_CHUNK_FRAMES, VOCODER_CHUNK_FRAMES)):
            chunks = plan_chunks(total, chunk_frames, VOCODER_MARGIN_FRAMES, step)
            assert chunks[0].keep_start == 0 and chunks[-1].keep_end == total
            assert [c.tail for c in chunks] == [False] * (len(chunks) - 1) + [True]
            lengths = {c.end - c.start for c in chunks}
            if len(chunks) > 1:
                assert len(lengths) == 1 and max(lengths) <= chunk_frames
                assert step != chunk_frames or lengths == {chunk_frames}
            for a, b in zip(chunks, chunks[1:]):
                assert a.keep_end == b.keep_start
            for c in chunks:
                assert c.start <= c.keep_start < c.keep_end <= c.end
                assert c.start == 0 or c.keep_start - c.start >= VOCODER_MARGIN_FRAMES
                assert c.end == total or c.end - c.keep_end >= VOCODER_MARGIN_FRAMES


def test_bad_chunking_is_refused(tiny_run: VocoderRun) -> None:
    with pytest.raises(ValueError, match="must exceed two margins"):
        plan_chunks(5000, 64, 32)
    with pytest.raises(ValueError, match=r"log-mel must be \[frames, 64\]"):
        vocode_chunked(np.zeros((10, 80), np.float32), tiny_run)


def test_a_run_that_is_not_a_vocoder_is_refused() -> None:
    with pytest.raises(ValueError, match="changed no output sample"):
        receptive_field(lambda mel: np.zeros(HOP_LENGTH * mel.shape[0], np.float32))
    with pytest.raises(ValueError, match="samples for"):
        vocode_chunked(_mel(3000), lambda mel: np.zeros(mel.shape[0], np.float32), 256)


@pytest.mark.full
@torch_missing
def test_full_vocoder_field_and_chunked_equals_one_shot(full_bundle: Path) -> None:
    rec = Reconstructor.load(full_bundle, provider="cpu", precision="fp32", stages=(VOCODER,))
    run = executor_vocoder_run(rec.executor)
    field = receptive_field(run)
    print(f"full-size vocoder: {field}")
    assert 20 <= min(field.before, field.after) and field.margin == FULL_FIELD_FRAMES <= VOCODER_MARGIN_FRAMES
    assert _check_chunked(run, 1100, chunk_frames=512) == 3
