"""Windows sized to the input (`window_plan`): coverage, cost, shapes, and the log-mel join."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.long_audio import old_plan_windows
from recon_runtime.contract import LATENT_DOWNSAMPLE, N_MELS, TRAINING_WINDOW_FRAMES
from recon_runtime.frontend import num_frames
from recon_runtime.reconstructor import DEFAULT_OVERLAP_FRAMES
from recon_runtime.window_plan import (
    WINDOW_STEP_FRAMES,
    frames_computed,
    join_mel_windows,
    plan_fitted_windows,
    windows_needed,
)

W, OV, M = TRAINING_WINDOW_FRAMES, DEFAULT_OVERLAP_FRAMES, LATENT_DOWNSAMPLE
LONGEST = 70_000  # frames: 11.7 minutes


def _old(total: int) -> list[tuple[int, int]]:
    return old_plan_windows(total, W, OV, M)


def _new(total: int, step: int = WINDOW_STEP_FRAMES) -> list[tuple[int, int]]:
    return plan_fitted_windows(total, W, OV, M, step)


def _padded(seconds: float) -> int:
    """Frames of a clip under the inference framing, padded to a latent frame (as the runtime runs it)."""
    t = num_frames(int(round(seconds * 16000)))
    return -(-t // M) * M


def test_one_window_inputs_get_todays_plan_exactly() -> None:
    for total in range(M, W + OV + 1, M):
        assert _new(total) == _old(total) == [(0, total)]
    assert len(_new(W + OV + M)) == 2


def test_every_length_is_covered_with_the_overlap_at_bounded_cost() -> None:
    for total in range(M, LONGEST + 1, M):
        spans = _new(total)
        starts = np.array([s for s, _ in spans])
        ends = np.array([e for _, e in spans])
        lengths = ends - starts
        assert starts[0] == 0 and ends[-1] == total, total
        assert len(spans) == len(_old(total)) == windows_needed(total, W, OV), total
        assert frames_computed(spans) <= 1.08 * total + W, total
        assert (starts % M == 0).all(), total
        if len(spans) == 1:
            continue
        assert (lengths == lengths[0]).all() and lengths[0] <= W, total
        assert lengths[0] % M == 0 and lengths[0] % WINDOW_STEP_FRAMES == 0, total
        assert (np.diff(starts) > 0).all(), total
        assert (ends[:-1] - starts[1:] >= OV).all(), total  # each neighbour pair shares at least the overlap


def test_the_step_costs_what_its_docstring_says() -> None:
    totals = range(W + OV + M, 60_004 + 1, M)  # 10.92 s to 10 minutes
    exact = np.array([frames_computed(_new(t, step=M)) for t in totals])
    stepped = np.array([frames_computed(_new(t)) for t in totals])
    extra = stepped / exact - 1
    print(f"step {WINDOW_STEP_FRAMES}: +{100 * extra.mean():.2f} % mean, +{100 * extra.max():.2f} % worst")
    assert extra.mean() <= 0.0056 and extra.max() <= 0.021
    assert ((stepped - W) / np.array(totals)).max() <= 1.07
    shapes = {_new(t)[0][1] for t in range(W + OV + M, LONGEST + 1, M)}
    exact_shapes = {_new(t, step=M)[0][1] for t in range(W + OV + M, LONGEST + 1, M)}
    assert len(shapes) == 28 and len(exact_shapes) == 112


# frames of each input under today's plan and the fitted one, at the least step and at WINDOW_STEP_FRAMES
ISSUE_TABLE = [
    # seconds, frames, windows, today, fitted at step 4, fitted at the default step
    (12, 1204, 2, 2048, 1272, 1280),
    (15, 1504, 2, 2048, 1568, 1568),
    (20, 2004, 3, 3072, 2136, 2160),
    (30, 3004, 4, 4096, 3200, 3200),
    (60, 6004, 7, 7168, 6412, 6496),
    (600, 60004, 63, 64512, 64008, 64512),
]


@pytest.mark.parametrize(("seconds", "frames", "windows", "today", "exact", "stepped"), ISSUE_TABLE)
def test_the_issue_table(seconds: float, frames: int, windows: int, today: int, exact: int, stepped: int) -> None:
    assert _padded(seconds) == frames
    assert len(_old(frames)) == len(_new(frames)) == windows
    assert frames_computed(_old(frames)) == today
    assert frames_computed(_new(frames, step=M)) == exact
    assert frames_computed(_new(frames)) == stepped


def test_a_30_s_clip_runs_as_four_800_frame_windows() -> None:
    assert _new(3004) == [(0, 800), (732, 1532), (1468, 2268), (2204, 3004)]


def test_the_latent_plan_is_the_mel_plan_divided_by_four() -> None:
    """The decoder's windows (latent frames) must be the encoder's (mel frames) / 4."""
    for total in range(M, 20_000, M):
        mel = _new(total)
        latent = plan_fitted_windows(total // M, W // M, OV // M, 1, WINDOW_STEP_FRAMES // M)
        assert latent == [(s // M, e // M) for s, e in mel], total


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total": 1202}, "multiple of 4"),
        ({"step": 6}, "multiple of 4"),
        ({"overlap": 1024}, r"overlap 1024 must be in"),
        ({"total": 0}, "positive"),
    ],
)
def test_bad_plans_are_refused(kwargs: dict[str, int], match: str) -> None:
    args = {"total": 2000, "window": W, "overlap": OV, "multiple": M, "step": WINDOW_STEP_FRAMES, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_fitted_windows(**args)


def test_one_mel_window_is_returned_unchanged() -> None:
    mel = np.random.default_rng(0).normal(-4, 2, (900, N_MELS)).astype(np.float32)
    assert np.array_equal(join_mel_windows(900, [(0, 900)], [mel]), mel)


@pytest.mark.parametrize("total", [1092, 3004, 12_004])
def test_mel_windows_that_agree_join_back_to_the_mel(total: int) -> None:
    spans = _new(total)
    assert len(spans) > 1
    constant = np.full((total, N_MELS), -3.25, np.float32)
    joined = join_mel_windows(total, spans, [constant[s:e] for s, e in spans])
    assert joined.shape == (total, N_MELS)
    np.testing.assert_allclose(joined, constant, rtol=1e-6)
    # windows cut from one mel (what the decoder would give if windows agreed) rebuild that mel,
    # with the decoder's [1, frames, 64] layout too
    mel = np.random.default_rng(1).normal(-4, 2, (1, total, N_MELS)).astype(np.float32)
    joined = join_mel_windows(total, spans, [mel[:, s:e] for s, e in spans])
    np.testing.assert_allclose(joined, mel, rtol=1e-5, atol=1e-5)


def test_mel_windows_that_differ_fade_across_the_overlap() -> None:
    total = 1092
    spans = _new(total)
    (s0, e0), (s1, e1) = spans
    pieces = [np.zeros((e0 - s0, N_MELS), np.float32), np.ones((e1 - s1, N_MELS), np.float32)]
    joined = join_mel_windows(total, spans, pieces)[:, 0]
    assert (joined[:s1] == 0).all() and (joined[e0:] == 1).all()
    inside = joined[s1:e0]
    assert (np.diff(inside) >= 0).all() and inside[0] == 0 and inside[-1] == 1  # a monotone fade, edges unweighted
