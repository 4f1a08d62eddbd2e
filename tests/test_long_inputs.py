"""Long inputs through `Reconstructor`: windows sized to the input, the decoded log-mel windows
joined, one chunked vocoder pass (docs/long-audio.md), against a by-hand composition of the parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recon_runtime import Reconstructor
from recon_runtime.contract import DECODER, ENCODER, HOP_LENGTH, LATENT_DOWNSAMPLE, N_MELS, VOCODER
from recon_runtime.reconstructor import StreamedJob
from recon_runtime.vocoding import VOCODER_CHUNK_FRAMES, VOCODER_MARGIN_FRAMES, executor_vocoder_run, vocode_chunked
from recon_runtime.window_plan import join_mel_windows, plan_fitted_windows
from recon_runtime.windows import join_windows

from .conftest import tone

RATE = 16000
REL = 1e-5  # fp32: the product path against the by-hand composition, and chunked against one-shot
SECONDS = (11.0, 20.0, 25.03, 30.0)
"""Just over one window (1101 frames: 2 windows), 3 windows in one vocoder chunk, 3 windows whose
mel (2504 frames) just needs a second, short-kept chunk, and 4 windows in 2 chunks."""


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Reconstructor:
    return Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32")


def _audio(seconds: float) -> np.ndarray:
    t = tone(seconds, RATE, 250.0)
    return t * (1.0 + 0.5 * np.sin(np.linspace(0, 7.0, t.size, dtype=np.float32)))  # a level that moves


def _padded_mel(rec: Reconstructor, audio: np.ndarray) -> tuple[np.ndarray, int]:
    feats = rec.features(audio, RATE)
    frames = feats.log_mel.shape[0]
    total = rec.padded_frames(frames)
    mel = np.pad(feats.log_mel, ((0, total - frames), (0, 0)), constant_values=rec.contract.mel.silence)
    return mel, total


def _by_hand_mel(rec: Reconstructor, mel: np.ndarray, total: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The fitted plan, encoder + decoder per window, the log-mel join: [total, 64]."""
    spans = plan_fitted_windows(total, rec.window_frames, rec.overlap_frames, LATENT_DOWNSAMPLE)
    decoded = [rec.executor.run((ENCODER, DECODER), mel[None, None, s:e])[0][0] for s, e in spans]
    return spans, join_mel_windows(total, spans, decoded)[0]


@pytest.mark.parametrize("seconds", SECONDS)
def test_reconstruct_is_the_fitted_plan_the_mel_join_and_one_chunked_vocoder_pass(
    rec: Reconstructor, seconds: float
) -> None:
    audio = _audio(seconds)
    out = rec.reconstruct(audio, RATE)
    assert out.shape == audio.shape and out.dtype == np.float32 and np.isfinite(out).all()
    mel, total = _padded_mel(rec, audio)
    spans, joined = _by_hand_mel(rec, mel, total)
    assert len(spans) > 1 and len({e - s for s, e in spans}) == 1
    assert [s for s, _ in rec.reconstruction_job(rec.features(audio, RATE)).spans] == [s for s, _ in spans]
    run = executor_vocoder_run(rec.executor)
    wave = vocode_chunked(joined, run, VOCODER_CHUNK_FRAMES, VOCODER_MARGIN_FRAMES)
    assert _rel(wave, run(joined)) <= REL  # chunked == one-shot vocoding of the same joined mel
    feats = rec.features(audio, RATE)
    assert _rel(out, rec.finish(feats, rec.crop(feats, wave))) <= REL


