"""What a refused or failed request answers: the HTTP errors and the status of each runtime error.

Every module of the service raises these; `app.install_error_handlers` turns each into one JSON
line `{"error": ...}` with its status (and Retry-After where a retry may succeed).
"""

from __future__ import annotations

import logging

from ..errors import AudioInputError, BundleError, NumericalError, ReconError, describe

_LOGGER = logging.getLogger(__name__)

CLIENT_GONE = 499
"""Status recorded in the metrics for a request whose client disconnected before the answer (nginx's 499)."""
RETRY_SOON_S = 1
"""Retry-After of a 503 that a moment may cure: the model still loading, every slot taken."""
SHUTDOWN_RETRY_S = 5
"""Retry-After of a stopping server's 503: another instance (or this one restarted) takes the retry."""
SHUTTING_DOWN = "the server is shutting down; retry shortly"
NOT_LOADED = "the model is not loaded yet; retry shortly"


def retry_after(seconds: int = RETRY_SOON_S) -> dict[str, str]:
    """The Retry-After header of a 503."""
    return {"Retry-After": str(seconds)}


def busy(why: str) -> HTTPError:
    """The 503 of a full server (`why`: what is full), with Retry-After."""
    return HTTPError(503, f"server busy: {why}", retry_after())


def shutting_down() -> HTTPError:
    """The 503 of a stopping server, with its Retry-After."""
    return HTTPError(503, SHUTTING_DOWN, retry_after(SHUTDOWN_RETRY_S))


FP16_OVERFLOW = (
    "this server's fp16 graphs cannot carry this input (finite, within fp16's range): a limit of the precision "
    "this server runs, not a fault of the input; its operator can serve it at --precision fp32"
)
"""What the client reads (422) and the server logs (warning, for its operator) of an fp16 overflow."""

LOAD_FAILED = "the model did not load"
"""Begins the load-failure line (log, /readyz, a Ray replica's start-up error, found there again by the CLI)."""


def load_failure_message(e: BaseException) -> str:
    """The one line that says why the model did not load (`describe`d)."""
    return f"{LOAD_FAILED}: {describe(e)}"


def error_status(e: ReconError) -> int:
    """The status of a runtime error: the client's input (400, 413, 422) or the server's fault (500).

    A non-finite result from finite input is 422, whoever's limit it is: the input's values overflowed
    graphs of float32's range (`input_caused`), or this server's fp16 graphs cannot carry a valid input.
    Never a 5xx for what a client sent (fp16 is the default on CUDA, so any finite input could reach
    it): the message says whose limit it is, and `is_precision_limit` errors are logged at warning so
    the operator sees that --precision fp32 would serve them. Not 503 either: that promises a retry
    may succeed, and the same server answers the same input the same way."""
    if isinstance(e, AudioInputError):
        return 400
    if isinstance(e, PayloadTooLarge):
        return 413
    if isinstance(e, (NumericalError, BundleError)):
        return 422
    return 500


def is_precision_limit(e: BaseException) -> bool:
    """Whether `e` is the server's fp16 graphs failing on a valid input (its operator's to act on)."""
    return isinstance(e, NumericalError) and not e.input_caused


def error_message(e: ReconError) -> str:
    """What the client reads of a runtime error (an fp16 overflow says whose limit it is)."""
    if is_precision_limit(e):
        return f"{FP16_OVERFLOW} ({e})"
    return str(e)


class HTTPError(Exception):
    """A client-facing error: status, one-line message, optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class PayloadTooLarge(ReconError):
    """Body or audio over the server's limits (413)."""


class ClientGone(Exception):
    """The client disconnected while its request waited: its windows left the queue (recorded as 499)."""


class StreamAborted(Exception):
    """A streamed response failed after its status was sent: the connection is dropped without the
    final chunk, so the client sees a truncated (invalid) body, and the metrics record `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
