"""WindowBatcher without HTTP or a model: batches fill, wait at most max_wait, keep shapes apart,
drop windows past their deadline or cancelled, refuse what does not fit, and shut down cleanly."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError

import numpy as np
import pytest

from recon_runtime.serving.batcher import DeadlineExceeded, QueueFull, ShuttingDown, WindowBatcher

KEY_A = (("encoder",), (1, 8, 64))
KEY_B = (("encoder",), (1, 16, 64))
ROLES = ("encoder",)
FULL_BATCH_WAIT_S = 5.0  # max_wait of the full-batch test: a full batch must leave long before it


class FakeModel:
    """Doubles each window; records every batch; can be held to keep the worker busy."""

    def __init__(self) -> None:
        self.batches: list[list[np.ndarray]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, roles: Sequence[str], windows: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        assert len({w.shape for w in windows}) == 1, "a batch mixed shapes"
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        if any(not np.isfinite(w).all() for w in windows):
            raise ValueError("NaN window")
        with self.lock:
            self.batches.append(list(windows))
        return [[w * 2] for w in windows]

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()


def window(value: float, frames: int = 8) -> np.ndarray:
    return np.full((1, frames, 64), value, np.float32)


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


def test_windows_from_many_threads_fill_one_batch_and_each_caller_gets_its_own(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=4, max_wait_s=FULL_BATCH_WAIT_S)
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(4)

    def caller(i: int) -> None:
        barrier.wait()
        (f,) = b.submit(KEY_A, ROLES, [window(i)])
        results[i] = f.result(10)[0]

    started = time.monotonic()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.monotonic() - started < FULL_BATCH_WAIT_S / 2, "a full batch must not wait for max_wait"
    assert model.sizes == [4]
    for i in range(4):
        np.testing.assert_array_equal(results[i], window(i) * 2)
    assert b.close(timeout=5)


def test_a_lone_window_waits_at_most_max_wait(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=8, max_wait_s=0.15)
    t0 = time.monotonic()
    out = b.submit(KEY_A, ROLES, [window(3)])[0].result(5)
    waited = time.monotonic() - t0
    np.testing.assert_array_equal(out[0], window(6))
    assert 0.14 <= waited < 2.0, waited
    assert model.sizes == [1]
    assert b.close(timeout=5)


def test_batches_never_mix_shapes_and_respect_max_batch(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=3, max_wait_s=0.05)
    model.hold()
    first = b.submit(KEY_A, ROLES, [window(0)])  # occupies the worker
    assert model.entered.wait(5)
    fa = b.submit(KEY_A, ROLES, [window(i) for i in range(5)])
    fb = b.submit(KEY_B, ROLES, [window(i, 16) for i in range(2)])
    assert b.depth == 7
    model.gate.set()
    for f in first + fa + fb:
        f.result(5)
    assert sorted(model.sizes) == [1, 2, 2, 3]
    assert b.depth == 0
    assert b.close(timeout=5)


def test_oldest_key_goes_first(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=8, max_wait_s=0.0)
    model.hold()
    b.submit(KEY_A, ROLES, [window(0)])
    assert model.entered.wait(5)
    fb = b.submit(KEY_B, ROLES, [window(1, 16)])
    fa = b.submit(KEY_A, ROLES, [window(2)])
    model.gate.set()
    fb[0].result(5)
    fa[0].result(5)
    assert [bt[0].shape[1] for bt in model.batches] == [8, 16, 8]
    assert b.close(timeout=5)


def test_windows_past_their_deadline_leave_the_queue_unrun(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=4, max_wait_s=0.0)
    model.hold()
    busy = b.submit(KEY_A, ROLES, [window(0)])
    assert model.entered.wait(5)
    late = b.submit(KEY_B, ROLES, [window(7, 16), window(8, 16)], deadline=time.monotonic() + 0.05)
    time.sleep(0.3)
    # the worker is still busy, yet expired windows are dropped as soon as it looks at the queue
    model.gate.set()
    busy[0].result(5)
    for f in late:
        with pytest.raises(DeadlineExceeded):
            f.result(5)
    assert model.sizes == [1], "expired windows must never run"
    assert b.depth == 0
    assert b.close(timeout=5)


def test_cancelled_windows_leave_the_queue_and_the_rest_still_run(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=8, max_wait_s=0.0)
    model.hold()
    busy = b.submit(KEY_A, ROLES, [window(0)])
    assert model.entered.wait(5)
    gone = b.submit(KEY_A, ROLES, [window(1), window(2), window(3)])
    kept = b.submit(KEY_A, ROLES, [window(4)])
    assert b.depth == 4
    assert b.cancel(gone) == 3
    assert b.depth == 1
    assert all(f.cancelled() for f in gone)
    model.gate.set()
    busy[0].result(5)
    np.testing.assert_array_equal(kept[0].result(5)[0], window(8))
    ran = [float(w[0, 0, 0]) for batch in model.batches for w in batch]
    assert ran == [0.0, 4.0]
    assert b.close(timeout=5)


def test_queue_full_refuses_a_whole_submission(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=1, max_wait_s=0.0, max_windows=3)
    model.hold()
    busy = b.submit(KEY_A, ROLES, [window(0)])
    assert model.entered.wait(5)
    ok = b.submit(KEY_A, ROLES, [window(1), window(2)])
    with pytest.raises(QueueFull):
        b.submit(KEY_A, ROLES, [window(3), window(4)])  # 2 + 2 > 3: none of them is queued
    assert b.depth == 2
    more = b.submit(KEY_A, ROLES, [window(5)])  # 2 + 1 fits
    model.gate.set()
    for f in busy + ok + more:
        f.result(5)
    assert sorted(float(bt[0][0, 0, 0]) for bt in model.batches) == [0.0, 1.0, 2.0, 5.0]
    assert b.close(timeout=5)


def test_unbudgeted_windows_are_queued_past_the_limit(model: FakeModel) -> None:
    """A stream's later windows (admitted work) are queued even when the budget is full."""
    b = WindowBatcher(model, max_batch=1, max_wait_s=0.0, max_windows=1)
    model.hold()
    busy = b.submit(KEY_A, ROLES, [window(0)])
    assert model.entered.wait(5)
    full = b.submit(KEY_A, ROLES, [window(1)])
    with pytest.raises(QueueFull):
        b.submit(KEY_A, ROLES, [window(2)])
    later = b.submit_many([(KEY_A, ROLES, window(3))], budgeted=False)
    assert b.depth == 2
    with pytest.raises(QueueFull):  # the budget still holds for everyone else
        b.submit(KEY_A, ROLES, [window(4)])
    model.gate.set()
    for f in busy + full + later:
        f.result(5)
    assert sorted(float(bt[0][0, 0, 0]) for bt in model.batches) == [0.0, 1.0, 3.0]
    assert b.close(timeout=5)