def test_several_long_inputs_batched_together_give_what_each_gives_alone(tiny_bundle: Path, rec: Reconstructor) -> None:
    """reconstruct_many on a batching Reconstructor: two inputs of one length (their VAE windows and
    vocoder chunks share batches) and one of another, each equal to its reconstruction alone."""
    batched = Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32", max_batch=4)
    items = [(_audio(20.0), RATE), (_audio(20.0)[::-1].copy(), RATE), (_audio(25.03), RATE)]
    runs: list[int] = []
    inner = batched.executor.run

    def counting(roles, inputs):  # noqa: ANN001, ANN202 - the executor's own signature
        runs.append(len(inputs[0]))
        return inner(roles, inputs)

    batched.executor.run = counting  # type: ignore[method-assign]
    outs = batched.reconstruct_many(items)
    assert max(runs) > 1, runs  # some graph run took windows or chunks of more than one input
    for (audio, rate), out in zip(items, outs):
        np.testing.assert_allclose(out, rec.reconstruct(audio, rate), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seconds", SECONDS)
def test_encode_and_decode_run_the_same_plan(rec: Reconstructor, seconds: float) -> None:
    audio = _audio(seconds)
    mel, total = _padded_mel(rec, audio)
    spans = plan_fitted_windows(total, rec.window_frames, rec.overlap_frames, LATENT_DOWNSAMPLE)
    z = rec.encode(audio, RATE)
    frames = rec.features(audio, RATE).log_mel.shape[0]
    assert z.shape == (8, -(-frames // 4), 16) and np.isfinite(z).all()
    means = [rec.executor.run((ENCODER,), mel[None, None, s:e])[0][0] for s, e in spans]
    want = join_windows(total, spans, means, 1 / LATENT_DOWNSAMPLE, axis=1)[:, : z.shape[1]]
    assert _rel(z, want) <= REL
    # the latent plan is the mel plan / 4
    latent_spans = rec.decoding_job(z).spans
    assert [(s * 4, e * 4) for s, e in latent_spans] == plan_fitted_windows(
        z.shape[1] * 4, rec.window_frames, rec.overlap_frames, LATENT_DOWNSAMPLE
    )
    wave = rec.decode(z)
    assert wave.shape == (640 * z.shape[1],) and np.isfinite(wave).all()
    mels = [rec.executor.run((DECODER,), z[None, :, s:e])[0][0] for s, e in latent_spans]
    joined = join_mel_windows(z.shape[1] * 4, [(s * 4, e * 4) for s, e in latent_spans], mels)[0]
    one_shot = executor_vocoder_run(rec.executor)(joined)
    assert _rel(wave, one_shot[: wave.size]) <= REL
    # up to 32 samples past 640 per latent frame are the vocoder's own, as one-shot vocoding gives them
    longer = rec.decode(z, num_samples=wave.size + 20)
    assert longer.shape == (wave.size + 20,) and _rel(longer, one_shot[: wave.size + 20]) <= REL
    assert np.array_equal(rec.decode(z, num_samples=wave.size - 100), wave[:-100])


@pytest.mark.parametrize("frames", [1089, 2097, 3001])
def test_vocode_runs_one_chunked_pass(rec: Reconstructor, frames: int) -> None:
    mel = np.random.default_rng(frames).normal(-5.0, 2.0, (frames, N_MELS)).astype(np.float32)
    wave = rec.vocode(mel)
    assert wave.shape == (HOP_LENGTH * frames,) and np.isfinite(wave).all()
    run = executor_vocoder_run(rec.executor)
    assert _rel(wave, run(mel)[: wave.size]) <= REL
    assert np.array_equal(wave, vocode_chunked(mel, run)[: wave.size])
    assert np.array_equal(rec.vocode(np.stack([mel, mel]))[1], wave)


def test_inputs_that_fit_one_window_run_the_whole_chain_as_before(rec: Reconstructor) -> None:
    """One window: the chain as one graph run, bit for bit what it was (one executor call per stage chain)."""
    for seconds in (1.0, 10.24, 10.84):
        audio = _audio(seconds)
        mel, total = _padded_mel(rec, audio)
        assert len(rec.reconstruction_job(rec.features(audio, RATE)).windows) == 1
        feats = rec.features(audio, RATE)
        wave = rec.executor.run((ENCODER, DECODER, VOCODER), mel[None, None])[0][0][: total * HOP_LENGTH]
        assert np.array_equal(rec.reconstruct(audio, RATE), rec.finish(feats, rec.crop(feats, wave)))
        mean = rec.executor.run((ENCODER,), mel[None, None])[0][0]
        z = rec.encode(audio, RATE)
        assert np.array_equal(z, mean[:, : z.shape[1]])
        dec = rec.executor.run((DECODER, VOCODER), z[None])[0][0]
        assert np.array_equal(rec.decode(z), dec[: 640 * z.shape[1]])
        assert np.array_equal(rec.decode(z, num_samples=640 * z.shape[1] + 32), dec[: 640 * z.shape[1] + 32])
        voc = rec.executor.run((VOCODER,), mel[None])[0][0]
        assert np.array_equal(rec.vocode(mel), voc[: total * HOP_LENGTH])


@pytest.mark.parametrize("seconds", [5.0, *SECONDS, 45.0])
def test_a_streamed_decode_sends_audio_as_each_vocoder_chunk_is_done_and_adds_up_to_the_decode(
    rec: Reconstructor, seconds: float
) -> None:
    """`StreamedJob` (the server's streaming decode): one graph run at a time, each vocoder chunk as
    soon as the log-mel join covers it, the parts laid end to end equal to `decode`."""
    z = rec.encode(_audio(seconds), RATE)
    for num_samples in (None, 640 * z.shape[1] + 32):
        job = rec.decoding_job(z, num_samples)
        streamed = StreamedJob(job)
        parts, decoded_before_audio = [], None
        for step, (step_job, index) in enumerate(streamed.steps):
            (out,) = rec.run_windows(step_job.roles, [step_job.windows[index]])
            part = streamed.add(step, out)
            if part.size and decoded_before_audio is None:
                decoded_before_audio = sum(1 for j, _ in streamed.steps[:step] if j is job)
            parts.append(part.copy())
        wave = np.concatenate(parts)
        assert wave.size == streamed.length
        assert np.array_equal(wave, rec.decode(z, num_samples))
        if (
            streamed.vocoding is not None
        ):  # audio leaves after the first chunk, before the last window when there are two chunks
            chunk_end = streamed.vocoding.chunks[0].end
            assert decoded_before_audio == next(
                i + 1
                for i, (s, e) in enumerate(job.spans)
                if i + 1 == len(job.spans) or job.spans[i + 1][0] * 4 >= chunk_end
            )
            if len(streamed.vocoding.chunks) > 1:
                assert decoded_before_audio < len(job.windows)
        else:
            assert len(streamed.steps) == 1
