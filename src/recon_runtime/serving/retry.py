"""Remote file jobs (`--server URL`): several files in flight at once, and retries on a busy server.

A bulk run against `recon-run serve` sends `concurrency` files at once (default
DEFAULT_CONCURRENCY, measured in docs/files.md), so that the server's batcher has windows of
several requests to group. A busy server answers 503 (or a proxy 429) with `Retry-After`;
`RetryTransport` waits as long as it says and sends the request again, at most MAX_ATTEMPTS
times and MAX_TOTAL_WAIT_S seconds of waiting per request. A request that exhausts either bound
is answered with the last refusal, so only that file fails (its one line names the status); the
other files go on.

The retries live in an httpx transport, under `client.Client`, so every request of the client
(info, reconstruct, encode, decode, the decode stream) gets them, and `Client` stays as it is.
Needs the `serve` extra (httpx).
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final, Generic, TypeVar

import httpx

from .protocol import DEFAULT_CONCURRENCY

_LOGGER = logging.getLogger(__name__)

RETRY_STATUSES: Final = frozenset({429, 503})
"""Refusals that say "later": 503 (server busy, loading, shutting down) and 429 (a rate limit in front)."""
MAX_ATTEMPTS: Final = 10
"""Tries of one request, the first included."""
MAX_TOTAL_WAIT_S: Final = 120.0
"""Seconds one request may spend waiting between its tries, all waits together; a Retry-After that
would pass it is not waited for (the request fails at once with that refusal)."""
DEFAULT_RETRY_AFTER_S: Final = 1.0
"""The wait when a refusal has no readable Retry-After (the server always sends one)."""
JITTER: Final = 0.1
"""Each wait is lengthened by up to this fraction, so that the files refused together do not all
come back in the same instant."""

T = TypeVar("T")
R = TypeVar("R")


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header in seconds: delta-seconds ("3") or an HTTP date (RFC 9110, 10.2.3).

    Returns:
        Seconds from `now` (0 for a date in the past), or None for an absent or unreadable value.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT; parsedate_to_datetime leaves "-0000" naive
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """How long a refused request is tried again: the bounds, by name."""

    max_attempts: int = MAX_ATTEMPTS
    max_total_wait_s: float = MAX_TOTAL_WAIT_S
    default_wait_s: float = DEFAULT_RETRY_AFTER_S
    jitter: float = JITTER

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("max_total_wait_s", "default_wait_s", "jitter"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    def next_wait(self, status: int, retry_after: str | None, attempt: int, waited: float) -> float | None:
        """Seconds to wait before try `attempt + 1`, or None to give up (not a retry status, or a bound reached).

        Args:
            attempt: the tries made so far (1 after the first).
            waited: the seconds already waited for this request.
        """
        if status not in RETRY_STATUSES or attempt >= self.max_attempts:
            return None
        asked = retry_after_seconds(retry_after)
        wait_s = (self.default_wait_s if asked is None else asked) * (1 + self.jitter * random.random())
        if waited + wait_s > self.max_total_wait_s:
            return None
        return wait_s


class RetryTransport(httpx.BaseTransport):
    """An httpx transport that sends a request again after 429/503, as `policy` allows.

    Only requests whose body can be sent twice (bytes, as `client.Client` sends) are retried.
    `retries` counts the requests sent again (all threads together), for a run's summary.
    """

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.inner = inner if inner is not None else httpx.HTTPTransport()
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._lock = threading.Lock()
        self.retries = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attempt, waited = 1, 0.0
        replayable = isinstance(request.stream, httpx.ByteStream)
        while True:
            response = self.inner.handle_request(request)
            wait_s = self.policy.next_wait(response.status_code, response.headers.get("retry-after"), attempt, waited)
            if wait_s is None or not replayable:
                if response.status_code in RETRY_STATUSES and attempt > 1:
                    _LOGGER.debug(
                        "%s %s: still %d after %d tries", request.method, request.url, response.status_code, attempt
                    )
                return response
            response.read()  # give the connection back to the pool
            response.close()
            _LOGGER.debug(
                "%s %s: %d, trying again in %.1f s", request.method, request.url, response.status_code, wait_s
            )
            with self._lock:
                self.retries += 1
            self._sleep(wait_s)
            waited += wait_s
            attempt += 1

    def close(self) -> None:
        self.inner.close()


def retrying_client(
    url: str, api_key: str | None = None, concurrency: int = DEFAULT_CONCURRENCY, policy: RetryPolicy | None = None
) -> tuple[Any, RetryTransport]:
    """A `client.Client` whose requests retry on 429/503 and whose pool keeps `concurrency` connections,
    and its transport (whose `retries` a summary can report)."""
    from .client import Client

    transport = RetryTransport(
        httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=max(100, concurrency), max_keepalive_connections=max(20, concurrency))
        ),
        policy,
    )
    return Client(url, api_key=api_key, transport=transport), transport


@dataclass(frozen=True)
class Outcome(Generic[T, R]):
    """One item's end: its result, or the exception that failed it."""

    item: T
    result: R | None = None
    error: BaseException | None = None


def run_bounded(
    items: Iterable[T], work: Callable[[T], R], concurrency: int = DEFAULT_CONCURRENCY
) -> Iterator[Outcome[T, R]]:
    """`work(item)` for each item, at most `concurrency` at once, yielding each outcome as it ends.

    The items are taken from `items` only as slots free up (a long listing is not read ahead), an
    exception fails its item only, and outcomes come back in the caller's thread (progress bars and
    summaries need no lock). Closing the generator early (an error in the caller, Ctrl-C) cancels the
    items not started and waits for those running.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    pending: dict[Future[R], T] = {}
    source = iter(items)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="recon-remote")
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < concurrency:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending[pool.submit(work, item)] = item
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                item = pending.pop(future)
                error = future.exception()
                yield Outcome(item, None if error else future.result(), error)
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