def _wait_closing(b: WindowBatcher, timeout: float = 10.0) -> None:
    """Wait until another thread's close() has begun (no fixed sleep: the machine may be busy)."""
    end = time.monotonic() + timeout
    while not b.closing:
        assert time.monotonic() < end, "close() did not begin"
        time.sleep(0.005)


def test_close_drains_waiting_windows_then_refuses_new_ones(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=2, max_wait_s=1.0)
    model.hold()
    busy = b.submit(KEY_A, ROLES, [window(0)])
    assert model.entered.wait(5)
    waiting = b.submit(KEY_A, ROLES, [window(1), window(2), window(3)])
    closer = threading.Thread(target=b.close, kwargs={"drain": True, "timeout": 10})
    closer.start()
    _wait_closing(b)
    with pytest.raises(ShuttingDown):
        b.submit(KEY_A, ROLES, [window(9)])
    model.gate.set()
    closer.join(10)
    assert not b.alive
    for f in busy + waiting:
        assert f.result(0)[0].shape == (1, 8, 64)  # every window queued before close ran


def test_close_without_drain_cancels_waiting_windows(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=2, max_wait_s=0.0)
    model.hold()
    busy = b.submit(KEY_A, ROLES, [window(0)])
    assert model.entered.wait(5)
    waiting = b.submit(KEY_A, ROLES, [window(1)])
    closer = threading.Thread(target=b.close, kwargs={"drain": False, "timeout": 10})
    closer.start()
    _wait_closing(b)
    model.gate.set()
    closer.join(10)
    busy[0].result(5)  # the running batch finishes
    with pytest.raises(CancelledError):
        waiting[0].result(5)
    assert not b.alive


