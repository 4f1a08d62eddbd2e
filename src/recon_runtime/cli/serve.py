"""`recon-run serve`: the HTTP service on uvicorn, or on Ray Serve with --ray.

fastapi and uvicorn (the `serve` extra) and Ray are imported only when the command runs.
"""

from __future__ import annotations

import errno
import logging
import math
import signal
import socket
from typing import Any

import click

from ..contract import LATENT_DOWNSAMPLE
from ..errors import ReconError, describe
from ..locations import resolve_model
from ..serving.config import TIMEOUT_PER_AUDIO_S
from .batch import fail
from .options import CommandError, api_key_from_env, model_options
from .remote import need_serve_extra

_LOGGER = logging.getLogger("recon_runtime")


class FiniteFloat(click.FloatRange):
    """click's FloatRange without NaN and infinities (a NaN passes every range check: `--min-upload-rate
    nan` made every upload a 408)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--max-wait-ms", type=FiniteFloat(min=0), default=10.0, show_default=True,
    help="How long the worker waits for a batch to fill.",
)  # fmt: skip
@click.option(
    "--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
    help="Requests in progress at once; more get 503 with Retry-After.",
)  # fmt: skip
@click.option(
    "--max-windows", type=click.IntRange(min=1), default=None, metavar="N",
    help="Windows waiting for the worker, all requests together (a 10.24 s window each); a request that does "
    "not fit gets 503 with Retry-After, one that needs more than N alone gets 413. Default: no window limit.",
)  # fmt: skip
@click.option("--max-body-mb", type=FiniteFloat(min=0, min_open=True), default=64.0, show_default=True)
@click.option(
    "--max-seconds", type=FiniteFloat(min=0, min_open=True), default=600.0, show_default=True,
    help="Longest audio accepted (413 beyond).",
)  # fmt: skip
@click.option(
    "--timeout-s", type=FiniteFloat(min=0, min_open=True), default=120.0, show_default=True,
    help="Per-request limit, plus --timeout-per-audio-s per second of its audio (504 beyond; the request's "
    "windows leave the queue).",
)  # fmt: skip
@click.option(
    "--timeout-per-audio-s", type=FiniteFloat(min=0), default=TIMEOUT_PER_AUDIO_S, show_default=True,
    help="Seconds the per-request limit grows for each second of audio the request declares, so that the "
    "longest audio accepted has time to run on a CPU (0: --timeout-s alone).",
)  # fmt: skip
@click.option(
    "--bucket-frames", type=click.IntRange(min=LATENT_DOWNSAMPLE), default=LATENT_DOWNSAMPLE, show_default=True,
    metavar="N",
    help=f"Pad one-window inputs to a multiple of N log-mel frames (a multiple of {LATENT_DOWNSAMPLE}) so short clips of different "
    "lengths share batches; results then equal Reconstructor.load(..., bucket_frames=N). Default: the runtime's.",
)  # fmt: skip
@click.option(
    "--body-timeout-s", type=FiniteFloat(min=0, min_open=True), default=30.0, show_default=True,
    help="The whole upload must arrive within this (408 beyond).",
)  # fmt: skip
@click.option(
    "--max-uploads", type=click.IntRange(min=1), default=16, show_default=True,
    help="Uploads read at once (admission comes first: a full server answers 503 before the body).",
)  # fmt: skip
@click.option(
    "--max-decoded-mb", type=FiniteFloat(min=0, min_open=True), default=1024.0, show_default=True,
    help="Decoded samples of one upload, frames x channels x 4 bytes from its header (413 beyond).",
)  # fmt: skip
@click.option(
    "--max-response-mb", type=FiniteFloat(min=0, min_open=True), default=128.0, show_default=True,
    help="The answer of one request, from the upload's header and the query before any work (413 beyond; "
    "600 s at 48 kHz float32 is 110 MiB).",
)  # fmt: skip
@click.option(
    "--header-timeout-s", type=FiniteFloat(min=0, min_open=True), default=10.0, show_default=True,
    help="A connection's request head must arrive within this (closed beyond, with 408 if part of it came).",
)  # fmt: skip
@click.option(
    "--send-timeout-s", type=FiniteFloat(min=0, min_open=True), default=30.0, show_default=True,
    help="A connection whose client reads nothing of its answer for this long is dropped.",
)  # fmt: skip
@click.option(
    "--min-upload-rate", type=FiniteFloat(min=0), default=4096.0, show_default=True, metavar="BYTES_PER_S",
    help="An upload slower than this after a short grace gets 408 and frees its slot (0: no minimum).",
)  # fmt: skip
@click.option(
    "--api-key-env", default=None, metavar="VAR",
    help="Require 'Authorization: Bearer <key>' on every route but /healthz; the key is read from $VAR.",
)  # fmt: skip
@click.option(
    "--grace-s", type=FiniteFloat(min=0), default=30.0, show_default=True,
    help="On SIGTERM/SIGINT: how long in-flight requests may take to finish.",
)  # fmt: skip
@click.option(
    "--ray", "use_ray", is_flag=True,
    help="Run the app as a Ray Serve deployment (replicas behind Ray's HTTP proxy; the `ray` extra).",
)  # fmt: skip
@click.option(
    "--ray-address", default=None, metavar="ADDR",
    help="With --ray: deploy on this Ray cluster (e.g. HEAD_IP:6379 or auto); default: a local Ray in this process.",
)  # fmt: skip
@click.option(
    "--replicas", type=click.IntRange(min=1), default=1, show_default=True,
    help="With --ray: replicas, each with its own model and batcher.",
)  # fmt: skip
@click.option(
    "--gpus-per-replica", type=FiniteFloat(min=0), default=0.0, show_default=True,
    help="With --ray: GPUs per replica (0.5 puts two replicas on one GPU).",
)  # fmt: skip
@click.option(
    "--cpus-per-replica", type=FiniteFloat(min=0), default=1.0, show_default=True,
    help="With --ray: Ray CPUs per replica (also its intra-op threads unless --threads is given).",
)  # fmt: skip
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    grace_s: float,
    api_key_env: str | None,
    use_ray: bool,
    ray_address: str | None,
    replicas: int,
    gpus_per_replica: float,
    cpus_per_replica: float,
    **kwargs: Any,
) -> None:
    """HTTP service: /v1/reconstruct, /v1/encode, /v1/decode with window-level dynamic batching.

    Outputs equal Reconstructor.load(...) run in-process (with --bucket-frames N: bucket_frames=N). With --ray the same
    app runs as a Ray Serve deployment of --replicas replicas. See docs/serving.md and docs/scale-out.md.
    """

    def flags(names: tuple[str, ...]) -> list[str]:  # those the user gave
        given = [n for n in names if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
        return ["--" + n.replace("_", "-") for n in given]

    ray_only = flags(("ray_address", "replicas", "gpus_per_replica", "cpus_per_replica"))
    if ray_only and not use_ray:
        raise click.UsageError(f"{', '.join(ray_only)} need --ray")
    not_on_ray = flags(("header_timeout_s", "send_timeout_s"))
    if not_on_ray and use_ray:
        raise click.UsageError(
            f"{', '.join(not_on_ray)} cannot apply with --ray: Ray's HTTP proxy holds the connections "
            "(put a reverse proxy with these timeouts in front; docs/serving.md)"
        )
    if use_ray and port == 0:
        raise click.UsageError("--ray needs a fixed --port (Ray's HTTP proxy does not pick a free one)")
    need_serve_extra("server")

    from ..contract import check_mel, read_contract
    from ..serving.app import create_app
    from ..serving.config import ServerConfig, bind_is_loopback

    key = api_key_from_env(api_key_env)
    try:
        model = resolve_model(kwargs.pop("model")).path
        contract = read_contract(model)  # a wrong --model fails now, in one line, before binding
        check_mel(contract, str(model / "recon.json"))
        # replicas may run in another working directory (or on another node): an absolute path
        config = ServerConfig(model=str(model.resolve() if use_ray else model), api_key=key, **kwargs)
    except (ReconError, ValueError) as e:
        raise CommandError(str(e)) from None
    if not use_ray:  # before the app loads the model: uvicorn binds only after its start-up (Ray's proxy binds on Ray)
        _check_port(host, port)
    if not bind_is_loopback(host) and key is None:
        _LOGGER.warning("binding %s without --api-key-env: anyone who can reach this port can use the server", host)
    if use_ray:
        _serve_on_ray(config, ray_address, host, port, replicas, cpus_per_replica, gpus_per_replica, grace_s)
        ctx.exit(0)
    import uvicorn

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    try:
        from ..serving.http_protocol import with_timeouts
    except ImportError as e:  # uvicorn's internals changed (a uvicorn the serve extra does not pin)
        raise CommandError(str(e)) from None

    app = create_app(config, on_load_error=on_load_error)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            http=with_timeouts(config.header_timeout_s, config.send_timeout_s),  # pins h11, the one it extends
            # uvicorn passes it to asyncio.wait_for, which takes any float (its annotation says int)
            timeout_graceful_shutdown=grace_s,  # type: ignore[arg-type]
            log_level="debug" if ctx.obj and ctx.obj.get("debug") else "info",
            server_header=False,
            proxy_headers=False,
        )
    )
    # uvicorn re-raises the signal that stopped it once it has drained; with these handlers in place
    # that re-raise is a no-op, so a SIGTERM'd server that drained cleanly exits 0.
    stopped_by: list[int] = []
    previous = {s: signal.signal(s, lambda sig, frame: stopped_by.append(sig)) for s in (signal.SIGTERM, signal.SIGINT)}
    cut_off = _CutOffCounter()
    logging.getLogger("uvicorn.error").addFilter(cut_off)
    try:
        server.run()
    finally:
        logging.getLogger("uvicorn.error").removeFilter(cut_off)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        fail(describe(failed[0]))
        ctx.exit(1)
    if not server.started:
        ctx.exit(1)  # e.g. the port is in use (uvicorn said so)
    if cut_off.tasks:
        fail(f"the grace period ({grace_s:g} s) cut off {cut_off.tasks} request(s) in progress")
        ctx.exit(EXIT_CUT_OFF)
    ctx.exit(0)


def _check_port(host: str, port: int) -> None:
    """Bind `host:port` as uvicorn will (every address the host resolves to, SO_REUSEADDR), then let go.

    uvicorn binds only after the app's start-up has begun loading the model, and a port in use then
    ended the command with its own error and exit status 3; this says so in one line first.

    Raises:
        CommandError: the host does not resolve, or an address cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CommandError(f"--host {host}: cannot be resolved ({e.strerror})") from None
    for family, kind, proto, _, address in dict.fromkeys(infos):  # repeats dropped, as asyncio's create_server does
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                in_use = e.errno == errno.EADDRINUSE
                fix = "stop what listens there or choose another --port" if in_use else "choose another --host"
                raise CommandError(f"cannot listen on {host}:{port} ({e.strerror or e}); {fix}") from None


EXIT_CUT_OFF = 3
"""`recon-run serve`'s exit status when --grace-s ran out with requests still in progress."""


class _CutOffCounter(logging.Filter):
    """Counts the requests uvicorn cancels when the graceful-shutdown timeout runs out (from its log record)."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Cancel %s running task"):
            try:
                self.tasks += int(record.args[0]) if record.args else 1  # type: ignore[index]
            except (TypeError, ValueError, IndexError):
                self.tasks += 1
        return True


def _serve_on_ray(
    config: Any, address: str | None, host: str, port: int, replicas: int, cpus: float, gpus: float, grace_s: float
) -> None:
    from ..serving.ray_serve import (
        serve_until_stopped,  # Ray is imported only there, and only now (or its absence told)
    )

    try:
        serve_until_stopped(
            config,
            address=address,
            host=host,
            port=port,
            replicas=replicas,
            cpus_per_replica=cpus,
            gpus_per_replica=gpus,
            grace_s=grace_s,
            echo=lambda line: click.echo(line, err=True),
        )
    except ReconError as e:
        raise CommandError(str(e)) from None
