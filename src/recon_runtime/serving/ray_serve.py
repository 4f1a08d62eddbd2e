"""`recon-run serve --ray`: the same FastAPI app as `recon-run serve`, as a Ray Serve deployment.

Each replica builds the app with `recon_runtime.serving.app.create_app(config)` (through `serve.ingress`,
late-bound, so the app, its model and its metrics are made inside the replica and never pickled),
and Ray Serve runs the app's lifespan there: the model loads and warms up in every replica. The
HTTP API, limits and metrics are those of the plain server; Ray's HTTP proxy spreads requests over
the replicas, and every response carries the header `X-Recon-Replica` (the replica's id).

Readiness: a plain server answers `/readyz` 503 while its model loads. Under Ray a replica joins
the routing table only when its ASGI lifespan start-up returns, so the start-up here waits until
the model is loaded and warmed up (`serve.run` returns then too); a replica whose model fails to
load fails its start, and Ray reports the deployment as failed. `/readyz` on any replica Ray routes
to is therefore 200, and `check_health` marks a replica whose inference worker died as unhealthy,
so that Ray replaces it.

Ray is imported only in this module, and only when a function here runs: `import recon_runtime`,
the CLI and the plain server never import it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..cluster import start_ray
from ..errors import ReconError, require
from .app import create_app
from .config import ServerConfig
from .errors import LOAD_FAILED, load_failure_message
from .service import Service

_LOGGER = logging.getLogger(__name__)

APP_NAME = "recon"
"""The Ray Serve application (and deployment) name."""

H_REPLICA = "X-Recon-Replica"
"""Response header: the id of the replica that answered."""

PROBE_SLACK = 8
"""Requests a replica takes beyond `max_queue`: probes, /metrics and refused requests reach the app,
so its own admission (503 with Retry-After past `--max-queue`) answers them as the plain server does."""


class _ReplicaEdge:
    """ASGI middleware of a replica: names the replica in every HTTP response, and holds the lifespan
    start-up until the model is loaded and warmed up (or fails it with the load error)."""

    def __init__(self, app: Any, service: Service, replica_id: str):
        self.app = app
        self.service = service
        self.header = (H_REPLICA.lower().encode(), replica_id.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":

            async def send_named(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), self.header]}
                await send(message)

            await self.app(scope, receive, send_named)
        elif scope["type"] == "lifespan":

            async def send_when_ready(message: dict[str, Any]) -> None:
                if message["type"] == "lifespan.startup.complete":
                    from starlette.concurrency import run_in_threadpool

                    # raising here makes the app's lifespan stop the service and report the failure
                    await run_in_threadpool(self._wait_loaded)
                await send(message)

            await self.app(scope, receive, send_when_ready)
        else:
            await self.app(scope, receive, send)

    def _wait_loaded(self) -> None:
        service = self.service
        while not service.ready.wait(0.1):
            if service.load_error is not None:
                e = service.load_error
                raise RuntimeError(load_failure_message(e))


class ReconReplica:
    """One replica: builds the app inside the replica (Ray's late-bound `serve.ingress`)."""

    def __init__(self, config: ServerConfig):
        from ray import serve

        self.config = config
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.service: Service | None = None

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.config, check_protocol=False)  # Ray's proxy speaks HTTP: no uvicorn flag applies
        self.service = app.state.service
        app.add_middleware(_ReplicaEdge, service=self.service, replica_id=self.replica_id)
        return app

    async def _run_asgi_lifespan_startup(self) -> None:
        """Ray's start-up of the app's lifespan, with the load error as the reason when the model did not
        load (Ray's own error only says that the start-up failed). Ray's wrapper comes after this
        class in the replica's MRO; should Ray rename the hook, only this better message is lost."""
        try:
            await super()._run_asgi_lifespan_startup()  # type: ignore[misc]
        except RuntimeError:
            e = self.service.load_error if self.service is not None else None
            if e is None:
                raise
            raise RuntimeError(load_failure_message(e)) from None

    def check_health(self) -> None:
        """Ray's health check: unhealthy once the inference worker is gone (Ray then replaces the replica)."""
        service = self.service
        if service is not None and service.worker_stopped:
            raise RuntimeError("the inference worker is not running")