def test_one_bad_window_fails_alone_and_the_worker_lives_on(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=4, max_wait_s=0.0)
    model.hold()
    busy = b.submit(KEY_A, ROLES, [window(0)])
    assert model.entered.wait(5)
    good, bad, good2 = b.submit(KEY_A, ROLES, [window(1), window(np.nan), window(2)])
    model.gate.set()
    busy[0].result(5)
    np.testing.assert_array_equal(good.result(5)[0], window(2))
    np.testing.assert_array_equal(good2.result(5)[0], window(4))
    with pytest.raises(ValueError, match="NaN window"):
        bad.result(5)
    after = b.submit(KEY_A, ROLES, [window(5)])[0]
    np.testing.assert_array_equal(after.result(5)[0], window(10))
    assert b.close(timeout=5)


def test_a_failed_batch_retried_one_at_a_time_counts_each_window_once(model: FakeModel) -> None:
    seen = []
    b = WindowBatcher(model, max_batch=4, max_wait_s=0.0, on_batch=seen.append)
    model.hold()
    busy = b.submit(KEY_A, ROLES, [window(0)])
    assert model.entered.wait(5)
    futures = b.submit(KEY_A, ROLES, [window(1), window(np.nan), window(2)])
    model.gate.set()
    for f in [*busy, *futures]:
        f.exception(5)
    counted = [s.size for s in seen if not s.retried]
    assert sum(counted) == 4 and [s.size for s in seen if s.retried] == [3]
    assert b.close(timeout=5)


def test_cancelling_from_another_thread_while_windows_expire_never_kills_the_worker(model: FakeModel) -> None:
    """The server cancels futures from its event loop without the batcher's lock while the worker
    expires the same windows: the worker must survive every interleaving."""
    import sys

    b = WindowBatcher(model, max_batch=64, max_wait_s=60.0)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for round_ in range(150):
            futures = b.submit(KEY_A, ROLES, [window(round_)] * 40, deadline=time.monotonic() + 0.002)
            while not all(f.done() for f in futures):
                for f in futures:
                    f.cancel()  # as asyncio.wrap_future does on a timeout: no lock held
            assert b.alive, f"the worker died in round {round_}"
    finally:
        sys.setswitchinterval(interval)
    full = b.submit(KEY_A, ROLES, [window(3)] * 64)  # a full batch runs at once
    np.testing.assert_array_equal(full[-1].result(5)[0], window(6))
    assert b.depth == 0
    assert b.close(timeout=5)


def test_an_unexpected_worker_error_fails_the_batch_but_not_the_worker(model: FakeModel) -> None:
    calls = []

    def broken_callback(stats: object) -> None:
        calls.append(stats)

    b = WindowBatcher(model, max_batch=4, max_wait_s=0.0, on_batch=broken_callback)
    original = b._execute
    state = {"n": 0}

    def flaky(batch: list) -> None:
        state["n"] += 1
        if state["n"] == 1:
            raise RuntimeError("worker bug")
        original(batch)

    b._execute = flaky  # type: ignore[method-assign]
    first = b.submit(KEY_A, ROLES, [window(1)])[0]
    with pytest.raises(RuntimeError, match="worker bug"):
        first.result(5)
    assert b.alive
    np.testing.assert_array_equal(b.submit(KEY_A, ROLES, [window(2)])[0].result(5)[0], window(4))
    assert b.close(timeout=5)


def test_batch_callback_sees_every_graph_run(model: FakeModel) -> None:
    seen = []
    b = WindowBatcher(model, max_batch=4, max_wait_s=0.3, on_batch=seen.append)
    futures = b.submit(KEY_A, ROLES, [window(i) for i in range(3)])
    for f in futures:
        f.result(5)
    assert [(s.size, s.key, s.failed) for s in seen] == [(3, KEY_A, False)]
    assert seen[0].seconds >= 0
    assert b.close(timeout=5)


def test_an_empty_submission_queues_nothing(model: FakeModel) -> None:
    b = WindowBatcher(model, max_batch=4, max_wait_s=0.01)
    assert b.submit(KEY_A, ROLES, []) == []
    assert b.depth == 0
    assert b.close(timeout=5)
    assert model.sizes == []


@pytest.mark.parametrize(
    "kwargs", [{"max_batch": 0}, {"max_wait_s": -1}, {"max_windows": 0}], ids=["batch", "wait", "queue"]
)
def test_invalid_settings_are_refused(model: FakeModel, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        WindowBatcher(model, **kwargs)
