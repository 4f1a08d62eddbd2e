"""Dynamic batching of windows from many callers: one worker thread per model.

Callers submit windows (graph inputs without the batch axis) with a key; windows with equal keys
(stages and shape, `WindowJob.key`) can run in one batch. One worker thread takes the oldest
waiting window, waits at most `max_wait_s` (from that window's arrival) for up to `max_batch`
windows of its key, runs them as one batch with `run(roles, windows)` and hands each caller its
window's output through a `concurrent.futures.Future`. Nothing here knows about HTTP.

- Queue limit: a submission that does not fit under `max_windows` waiting windows is refused
  whole (`QueueFull`), so a caller never has only part of its windows queued. A submission marked
  `budgeted=False` (the next window of work admitted earlier) is queued whatever the count, so the
  number waiting can exceed `max_windows` by those.
- Deadlines and cancellation: a window whose deadline has passed, or whose caller cancelled it
  (`cancel`), leaves the queue and is never run.
- Shutdown: `close()` refuses new windows, runs (or with `drain=False` cancels) the waiting ones
  and stops the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_LOGGER = logging.getLogger(__name__)

RunFn = Callable[[Sequence[str], Sequence[np.ndarray]], list[Any]]


class QueueFull(Exception):
    """The queue has no room for these windows now; try again later."""


class ShuttingDown(Exception):
    """The batcher is closing and takes no new windows."""


class DeadlineExceeded(TimeoutError):
    """The window's deadline passed before it ran."""


@dataclass(eq=False)
class _Item:
    key: Hashable
    roles: tuple[str, ...]
    window: np.ndarray
    deadline: float | None
    arrived: float
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class BatchStats:
    """What the worker reports after each graph run (for metrics)."""

    size: int
    seconds: float
    key: Hashable
    failed: bool
    retried: bool = False
    """A failed batch whose windows are run again one at a time (each reported on its own)."""