def application(
    config: ServerConfig,
    *,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    grace_s: float = 30.0,
) -> Any:
    """The Ray Serve application (`Deployment.bind`) serving `create_app(config)` on `replicas` replicas.

    Without `config.threads`, a replica runs `cpus_per_replica` (rounded, at least 1) intra-op
    threads, not one per core of its node (`LoadOptions.for_cpus`).
    """
    from ray import serve

    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    if cpus_per_replica < 0 or gpus_per_replica < 0:
        raise ValueError("CPUs and GPUs per replica must be at least 0")
    config = config.for_cpus(cpus_per_replica)
    deployment = serve.deployment(
        serve.ingress()(ReconReplica),
        name=APP_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=config.max_queue + PROBE_SLACK,
        graceful_shutdown_timeout_s=grace_s,
    )
    return deployment.bind(config)


def deploy(
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    grace_s: float = 30.0,
) -> str:
    """Start Serve's HTTP proxy on host:port (if Serve is not running on the cluster yet) and run the
    application; returns its URL once every replica has loaded its model. Ray must be initialised.

    Raises:
        ReconError: the deployment failed (e.g. the model did not load in a replica: the reason is given).
    """
    from ray import serve

    app = application(
        config, replicas=replicas, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica, grace_s=grace_s
    )
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except Exception as e:  # noqa: BLE001 - Ray's error is generic; the replica's reason is in the app status
        raise ReconError(f"the Ray Serve deployment failed: {_failure_reason() or ' '.join(str(e).split())}") from None
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _failure_reason() -> str | None:
    """The replica's own error line from the application's status (e.g. why the model did not load)."""
    from ray import serve

    try:
        status = serve.status().applications.get(APP_NAME)
        messages = [status.message] + [d.message for d in status.deployments.values()] if status else []
    except Exception:  # noqa: BLE001 - only a better message is lost
        return None
    for message in messages:
        for line in reversed((message or "").splitlines()):
            if f"{LOAD_FAILED}:" in line:
                return line[line.index(f"{LOAD_FAILED}:") :].strip()
    return None


def serve_until_stopped(
    config: ServerConfig,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    grace_s: float = 30.0,
    echo: Callable[[str], None] = print,
) -> None:
    """`recon-run serve --ray`: deploy, print the URL, block until SIGINT or SIGTERM, then take the
    application down (and the local Ray, if this call started one).

    On a cluster (`address`) only this application is deleted; Serve's proxies stay up for the
    cluster's other applications. Locally, Serve and Ray are shut down.

    Raises:
        ReconError: Ray is not installed, or the deployment failed (e.g. the model did not load in a replica).
    """
    require(("ray", "ray.serve"), "serve --ray needs Ray Serve", "ray", "serve")
    import ray
    from ray import serve

    stop = threading.Event()

    def on_signal(sig: int, frame: Any) -> None:
        stop.set()

    # ray.init installs its own SIGTERM handler (sys.exit): ours replace it for the whole run
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    started = False
    attempted = False
    try:
        try:
            started = start_ray(address, replicas * cpus_per_replica)
        except Exception as e:  # noqa: BLE001 - e.g. no cluster at that address: one line, not a traceback
            where = f"connect to the Ray cluster at {address}" if address else "start a local Ray"
            raise ReconError(f"could not {where}: {' '.join(str(e).split())}") from None
        for s in previous:
            signal.signal(s, on_signal)
        if stop.is_set():
            return
        t0 = time.perf_counter()
        attempted = True
        url = deploy(
            config,
            host=host,
            port=port,
            replicas=replicas,
            cpus_per_replica=cpus_per_replica,
            gpus_per_replica=gpus_per_replica,
            grace_s=grace_s,
        )
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        echo(
            f"serving {config.model} on {url} with {replicas} replica{'s' if replicas != 1 else ''} on {where} "
            f"(ready in {time.perf_counter() - t0:.1f} s; Ctrl-C or SIGTERM stops it)"
        )
        while not stop.wait(0.5):
            pass
        echo("stopping: in-flight requests finish, then the replicas stop")
    finally:
        try:
            if attempted and ray.is_initialized():
                if address:
                    serve.delete(APP_NAME)
                else:
                    serve.shutdown()
        finally:
            if started:
                ray.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