class WindowBatcher:
    """Collect windows from any number of threads or event loops into batches of one key."""

    def __init__(
        self,
        run: RunFn,
        max_batch: int = 8,
        max_wait_s: float = 0.010,
        max_windows: int | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "recon-batcher",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_windows is not None and max_windows < 1:
            raise ValueError(f"max_windows must be at least 1, got {max_windows}")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_windows = max_windows
        self._on_batch = on_batch
        self._queues: dict[Hashable, deque[_Item]] = {}
        self._waiting = 0
        self._cond = threading.Condition()
        self._closing = False
        self._drain = True
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    @property
    def depth(self) -> int:
        """Windows waiting (not yet taken into a batch)."""
        return self._waiting

    def submit(
        self,
        key: Hashable,
        roles: Sequence[str],
        windows: Sequence[np.ndarray],
        deadline: float | None = None,
    ) -> list[Future]:
        """Queue windows of one key; one future per window, resolved with `run`'s per-window output.

        Args:
            deadline: `time.monotonic()` after which the windows are dropped unrun (their futures
                then raise `DeadlineExceeded`).
        Raises:
            QueueFull: the windows do not all fit under `max_windows` (none are queued); see
                `submit_many(budgeted=False)` for windows that skip this check.
            ShuttingDown: `close` was called.
        """
        return self.submit_many([(key, roles, w) for w in windows], deadline)

    def submit_many(
        self,
        entries: Sequence[tuple[Hashable, Sequence[str], np.ndarray]],
        deadline: float | None = None,
        budgeted: bool = True,
    ) -> list[Future]:
        """Queue windows of any keys at once, all or none (see `submit`).

        `budgeted=False` skips the `max_windows` check, for the next window of work that was already
        admitted under it (a stream's later windows): work let in once is not cut off half-way.
        """
        now = time.monotonic()
        items = [_Item(key, tuple(roles), window, deadline, now) for key, roles, window in entries]
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if budgeted and self.max_windows is not None and self._waiting + len(items) > self.max_windows:
                raise QueueFull(f"{self._waiting} windows are waiting (limit {self.max_windows})")
            for item in items:
                self._queues.setdefault(item.key, deque()).append(item)
            self._waiting += len(items)
            self._cond.notify_all()
        return [item.future for item in items]

    def cancel(self, futures: Sequence[Future]) -> int:
        """Take these windows out of the queue (if still waiting) and cancel them; returns how many left it."""
        wanted = set(map(id, futures))
        removed = 0
        with self._cond:
            for key in list(self._queues):
                queue = self._queues[key]
                keep = deque(item for item in queue if id(item.future) not in wanted)
                removed += len(queue) - len(keep)
                if keep:
                    self._queues[key] = keep
                else:
                    del self._queues[key]
            self._waiting -= removed
            self._cond.notify_all()
        for f in futures:
            f.cancel()  # no effect on a window already running; its result is then ignored
        return removed

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Refuse new windows; run the waiting ones (drain) or cancel them; stop the worker.

        Returns True when the worker stopped within `timeout`.
        """
        with self._cond:
            self._closing = True
            self._drain = drain
            if not drain:
                for queue in self._queues.values():
                    for item in queue:
                        item.future.cancel()
                self._queues.clear()
                self._waiting = 0
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def closing(self) -> bool:
        """True once close() has begun: new windows are refused (and, without drain, waiting ones cancelled)."""
        with self._cond:
            return self._closing

    # ------------------------------------------------------------------ worker
    def _expire(self, now: float) -> None:
        """Drop windows past their deadline or cancelled (under the lock)."""
        for key in list(self._queues):
            queue = self._queues[key]
            keep: deque[_Item] = deque()
            for item in queue:
                if item.future.cancelled():
                    continue
                if item.deadline is not None and now >= item.deadline:
                    # a caller may cancel the future at any moment (from its event loop, without this
                    # lock): claim it first, so a cancelled one is simply dropped
                    if item.future.set_running_or_notify_cancel():
                        item.future.set_exception(
                            DeadlineExceeded("the request's deadline passed before its window ran")
                        )
                    continue
                keep.append(item)
            self._waiting -= len(queue) - len(keep)
            if keep:
                self._queues[key] = keep
            else:
                del self._queues[key]

    def _take(self) -> list[_Item] | None:
        """Block until a batch is ready; None when closing and nothing is left."""
        with self._cond:
            while True:
                now = time.monotonic()
                self._expire(now)
                if not self._queues:
                    if self._closing:
                        return None
                    self._cond.wait(self._next_deadline(now))
                    continue
                # the key of the oldest waiting window goes first: no shape starves
                key = min(self._queues, key=lambda k: self._queues[k][0].arrived)
                queue = self._queues[key]
                wait = queue[0].arrived + self.max_wait_s - now
                if len(queue) < self.max_batch and wait > 0 and not self._closing:
                    nearest = self._next_deadline(now)
                    self._cond.wait(wait if nearest is None else min(wait, nearest))
                    continue
                batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
                if not queue:
                    del self._queues[key]
                self._waiting -= len(batch)
                return [item for item in batch if item.future.set_running_or_notify_cancel()]

    def _next_deadline(self, now: float) -> float | None:
        deadlines = [i.deadline for q in self._queues.values() for i in q if i.deadline is not None]
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _loop(self) -> None:
        while True:
            batch: list[_Item] | None = None
            try:
                batch = self._take()
                if batch is None:
                    return
                if batch:
                    self._execute(batch)
            except BaseException as e:  # noqa: BLE001 - fail the windows at hand, never the worker
                _LOGGER.exception("the batch worker hit an unexpected error; failing the windows it held")
                for item in batch or ():
                    _settle(item.future, error=e)
                time.sleep(0.001)  # no busy loop if the error repeats

    def _execute(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            outputs = self._run(batch[0].roles, [item.window for item in batch])
        except BaseException as e:  # noqa: BLE001 - every caller gets the error, the worker lives on
            self._report(len(batch), started, batch[0].key, True, retried=len(batch) > 1)
            if len(batch) == 1:
                _settle(batch[0].future, error=e)
                return
            # one bad window must not fail the others: run them one at a time
            _LOGGER.warning("a batch of %d windows failed (%s); running them one at a time", len(batch), e)
            for item in batch:
                started = time.perf_counter()
                try:
                    out = self._run(item.roles, [item.window])[0]
                except BaseException as e1:  # noqa: BLE001
                    _settle(item.future, error=e1)
                    self._report(1, started, item.key, True)
                else:
                    _settle(item.future, result=out)
                    self._report(1, started, item.key, False)
            return
        self._report(len(batch), started, batch[0].key, False)
        for item, out in zip(batch, outputs):
            _settle(item.future, result=out)

    def _report(self, size: int, started: float, key: Hashable, failed: bool, retried: bool = False) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(BatchStats(size, time.perf_counter() - started, key, failed, retried))
        except Exception:  # noqa: BLE001 - metrics must never stop the worker
            _LOGGER.exception("batch callback failed")


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a future the worker claimed; one that was resolved or cancelled meanwhile is left alone."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
